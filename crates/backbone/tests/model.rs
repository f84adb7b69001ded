//! The EfficientNet-Lite model on synthetic weights: structure, truncation and error reporting.
//!
//! A deterministic pseudo-random state dict with the reference model's keys is written to a
//! safetensors file. The model's output is compared with an independent reference forward pass
//! written here with plain candle ops (unfolded batch norm, candle's grouped convolution), so the
//! batch-norm folding, the padding and the block wiring are checked without the real weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use patchcore_backbone::efficientnet::{BlockConfig, EfficientNetLite, EfficientNetLiteConfig};
use patchcore_backbone::ops::Padding2d;
use patchcore_backbone::{file_sha256, load, Arch, BackboneError};

/// A xorshift generator, so the synthetic weights are the same on every run.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn add_conv_bn(
    map: &mut HashMap<String, Tensor>,
    rng: &mut Rng,
    conv: &str,
    bn: &str,
    shape: [usize; 4],
) {
    let fan_in = (shape[1] * shape[2] * shape[3]) as f32;
    let a = (3.0 / fan_in).sqrt();
    map.insert(format!("{conv}.weight"), rng.tensor(&shape, -a, a));
    let c = shape[0];
    map.insert(format!("{bn}.weight"), rng.tensor(&[c], 0.5, 1.5));
    map.insert(format!("{bn}.bias"), rng.tensor(&[c], -0.5, 0.5));
    map.insert(format!("{bn}.running_mean"), rng.tensor(&[c], -0.5, 0.5));
    map.insert(format!("{bn}.running_var"), rng.tensor(&[c], 0.5, 1.5));
    map.insert(
        format!("{bn}.num_batches_tracked"),
        Tensor::new(7i64, &Device::Cpu).unwrap(),
    );
}

/// Synthetic weights for the stem and blocks `0..n_blocks` of a configuration.
fn synthetic_state_dict(cfg: &EfficientNetLiteConfig, n_blocks: usize) -> HashMap<String, Tensor> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut map = HashMap::new();
    add_conv_bn(
        &mut map,
        &mut rng,
        "_conv_stem",
        "_bn0",
        [cfg.stem_channels, 3, 3, 3],
    );
    for (i, b) in cfg.blocks().iter().take(n_blocks).enumerate() {
        let p = format!("_blocks.{i}");
        let mid = b.expanded_filters();
        if b.expand_ratio != 1 {
            add_conv_bn(
                &mut map,
                &mut rng,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                [mid, b.input_filters, 1, 1],
            );
        }
        add_conv_bn(
            &mut map,
            &mut rng,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            [mid, 1, b.kernel_size, b.kernel_size],
        );
        add_conv_bn(
            &mut map,
            &mut rng,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            [b.output_filters, mid, 1, 1],
        );
    }
    map
}

fn save(dir: &Path, name: &str, map: &HashMap<String, Tensor>) -> PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(map, &p).unwrap();
    p
}

