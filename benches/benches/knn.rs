//! Exact k-NN search: 784 queries × 1024 dimensions against a 16,384 × 1024 bank, k = 1.
//!
//! 784 queries are one 224 × 224 image's 28 × 28 patch embeddings; the throughput is reported in
//! GFLOP/s of the underlying matrix product (2 · queries · bank · dim flops per search).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use patchcore_knn::{ExactConfig, IndexSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const QUERIES: usize = 784;
const BANK: usize = 16_384;
const DIM: usize = 1024;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6b6e6e);
    let bank: Vec<f32> = (0..BANK * DIM)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let queries: Vec<f32> = (0..QUERIES * DIM)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let index = IndexSpec::Exact(ExactConfig::default())
        .build(&bank, DIM)
        .expect("valid bank");
    let flops = 2 * QUERIES * BANK * DIM;
    let mut group = c.benchmark_group("knn");
    group
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(2))
        .measurement_time(std::time::Duration::from_secs(10));
    // Criterion's element throughput is flops here, so "elem/s" reads as FLOP/s.
    group.throughput(Throughput::Elements(flops as u64));
    group.bench_function("exact_784x1024_vs_16384_k1", |b| {
        b.iter(|| {
            index
                .search(std::hint::black_box(&queries), 1)
                .expect("search")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
