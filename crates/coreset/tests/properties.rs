//! Property tests of the coreset selection.

use patchcore_coreset::{
    coreset_size, greedy_select, project, random_projection, start_points, CoresetError,
    GreedyConfig, Sampler,
};
use proptest::prelude::*;

/// Features, their dimension, a ratio and a seed.
fn problem() -> impl Strategy<Value = (Vec<f32>, usize, f64, u64)> {
    (1usize..6, 1usize..120).prop_flat_map(|(dim, n)| {
        (
            proptest::collection::vec(-100f32..100.0, n * dim),
            Just(dim),
            0.001f64..=1.0,
            any::<u64>(),
        )
    })
}

fn euclid(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn selection_invariants((x, dim, ratio, seed) in problem()) {
        let n = x.len() / dim;
        let config = GreedyConfig { ratio, projection_dim: 16, start_points: 10 };
        let sampler = Sampler::ApproximateGreedy(config);
        let result = sampler.select(&x, dim, seed, &mut |_, _| {});
        let count = coreset_size(n, ratio);
        if count == 0 {
            let is_no_samples = matches!(result, Err(CoresetError::NoSamples { .. }));
            prop_assert!(is_no_samples);
            return Ok(());
        }
        let picks = result.unwrap();
        prop_assert_eq!(picks.len(), if ratio == 1.0 { n } else { count });
        let mut unique = picks.clone();
        unique.sort_unstable();
        unique.dedup();
        prop_assert_eq!(unique.len(), picks.len());
        prop_assert!(picks.iter().all(|&i| i < n));
        // Same seed, same picks; on one thread and on three.
        prop_assert_eq!(&sampler.select(&x, dim, seed, &mut |_, _| {}).unwrap(), &picks);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let again = pool.install(|| sampler.select(&x, dim, seed, &mut |_, _| {}).unwrap());
            prop_assert_eq!(&again, &picks);
        }
        if ratio < 1.0 {
            // The first pick maximises the mean distance to the start points (up to rounding).
            let reduced = project(&x, dim, &random_projection(dim, 16, seed), 16);
            let starts = start_points(n, 10.min(n), seed);
            let row = |i: usize| &reduced[i * 16..(i + 1) * 16];
            let mean = |i: usize| {
                starts.iter().map(|&s| euclid(row(i), row(s))).sum::<f64>() / starts.len() as f64
            };
            let best = (0..n).map(mean).fold(f64::MIN, f64::max);
            let scale = reduced.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
            prop_assert!(mean(picks[0]) >= best - 1e-3 * scale.max(1.0));
        }
    }

    #[test]
    fn every_pick_is_the_farthest_row(
        (x, dim) in (1usize..5, 2usize..80).prop_flat_map(|(dim, n)| {
            (proptest::collection::vec(-10f32..10.0, n * dim), Just(dim))
        }),
        start in any::<prop::sample::Index>(),
        take in any::<prop::sample::Index>(),
    ) {
        let n = x.len() / dim;
        let start = start.index(n);
        let count = 1 + take.index(n);
        let picks = greedy_select(&x, dim, &[start], count, &mut |_, _| {});
        let row = |i: usize| &x[i * dim..(i + 1) * dim];
        let scale = x.iter().fold(1f64, |a, &v| a.max(f64::from(v).abs()));
        // d_i = min(distance to the start point, distances to the rows picked so far).
        let mut d: Vec<f64> = (0..n).map(|i| euclid(row(i), row(start))).collect();
        let mut picked = vec![false; n];
        for &p in &picks {
            let best = (0..n).filter(|&i| !picked[i]).map(|i| d[i]).fold(f64::MIN, f64::max);
            prop_assert!(!picked[p]);
            prop_assert!(d[p] >= best - 1e-3 * scale, "pick {} at {} < max {}", p, d[p], best);
            picked[p] = true;
            for (i, di) in d.iter_mut().enumerate() {
                *di = di.min(euclid(row(i), row(p)));
            }
        }
    }
}
