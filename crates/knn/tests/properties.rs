//! Property tests of the exact backend's results.

use patchcore_knn::{ExactConfig, IndexSpec};
use proptest::prelude::*;

/// A bank, queries, their dimension and `k`.
fn problem() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, usize, usize)> {
    (
        1usize..8,
        1usize..40,
        0usize..6,
        -1e4f32..1e4,
        0.01f32..100.0,
    )
        .prop_flat_map(|(dim, n, nq, offset, spread)| {
            let value = (-1.0f32..1.0).prop_map(move |v| offset + spread * v);
            // Few distinct values so that duplicates and ties occur.
            let coarse = (-3i32..3).prop_map(move |v| offset + spread * v as f32);
            let row_value = prop_oneof![value, coarse];
            (
                proptest::collection::vec(row_value.clone(), n * dim),
                proptest::collection::vec(row_value, nq * dim),
                Just(dim),
                1..=n,
            )
        })
}

fn exact(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum()
}

proptest! {
    #[test]
    fn results_are_sorted_non_negative_and_exact((bank, queries, dim, k) in problem()) {
        let index = IndexSpec::Exact(ExactConfig {
 threads: Some(2),
 ..ExactConfig::default()
 }).build(&bank, dim).unwrap();
        let found = index.search(&queries, k).unwrap();
        prop_assert_eq!(found.len(), queries.len() / dim);
        prop_assert_eq!(found.k(), k);
        for (q, query) in queries.chunks_exact(dim).enumerate() {
            let (d, i) = found.row(q);
            let mut all: Vec<f64> = bank.chunks_exact(dim).map(|y| exact(query, y)).collect();
            for r in 0..k {
                prop_assert!(d[r] >= 0.0 && !d[r].is_nan());
                if r > 0 {
                    prop_assert!(d[r - 1] <= d[r]);
                    prop_assert!(!i[..r].contains(&i[r]));
                }
                let recomputed = exact(query, &bank[i[r] as usize * dim..][..dim]);
                prop_assert!((f64::from(d[r]) - recomputed).abs() <= 1e-6 * recomputed + 1e-30);
            }
            // The k distances are the k smallest.
            all.sort_by(f64::total_cmp);
            for r in 0..k {
                prop_assert!((f64::from(d[r]) - all[r]).abs() <= 1e-6 * all[r] + 1e-30);
            }
        }
    }
}
