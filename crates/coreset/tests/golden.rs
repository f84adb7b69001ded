//! Golden parity with the original's approximate greedy coreset on the lite0 fixture.

use patchcore_coreset::{coreset_size, greedy_select, project};
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/lite0_coreset.safetensors"
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

fn indices(st: &SafeTensors<'_>, name: &str) -> Vec<usize> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| usize::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
        .collect()
}

#[test]
fn greedy_select_reproduces_the_original_picks() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (reduced, shape) = f32s(&st, "reduced");
    assert_eq!(shape, [2352, 128]);
    let starts = indices(&st, "start_points");
    let want = indices(&st, "coreset_indices");
    assert_eq!(coreset_size(2352, 0.1), want.len());

    let mut calls = Vec::new();
    let picks = greedy_select(&reduced, 128, &starts, want.len(), &mut |done, total| {
        calls.push((done, total))
    });
    let first_difference = picks.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "picks differ from the original");
    assert_eq!(picks, want);
    assert_eq!(calls.len(), want.len());
    assert_eq!(calls.last(), Some(&(235, 235)));

    // The same picks on one thread and on three.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let again =
            pool.install(|| greedy_select(&reduced, 128, &starts, want.len(), &mut |_, _| {}));
        assert_eq!(again, want, "{threads} threads");
    }
}

#[test]
fn project_matches_the_original_projection() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (projection, pshape) = f32s(&st, "projection");
    assert_eq!(pshape, [128, 1024]);
    let (embedding, eshape) = f32s(&st, "sample_embedding");
    let (want, wshape) = f32s(&st, "sample_reduced");
    assert_eq!(eshape[1], 1024);
    assert_eq!(wshape, [eshape[0], 128]);
    let rows = indices(&st, "sample_rows");
    let (reduced, _) = f32s(&st, "reduced");

    let got = project(&embedding, 1024, &projection, 128);
    let max_abs = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let max_err = got
        .iter()
        .zip(&want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    let rel = max_err / max_abs;
    println!("project: max |Δ| = {max_err:e}, relative {rel:e} (max {max_abs})");
    assert!(rel <= 1e-4, "relative projection error {rel:e}");
    // The sample rows are rows of the full reduced matrix.
    for (s, &r) in rows.iter().enumerate() {
        assert_eq!(
            &reduced[r * 128..(r + 1) * 128],
            &want[s * 128..(s + 1) * 128]
        );
    }
}
