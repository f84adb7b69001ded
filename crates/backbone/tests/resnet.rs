//! Parity of the ResNet and WideResNet backbones with torchvision, and loading of torch-written files.
//!
//! The fixtures were written by `scripts/make_resnet_fixtures.py` (see its docstring for every detail):
//!
//! * `tests/data/resnet_taps.safetensors`: for each architecture, torchvision's float state-dict keys with their
//!   shapes (metadata `<arch>.keys`), and the outputs of `layer1` … `layer4` of torchvision's model on the stored
//!   (2, 3, 40, 56) `input`, with every weight given by a documented hash formula that [`formula`] evaluates here
//!   bit for bit. So the full architectures, WideResNet-50-2 and -101-2 included, are compared without storing
//!   their hundreds of megabytes of weights.
//! * `tests/data/resnet50_layer1*.{pth,safetensors}`: real `torch.save` outputs (zip and legacy serialisation) and a
//!   safetensors copy under `module.`-prefixed keys of a torch-seeded ResNet-50 cut to its stem and `layer1`, in
//!   f16, and `resnet50_layer1_taps.safetensors` with an input and torchvision's `layer1` output for those weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use patchcore_backbone::resnet::{ResNet, ResNetConfig};
use patchcore_backbone::{load, Arch, BackboneError, FeatureExtractor};

