//! WideResNet-50-2 forward pass up to `layer3` (the PatchCore default taps `layer2` + `layer3`) at 224 × 224.
//!
//! With `PATCHCORE_WRN50_WEIGHTS` pointing at a WideResNet-50-2 checkpoint (torchvision `.pth` or safetensors) the
//! real weights are used; otherwise the model is built from deterministic pseudo-random weights of the same shapes,
//! which costs the same: the forward pass does the same work whatever the values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use patchcore_backbone::resnet::{ResNet, ResNetConfig};
use patchcore_backbone::{load, Arch, FeatureExtractor};

/// Pseudo-random weights of the right shapes: He-uniform convolutions and batch norms near identity.
fn synthetic_weights(config: &ResNetConfig) -> HashMap<String, Tensor> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    config
        .weight_shapes(3)
        .into_iter()
        .map(|(key, shape)| {
            let n: usize = shape.iter().product();
            let (lo, hi) = if shape.len() == 4 {
                let a = (6.0 / (shape[1] * shape[2] * shape[3]) as f32).sqrt();
                (-a, a)
            } else if key.ends_with("running_var") || key.ends_with(".weight") {
                (0.5, 1.0)
            } else {
                (-0.1, 0.1)
            };
            let v: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * next()).collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the data");
            (key, t)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let arch = Arch::WideResNet50_2;
    let device = Device::Cpu;
    let taps = arch.default_taps();
    let model: Box<dyn FeatureExtractor> = match std::env::var_os("PATCHCORE_WRN50_WEIGHTS") {
        Some(p) => match load(arch, &PathBuf::from(p), &taps, &device) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("resnet bench skipped: {e}");
                return;
            }
        },
        None => {
            let Some(config) = ResNetConfig::for_arch(arch) else {
                return;
            };
            let w = synthetic_weights(&config);
            match ResNet::from_state_dict(config, w, Path::new("synthetic"), &taps, &device) {
                Ok(m) => Box::new(m),
                Err(e) => {
                    eprintln!("resnet bench skipped: {e}");
                    return;
                }
            }
        }
    };
    let mut group = c.benchmark_group("wide_resnet50_2 to layer3, 224x224");
    for batch in [1usize, 8] {
        let Ok(x) = Tensor::randn(0f32, 1f32, (batch, 3, 224, 224), &device) else {
            eprintln!("resnet bench: cannot build the input");
            return;
        };
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("batch", batch), &x, |b, x| {
            b.iter(|| model.extract(x).map(|taps| taps.len()).unwrap_or(0))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