fn taps(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Conv (with "same" padding and `groups`), unfolded batch norm, optional ReLU6.
fn ref_conv_bn(
    w: &HashMap<String, Tensor>,
    x: &Tensor,
    conv: &str,
    bn: &str,
    stride: usize,
    groups: usize,
    relu6: bool,
) -> Tensor {
    let weight = &w[&format!("{conv}.weight")];
    let k = weight.dim(2).unwrap();
    let (_, _, h, wd) = x.dims4().unwrap();
    let p = Padding2d::same(h, wd, k, stride);
    let x = x
        .pad_with_zeros(2, p.top, p.bottom)
        .unwrap()
        .pad_with_zeros(3, p.left, p.right)
        .unwrap();
    let y = x.conv2d(weight, 0, stride, 1, groups).unwrap();
    let c = y.dim(1).unwrap();
    let v = |n: &str| w[&format!("{bn}.{n}")].reshape((1, c, 1, 1)).unwrap();
    let y = y
        .broadcast_sub(&v("running_mean"))
        .unwrap()
        .broadcast_div(&(v("running_var") + 1e-3).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&v("weight"))
        .unwrap()
        .broadcast_add(&v("bias"))
        .unwrap();
    if relu6 {
        y.clamp(0f32, 6f32).unwrap()
    } else {
        y
    }
}

/// The reference forward pass; returns the stem output and every block's output.
fn reference_forward(
    cfg: &EfficientNetLiteConfig,
    w: &HashMap<String, Tensor>,
    x: &Tensor,
    n_blocks: usize,
) -> Vec<Tensor> {
    let mut outs = Vec::new();
    let mut h = ref_conv_bn(w, x, "_conv_stem", "_bn0", 2, 1, true);
    outs.push(h.clone());
    let blocks: Vec<BlockConfig> = cfg.blocks();
    for (i, b) in blocks.iter().take(n_blocks).enumerate() {
        let p = format!("_blocks.{i}");
        let input = h.clone();
        let mut y = h.clone();
        if b.expand_ratio != 1 {
            y = ref_conv_bn(
                w,
                &y,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                1,
                1,
                true,
            );
        }
        y = ref_conv_bn(
            w,
            &y,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            b.stride,
            b.expanded_filters(),
            true,
        );
        y = ref_conv_bn(
            w,
            &y,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            1,
            1,
            false,
        );
        if b.stride == 1 && b.input_filters == b.output_filters {
            y = (y + input).unwrap();
        }
        h = y;
        outs.push(h.clone());
    }
    outs
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m
}

#[test]
fn lite0_matches_an_unfolded_reference_at_odd_sizes() {
    let cfg = EfficientNetLiteConfig::lite0();
    let w = synthetic_state_dict(&cfg, 6);
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "lite0_partial.safetensors", &w);
    let tap_names = taps(&["_blocks.5", "_bn0", "_blocks.2", "_blocks.0"]);
    let model = load(Arch::EfficientNetLite0, &path, &tap_names, &Device::Cpu).unwrap();
    assert_eq!(model.tap_channels(), vec![80, 32, 24, 16]);
    assert_eq!(model.tap_strides(), vec![16, 2, 4, 2]);

    let mut rng = Rng(42);
    // A batch of two at an odd, non-square size, so padding is asymmetric and inputs differ.
    let x = rng.tensor(&[2, 3, 37, 50], -2.0, 2.0);
    let ours = model.extract(&x).unwrap();
    let reference = reference_forward(&cfg, &w, &x, 6);
    let expected = [&reference[6], &reference[0], &reference[3], &reference[1]];
    for ((o, r), name) in ours.iter().zip(expected).zip(&tap_names) {
        assert_eq!(o.dims(), r.dims(), "{name}");
        let e = rel_err(o, r);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
    // Spatial sizes are ceil(size / stride).
    assert_eq!(ours[0].dims(), &[2, 80, 3, 4]);
    assert_eq!(ours[1].dims(), &[2, 32, 19, 25]);
}

#[test]
fn large_cpu_batches_are_split_into_sub_batches_transparently() {
    // At 224 × 224 one Lite0 image peaks at 96 × 112 × 112 floats (4.8 MB), so a batch of four
    // runs as sub-batches of three and one. The result must equal image-by-image runs.
    let cfg = EfficientNetLiteConfig::lite0();
    let w = synthetic_state_dict(&cfg, 3);
    let model = EfficientNetLite::from_state_dict(
        cfg,
        w,
        Path::new("synthetic"),
        &taps(&["_blocks.2", "_bn0"]),
        &Device::Cpu,
    )
    .unwrap();
    let x = Rng(5).tensor(&[4, 3, 224, 224], -2.0, 2.0);
    let batched = model.forward_taps(&x).unwrap();
    assert_eq!(batched[0].dims(), &[4, 24, 56, 56]);
    assert_eq!(batched[1].dims(), &[4, 32, 112, 112]);
    for i in 0..4 {
        let single = model.forward_taps(&x.narrow(0, i, 1).unwrap()).unwrap();
        for (b, s) in batched.iter().zip(&single) {
            assert!(rel_err(&b.narrow(0, i, 1).unwrap(), s) < 1e-6);
        }
    }
}

#[test]
fn only_blocks_up_to_the_deepest_tap_are_built_and_required() {
    let cfg = EfficientNetLiteConfig::lite0();
    // Weights only up to `_blocks.2`.
    let w = synthetic_state_dict(&cfg, 3);
    let m = EfficientNetLite::from_state_dict(
        cfg.clone(),
        w.clone(),
        Path::new("synthetic"),
        &taps(&["_blocks.2"]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.num_blocks_built(), 3);
    let m = EfficientNetLite::from_state_dict(
        cfg.clone(),
        w.clone(),
        Path::new("synthetic"),
        &taps(&["_bn0"]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.num_blocks_built(), 0);

    // One block deeper needs weights the file lacks.
    let err = EfficientNetLite::from_state_dict(
        cfg,
        w,
        Path::new("synthetic.pth"),
        &taps(&["_blocks.3"]),
        &Device::Cpu,
    )
    .unwrap_err();
    match &err {
        BackboneError::MissingWeight {
            key,
            expected,
            path,
            ..
        } => {
            assert_eq!(key, "_blocks.3._expand_conv.weight");
            assert_eq!(expected, &[144, 24, 1, 1]);
            assert_eq!(path, Path::new("synthetic.pth"));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("_blocks.3._expand_conv.weight") && msg.contains("[144, 24, 1, 1]"));
}

#[test]
fn wrong_shapes_are_reported_with_key_and_both_shapes() {
    let cfg = EfficientNetLiteConfig::lite0();
    let mut w = synthetic_state_dict(&cfg, 3);
    w.insert(
        "_blocks.1._bn1.running_var".into(),
        Tensor::ones(95, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "bad.safetensors", &w);
    let err = load(
        Arch::EfficientNetLite0,
        &path,
        &taps(&["_blocks.2"]),
        &Device::Cpu,
    )
    .unwrap_err();
    match &err {
        BackboneError::ShapeMismatch {
            key, expected, got, ..
        } => {
            assert_eq!(key, "_blocks.1._bn1.running_var");
            assert_eq!(expected, &[96]);
            assert_eq!(got, &[95]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("bad.safetensors"));
}

#[test]
fn bad_taps_and_inputs_are_errors() {
    let cfg = EfficientNetLiteConfig::lite0();
    let w = synthetic_state_dict(&cfg, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "w.safetensors", &w);
    let lite0 = Arch::EfficientNetLite0;

    match load(lite0, &path, &taps(&["_blocks.16"]), &Device::Cpu).unwrap_err() {
        BackboneError::UnknownTap { tap, valid, arch } => {
            assert_eq!(tap, "_blocks.16");
            assert_eq!(arch, lite0);
            assert_eq!(valid.len(), 17);
            assert_eq!(valid[0], "_bn0");
            assert_eq!(valid[16], "_blocks.15");
        }
        other => panic!("{other:?}"),
    }
    let msg = load(lite0, &path, &taps(&["layer2"]), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("layer2") && msg.contains("_blocks.10"),
        "{msg}"
    );
    assert!(matches!(
        load(lite0, &path, &[], &Device::Cpu),
        Err(BackboneError::NoTaps)
    ));
    assert!(matches!(
        load(lite0, &path, &taps(&["_blocks.0", "_blocks.0"]), &Device::Cpu),
        Err(BackboneError::DuplicateTap(t)) if t == "_blocks.0"
    ));
    // Tap errors come before the file is even opened.
    assert!(matches!(
        load(
            lite0,
            Path::new("/nonexistent.pth"),
            &taps(&["x"]),
            &Device::Cpu
        ),
        Err(BackboneError::UnknownTap { .. })
    ));
    assert!(matches!(
        load(
            lite0,
            Path::new("/nonexistent.pth"),
            &taps(&["_bn0"]),
            &Device::Cpu
        ),
        Err(BackboneError::Io { .. })
    ));

    let model = load(lite0, &path, &taps(&["_blocks.0"]), &Device::Cpu).unwrap();
    for x in [
        Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((3, 16, 16), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 3, 16, 16), DType::U8, &Device::Cpu).unwrap(),
        Tensor::zeros((0, 3, 16, 16), DType::F32, &Device::Cpu).unwrap(),
    ] {
        assert!(matches!(
            model.extract(&x),
            Err(BackboneError::InvalidInput { .. })
        ));
    }
    // Tiny inputs still work: 1 × 1 pixel gives 1 × 1 maps.
    let y = model
        .extract(&Tensor::ones((1, 3, 1, 1), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(y[0].dims(), &[1, 16, 1, 1]);
}

#[test]
fn every_preset_builds_with_its_default_taps() {
    for arch in Arch::EFFICIENTNET_LITE {
        let cfg = EfficientNetLiteConfig::for_arch(arch).unwrap();
        let default = arch.default_taps();
        let deepest: usize = default
            .iter()
            .filter_map(|t| t.strip_prefix("_blocks.")?.parse().ok())
            .max()
            .unwrap();
        let w = synthetic_state_dict(&cfg, deepest + 1);
        let m = EfficientNetLite::from_state_dict(
            cfg.clone(),
            w,
            Path::new("synthetic"),
            &default,
            &Device::Cpu,
        )
        .unwrap();
        use patchcore_backbone::FeatureExtractor;
        assert_eq!(m.tap_strides(), vec![8, 16], "{arch}");
        let x = Tensor::zeros((1, 3, 48, 48), DType::F32, &Device::Cpu).unwrap();
        let out = m.extract(&x).unwrap();
        let channels = m.tap_channels();
        assert_eq!(out[0].dims(), &[1, channels[0], 6, 6], "{arch}");
        assert_eq!(out[1].dims(), &[1, channels[1], 3, 3], "{arch}");
    }
    // Facts of the scaled presets (from round_filters and round_repeats of the reference).
    assert_eq!(
        Arch::EfficientNetLite4.default_taps(),
        ["_blocks.8", "_blocks.20"]
    );
    assert_eq!(
        Arch::EfficientNetLite2.default_taps(),
        ["_blocks.6", "_blocks.14"]
    );
}

#[test]
fn serde_names_and_sha256() {
    assert_eq!(
        serde_json::to_string(&Arch::EfficientNetLite0).unwrap(),
        "\"efficientnet-lite0\""
    );
    let a: Arch = serde_json::from_str("\"efficientnet-lite3\"").unwrap();
    assert_eq!(a, Arch::EfficientNetLite3);
    let n = serde_json::to_string(&a.normalization()).unwrap();
    assert!(n.contains("\"mean\"") && n.contains("\"std\""));

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("abc");
    std::fs::write(&p, b"abc").unwrap();
    assert_eq!(
        file_sha256(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(matches!(
        file_sha256(&dir.path().join("missing")),
        Err(BackboneError::Io { .. })
    ));
}
