//! Golden parity with the original's FAISS `IndexFlatL2` search (k = 1) on the lite0 fixture.

use patchcore_knn::{ExactConfig, IndexSpec};
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/lite0_search.safetensors"
);

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v, t.shape().to_vec())
}

fn i64s(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn matches_faiss_index_flat_l2() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (bank, bank_shape) = f32s(&st, "memory_bank");
    let (queries, query_shape) = f32s(&st, "queries");
    let (want_d, _) = f32s(&st, "nn_distances");
    let want_i = i64s(&st, "nn_indices");
    assert_eq!(bank_shape, [235, 1024]);
    assert_eq!(query_shape, [112, 1024]);
    let dim = bank_shape[1];

    let mut specs = vec![
        IndexSpec::Exact(ExactConfig {
            threads: None,
            ..ExactConfig::default()
        }),
        IndexSpec::Exact(ExactConfig {
            threads: Some(1),
            ..ExactConfig::default()
        }),
    ];
    if cfg!(feature = "faiss") {
        specs.push(IndexSpec::FaissFlat(patchcore_knn::FaissFlatConfig {
            threads: Some(1),
        }));
    }
    for spec in specs {
        let index = spec.build(&bank, dim).unwrap();
        let found = index.search(&queries, 1).unwrap();
        let max_abs = want_d.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let max_err = found
            .distances()
            .iter()
            .zip(&want_d)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        let rel = max_err / max_abs;
        println!("{spec:?}: max |Δd| = {max_err:e}, relative {rel:e} (max {max_abs})");
        assert!(rel <= 1e-4, "relative distance error {rel:e}");
        let mut differing = 0;
        for (q, (&got, &want)) in found.indices().iter().zip(&want_i).enumerate() {
            if i64::from(got) != want {
                differing += 1;
                // A tie: both candidates must be equally near within the tolerance.
                let exact = |j: usize| -> f64 {
                    queries[q * dim..(q + 1) * dim]
                        .iter()
                        .zip(&bank[j * dim..(j + 1) * dim])
                        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                        .sum()
                };
                let (a, b) = (exact(got as usize), exact(want as usize));
                assert!(
                    (a - b).abs() <= 1e-4 * f64::from(max_abs),
                    "query {q}: index {got} (d = {a}) vs FAISS {want} (d = {b})"
                );
            }
        }
        println!("{spec:?}: {differing} of 112 indices differ (ties)");
    }
}