/// The relative tolerance: max |ours − reference| / max |reference|.
const TOLERANCE: f32 = 1e-4;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn taps(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The tensors and the metadata of a safetensors fixture.
fn fixture(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = data(name);
    let bytes = std::fs::read(&path).expect("the committed fixture is readable");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("valid safetensors");
    let meta = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("the fixture loads");
    (tensors, meta)
}

/// FNV-1a, 64 bits.
fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` values in [lo, hi) for `key`: the formula of `scripts/make_resnet_fixtures.py`.
fn uniform(key: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let h = fnv1a64(key);
    (1..=n as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z ^= z >> 30;
            z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z ^= z >> 27;
            z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

/// The formula weight of `key` with `shape`; `basic` says whether the blocks are basic blocks.
fn formula(key: &str, shape: &[usize], basic: bool) -> Tensor {
    let n = shape.iter().product::<usize>();
    let (lo, hi) = if shape.len() == 4 {
        let fan_in = shape[1] * shape[2] * shape[3];
        let mut a = (6.0 / fan_in as f64).sqrt();
        let last = if basic { "conv2" } else { "conv3" };
        if key.ends_with(&format!(".{last}.weight")) || key.ends_with(".downsample.0.weight") {
            a *= 0.5;
        }
        (-a, a)
    } else if key.ends_with(".running_var") {
        (0.5, 1.5)
    } else if key.ends_with(".running_mean") || key.ends_with(".bias") {
        (-0.1, 0.1)
    } else if key.ends_with(".weight") {
        (0.5, 1.0)
    } else {
        panic!("no formula for {key}");
    };
    Tensor::from_vec(uniform(key, n, lo, hi), shape, &Device::Cpu).unwrap()
}

/// The formula state dict for the given keys and shapes.
fn formula_state_dict(keys: &[(String, Vec<usize>)], basic: bool) -> HashMap<String, Tensor> {
    keys.iter()
        .map(|(k, s)| (k.clone(), formula(k, s, basic)))
        .collect()
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
    assert!(max_ref > 0.0);
    max_diff / max_ref
}

/// Every tap of `arch` with the formula weights against torchvision's outputs.
fn check_formula_parity(arch: Arch) {
    let (fx, meta) = fixture("resnet_taps.safetensors");
    let stored: Vec<(String, Vec<usize>)> =
        serde_json::from_str(&meta[&format!("{arch}.keys")]).unwrap();
    let config = ResNetConfig::for_arch(arch).unwrap();
    // Our list of the weights the four stages need is exactly torchvision's state dict (without fc and the
    // batch-norm counters), in the same order.
    assert_eq!(config.weight_shapes(4), stored, "{arch}: state-dict keys");
    let basic = config.block == patchcore_backbone::resnet::BlockKind::Basic;
    let weights = formula_state_dict(&stored, basic);
    let all = taps(&["layer1", "layer2", "layer3", "layer4"]);
    let model =
        ResNet::from_state_dict(config, weights, Path::new("formula"), &all, &Device::Cpu).unwrap();
    let out = model.extract(&fx["input"]).unwrap();
    let mut report = Vec::new();
    for (tap, y) in all.iter().zip(&out) {
        let reference = &fx[&format!("{arch}.{tap}")];
        let err = relative_error(y, reference);
        report.push(format!("{tap} {err:.2e}"));
        assert!(err < TOLERANCE, "{arch} {tap}: relative error {err}");
    }
    println!("parity {arch}: {}", report.join(", "));
}

#[test]
fn resnet18_matches_torchvision() {
    check_formula_parity(Arch::ResNet18);
}

#[test]
fn resnet34_matches_torchvision() {
    check_formula_parity(Arch::ResNet34);
}

#[test]
fn resnet50_matches_torchvision() {
    check_formula_parity(Arch::ResNet50);
}

#[test]
fn resnet101_matches_torchvision() {
    check_formula_parity(Arch::ResNet101);
}

#[test]
fn resnet152_matches_torchvision() {
    check_formula_parity(Arch::ResNet152);
}

#[test]
fn wide_resnet50_2_matches_torchvision() {
    check_formula_parity(Arch::WideResNet50_2);
}

#[test]
fn wide_resnet101_2_matches_torchvision() {
    check_formula_parity(Arch::WideResNet101_2);
}

#[test]
fn the_formula_reproduces_numpy_bit_for_bit() {
    // The bits of the generator's `uniform("conv1.weight", 3, -1.0, 1.0)` under numpy.
    let v = uniform("conv1.weight", 3, -1.0, 1.0);
    let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
    assert_eq!(bits, [0x3db8_a080, 0x3efb_0bac, 0xbf74_439c]);
    assert_ne!(v, uniform("bn1.weight", 3, -1.0, 1.0));
    assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
}

/// The layer1 output of the torch-seeded ResNet-50 loaded from `file`.
fn layer1_from(file: &str) -> (Tensor, Tensor) {
    let (fx, _) = fixture("resnet50_layer1_taps.safetensors");
    let model = load(
        Arch::ResNet50,
        &data(file),
        &taps(&["layer1"]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.tap_channels(), vec![256]);
    assert_eq!(model.tap_strides(), vec![4]);
    let out = model.extract(&fx["input"]).unwrap();
    (out[0].clone(), fx["layer1"].clone())
}

#[test]
fn torch_written_files_load_in_every_format() {
    let (zip, reference) = layer1_from("resnet50_layer1.pth");
    let err = relative_error(&zip, &reference);
    println!("parity resnet50 layer1 (torch-seeded, zip .pth): {err:.2e}");
    assert!(err < TOLERANCE, "zip: {err}");
    for file in [
        "resnet50_layer1_legacy.pth",
        "resnet50_layer1_module.safetensors",
    ] {
        let (y, _) = layer1_from(file);
        // The same tensors in another container give the same bits.
        let diff = (&y - &zip)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{file}");
    }
}

#[test]
fn the_torch_files_hold_what_torchvision_wrote() {
    let zip =
        patchcore_backbone::read_state_dict(&data("resnet50_layer1.pth"), &Device::Cpu).unwrap();
    let legacy =
        patchcore_backbone::read_state_dict(&data("resnet50_layer1_legacy.pth"), &Device::Cpu)
            .unwrap();
    let st = patchcore_backbone::read_state_dict(
        &data("resnet50_layer1_module.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // torch's order; the safetensors file comes out sorted, with `module.` stripped.
    assert_eq!(zip[0].0, "conv1.weight");
    assert_eq!(zip[0].1.dims(), &[64, 3, 7, 7]);
    assert_eq!(zip[0].1.dtype(), DType::F16);
    let names = |v: &[(String, Tensor)]| {
        let mut n: Vec<String> = v.iter().map(|(k, _)| k.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&zip), names(&legacy));
    assert_eq!(names(&zip), names(&st));
    assert!(names(&zip).contains(&"layer1.0.downsample.1.num_batches_tracked".to_string()));
}

#[test]
fn only_stages_up_to_the_deepest_tap_are_needed() {
    // The file holds the stem and layer1 only: layer1 works, layer2 names the first missing weight.
    let model = ResNet::load(
        Arch::ResNet50,
        &data("resnet50_layer1.pth"),
        &taps(&["layer1"]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.num_stages_built(), 1);
    let err = load(
        Arch::ResNet50,
        &data("resnet50_layer1.pth"),
        &taps(&["layer1", "layer2"]),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    match &err {
        BackboneError::MissingWeight { key, expected, .. } => {
            assert_eq!(key, "layer2.0.conv1.weight");
            assert_eq!(expected, &[128, 256, 1, 1]);
        }
        other => panic!("unexpected error {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("resnet50_layer1.pth") && msg.contains("layer2.0.conv1.weight"));
    // The wrong architecture for the file: ResNet-18's layer1 has no conv3 and other shapes.
    let err = load(
        Arch::ResNet18,
        &data("resnet50_layer1.pth"),
        &taps(&["layer1"]),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, BackboneError::ShapeMismatch { key, expected, got, .. }
            if key == "layer1.0.conv1.weight" && expected == &[64, 64, 3, 3] && got == &[64, 64, 1, 1]),
        "{err}"
    );
}

#[test]
fn missing_and_misshapen_weights_name_the_key_and_both_shapes() {
    let config = ResNetConfig::for_arch(Arch::ResNet18).unwrap();
    let keys = config.weight_shapes(2);
    let mut w = formula_state_dict(&keys, true);
    w.insert(
        "layer2.0.downsample.1.running_var".to_string(),
        Tensor::zeros(127, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = ResNet::from_state_dict(
        config.clone(),
        w.clone(),
        Path::new("w.safetensors"),
        &taps(&["layer2"]),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(&err, BackboneError::ShapeMismatch { key, expected, got, .. }
            if key == "layer2.0.downsample.1.running_var" && expected == &[128] && got == &[127]),
        "{msg}"
    );
    assert!(msg.contains("w.safetensors") && msg.contains("[127]") && msg.contains("[128]"));
    w.remove("layer2.0.downsample.1.running_var");
    let err = ResNet::from_state_dict(
        config,
        w,
        Path::new("w.safetensors"),
        &taps(&["layer2"]),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, BackboneError::MissingWeight { key, expected, .. }
            if key == "layer2.0.downsample.1.running_var" && expected == &[128]),
        "{err}"
    );
}

#[test]
fn taps_come_back_in_the_requested_order_and_bad_requests_are_errors() {
    let (fx, _) = fixture("resnet_taps.safetensors");
    let config = ResNetConfig::for_arch(Arch::ResNet18).unwrap();
    let w = formula_state_dict(&config.weight_shapes(3), true);
    let order = taps(&["layer3", "layer1"]);
    let model = ResNet::from_state_dict(
        config.clone(),
        w.clone(),
        Path::new("formula"),
        &order,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.num_stages_built(), 3);
    assert_eq!(model.taps(), order.as_slice());
    assert_eq!(model.tap_channels(), vec![256, 64]);
    assert_eq!(model.tap_strides(), vec![16, 4]);
    let out = model.extract(&fx["input"]).unwrap();
    assert!(relative_error(&out[0], &fx["resnet18.layer3"]) < TOLERANCE);
    assert!(relative_error(&out[1], &fx["resnet18.layer1"]) < TOLERANCE);

    let build = |t: &[&str]| {
        ResNet::from_state_dict(
            config.clone(),
            w.clone(),
            Path::new("formula"),
            &taps(t),
            &Device::Cpu,
        )
    };
    assert!(matches!(build(&[]), Err(BackboneError::NoTaps)));
    assert!(matches!(
        build(&["layer1", "layer1"]),
        Err(BackboneError::DuplicateTap(t)) if t == "layer1"
    ));
    let err = build(&["layer5"]).err().unwrap();
    assert!(matches!(&err, BackboneError::UnknownTap { tap, .. } if tap == "layer5"));
    assert!(err.to_string().contains("layer1, layer2, layer3, layer4"));
    // Tap errors come before the checkpoint is read.
    assert!(matches!(
        load(
            Arch::WideResNet50_2,
            Path::new("/nonexistent.pth"),
            &taps(&["_blocks.4"]),
            &Device::Cpu
        ),
        Err(BackboneError::UnknownTap { .. })
    ));

    // Inputs of the wrong rank, channel count or type are errors, tiny images are fine.
    for bad in [
        Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 3, 8, 8), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros((0, 3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    ] {
        assert!(matches!(
            model.extract(&bad),
            Err(BackboneError::InvalidInput { .. })
        ));
    }
    let tiny = model
        .extract(&Tensor::ones((1, 3, 1, 1), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(tiny[0].dims(), &[1, 256, 1, 1]);
}

#[test]
fn batches_equal_single_images() {
    let (fx, _) = fixture("resnet_taps.safetensors");
    let config = ResNetConfig::for_arch(Arch::ResNet34).unwrap();
    let w = formula_state_dict(&config.weight_shapes(2), true);
    let model = ResNet::from_state_dict(
        config,
        w,
        Path::new("formula"),
        &taps(&["layer2"]),
        &Device::Cpu,
    )
    .unwrap();
    let x = &fx["input"];
    let both = model.extract(x).unwrap();
    for i in 0..2 {
        let alone = model.extract(&x.narrow(0, i, 1).unwrap()).unwrap();
        let err = relative_error(&both[0].narrow(0, i, 1).unwrap(), &alone[0]);
        assert!(err < 1e-6, "image {i}: {err}");
    }
}
