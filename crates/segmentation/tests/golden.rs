//! Parity with the original implementation's anomaly maps on real patch scores.
//!
//! `tests/data/lite0_maps.safetensors` was cut from the reference goldens by `scripts/make_fixtures.py`. The
//! original computed them like this (patchcore-inspection `RescaleSegmentor`, PyTorch CPU, scipy):
//!
//! ```python
//! scores = torch.from_numpy(test_patch_scores).unsqueeze(1)                  # (2, 1, 28, 28)
//! up = F.interpolate(scores, size=224, mode="bilinear", align_corners=False).squeeze(1).numpy()
//! test_anomaly_maps = [scipy.ndimage.gaussian_filter(m, sigma=4) for m in up]   # truncate 4, mode reflect
//! ```

use ndarray::Array3;
use patchcore_segmentation::{SegmentationConfig, Segmentor};
use safetensors::SafeTensors;

fn tensor(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

#[test]
fn anomaly_maps_match_original() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/lite0_maps.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ps, scores) = tensor(&st, "patch_scores");
    let (ms, maps) = tensor(&st, "anomaly_maps");
    let scores = Array3::from_shape_vec((ps[0], ps[1], ps[2]), scores).unwrap();
    let seg = Segmentor::new(SegmentationConfig::inspection(), (ms[1], ms[2])).unwrap();
    let got = seg.segment(scores.view()).unwrap();
    assert_eq!(got.dim(), (ms[0], ms[1], ms[2]));
    let max_abs = maps.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_err = got
        .iter()
        .zip(&maps)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    println!(
        "anomaly map max abs error {max_err:e}, relative {:e}",
        max_err / max_abs
    );
    assert!(
        max_err / max_abs < 1e-4,
        "relative error {}",
        max_err / max_abs
    );
}
