//! Coreset subsampling of N = 100,000 features of 1024 dimensions: the random projection to 128
//! dimensions, and the 1 % approximate greedy selection (1,000 picks) on the projected features.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use patchcore_coreset::{coreset_size, greedy_select, project, random_projection, start_points};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 100_000;
const DIM: usize = 1024;
const OUT: usize = 128;
const RATIO: f64 = 0.01;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0de);
    let features: Vec<f32> = (0..N * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let projection = random_projection(DIM, OUT, 0);
    let reduced = project(&features, DIM, &projection, OUT);
    let starts = start_points(N, 10, 0);
    let count = coreset_size(N, RATIO);

    let mut group = c.benchmark_group("coreset");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((2 * N * DIM * OUT) as u64));
    group.bench_function("project_100000x1024_to_128", |b| {
        b.iter(|| project(std::hint::black_box(&features), DIM, &projection, OUT))
    });
    group.throughput(Throughput::Elements(count as u64));
    group.measurement_time(Duration::from_secs(60));
    group.bench_function("greedy_100000x128_1pct", |b| {
        b.iter(|| {
            greedy_select(
                std::hint::black_box(&reduced),
                OUT,
                &starts,
                count,
                &mut |_, _| {},
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
