//! EfficientNet-Lite0 forward pass up to `_blocks.10` (the PatchCore default taps) at 224 × 224.
//!
//! Needs the real weights: set `PATCHCORE_LITE0_WEIGHTS` to the path of
//! `efficientnet-lite0-57934424.pth`. Without it the benchmark prints a notice and measures
//! nothing.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use patchcore_backbone::{load, Arch};

fn bench(c: &mut Criterion) {
    let Some(weights) = std::env::var_os("PATCHCORE_LITE0_WEIGHTS").map(PathBuf::from) else {
        eprintln!(
            "backbone bench skipped: set PATCHCORE_LITE0_WEIGHTS to the path of \
             efficientnet-lite0-57934424.pth"
        );
        return;
    };
    let arch = Arch::EfficientNetLite0;
    let device = Device::Cpu;
    let model = match load(arch, &weights, &arch.default_taps(), &device) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("backbone bench skipped: {e}");
            return;
        }
    };
    let size = arch.native_input_size();
    let mut group = c.benchmark_group("efficientnet-lite0 to _blocks.10, 224x224");
    for batch in [1usize, 8] {
        let Ok(x) = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &device) else {
            eprintln!("backbone bench: cannot build the input");
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
