//! Patch embedding and anomaly-map construction at the Lite0 demo's shapes.
//!
//! Embedding: taps `_blocks.4` (40 × 28 × 28) and `_blocks.10` (112 × 14 × 14) → 784 rows of 1024 per image, as in
//! `cargo xtask demo`. Segmentation: a 28 × 28 patch-score grid → 224 × 224 map with σ = 4.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array3, Array4};
use patchcore_patch::{EmbedConfig, Embedder};
use patchcore_segmentation::{SegmentationConfig, Segmentor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: (usize, usize, usize, usize), rng: &mut ChaCha8Rng) -> Array4<f32> {
    Array4::from_shape_simple_fn(shape, || rng.random_range(-5.0..5.0))
}

fn embedding(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let embedder = Embedder::new(EmbedConfig::inspection()).expect("valid config");
    let mut group = c.benchmark_group("embedding");
    group.sample_size(20);
    for batch in [1usize, 8] {
        let a = random((batch, 40, 28, 28), &mut rng);
        let b = random((batch, 112, 14, 14), &mut rng);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("lite0_taps", batch), &batch, |bench, _| {
            bench.iter(|| embedder.embed(&[a.view(), b.view()]).expect("embedding"))
        });
    }
    group.finish();

    let seg = Segmentor::new(SegmentationConfig::inspection(), (224, 224)).expect("valid config");
    let grids = Array3::from_shape_simple_fn((8, 28, 28), || rng.random_range(0.0..1e4f32));
    let mut group = c.benchmark_group("segmentation");
    group.throughput(Throughput::Elements(8));
    group.bench_function("28x28_to_224x224_sigma4_batch8", |bench| {
        bench.iter(|| seg.segment(grids.view()).expect("maps"))
    });
    group.finish();
}

criterion_group!(benches, embedding);
criterion_main!(benches);
