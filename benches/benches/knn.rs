//! k-NN search: 784 queries × 1024 dimensions, k = 1.
//!
//! 784 queries are one 224 × 224 image's 28 × 28 patch embeddings. The first benchmark runs the
//! exact pure-Rust backend against a 16,384 × 1024 bank of uniform values and reports its
//! throughput in GFLOP/s of the underlying matrix product (2 · queries · bank · dim flops per
//! search), once with the default shortlist arithmetic (bfloat16 where the CPU has AVX512-BF16)
//! and once with `f32`.
//!
//! With the cargo feature `faiss` (`cargo bench -p patchcore-benches --features faiss --bench
//! knn`), the `knn_backends` group compares the pure-Rust exact backend, FAISS `IndexFlatL2` and
//! FAISS IVFPQ (nprobe 1, 8 and 32) on 16,384 and 163,840 × 1024 banks, every backend on 2
//! threads, on clustered data (rows around 1,024 random centres). The timed queries are fresh
//! rows of the same clusters. Before each benchmark it prints recall@1 against the exact backend
//! for these queries and for queries near the bank (bank rows moved by ±0.1 per component, as test
//! patches that resemble training patches), and the median relative error of the first
//! neighbour's distance.
//! IVFPQ uses the original's 64 sub-quantizers of 8 bits and 512 lists on the large bank; the
//! small bank has too few rows for 512 lists (FAISS wants 39 per list, 19,968 rows), so it uses
//! 256 lists there. Select banks with `PATCHCORE_BENCH_BANKS=16384,163840` (the default).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use patchcore_knn::{ExactConfig, IndexSpec, ShortlistArithmetic};
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
    let flops = 2 * QUERIES * BANK * DIM;
    let mut group = c.benchmark_group("knn");
    group
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(2))
        .measurement_time(std::time::Duration::from_secs(10));
    // Criterion's element throughput is flops here, so "elem/s" reads as FLOP/s.
    group.throughput(Throughput::Elements(flops as u64));
    // The default shortlist arithmetic (bfloat16 where the CPU has AVX512-BF16), then f32.
    for (name, shortlist) in [
        ("exact_784x1024_vs_16384_k1", ShortlistArithmetic::default()),
        ("exact_f32_784x1024_vs_16384_k1", ShortlistArithmetic::F32),
    ] {
        let index = IndexSpec::Exact(ExactConfig {
            shortlist,
            ..ExactConfig::default()
        })
        .build(&bank, DIM)
        .expect("valid bank");
        group.bench_function(name, |b| {
            b.iter(|| {
                index
                    .search(std::hint::black_box(&queries), 1)
                    .expect("search")
            })
        });
    }
    group.finish();
}

/// `n` rows around the first of `centres` rows (each centre's row plus uniform noise of ±1 per
/// component, the centres uniform in ±4).
#[cfg(feature = "faiss")]
fn clustered(rng: &mut ChaCha8Rng, centres: &[f32], n: usize) -> Vec<f32> {
    let clusters = centres.len() / DIM;
    let mut rows = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let c = rng.random_range(0..clusters);
        rows.extend(
            centres[c * DIM..(c + 1) * DIM]
                .iter()
                .map(|&m| m + rng.random_range(-1.0f32..1.0)),
        );
    }
    rows
}

#[cfg(feature = "faiss")]
fn backends(c: &mut Criterion) {
    use patchcore_knn::{FaissFlatConfig, IvfPqConfig};
    use std::time::Instant;

    let banks: Vec<usize> = std::env::var("PATCHCORE_BENCH_BANKS")
        .unwrap_or_else(|_| "16384,163840".into())
        .split(',')
        .map(|s| s.trim().parse().expect("PATCHCORE_BENCH_BANKS: numbers"))
        .collect();
    let mut group = c.benchmark_group("knn_backends");
    group
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5));
    for n in banks {
        let seed = 0x6b6e_6e00 + n as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<f32> = (0..1024 * DIM)
            .map(|_| rng.random_range(-4.0..4.0))
            .collect();
        let bank = clustered(&mut rng, &centres, n);
        let queries = clustered(&mut rng, &centres, QUERIES);
        let mut near = Vec::with_capacity(QUERIES * DIM);
        for _ in 0..QUERIES {
            let j = rng.random_range(0..n);
            near.extend(
                bank[j * DIM..(j + 1) * DIM]
                    .iter()
                    .map(|&v| v + rng.random_range(-0.1f32..0.1)),
            );
        }
        let lists = if n >= 39 * 512 { 512 } else { 256 };
        let mut specs = vec![
            (
                "exact".to_string(),
                IndexSpec::Exact(ExactConfig {
                    threads: Some(2),
                    ..ExactConfig::default()
                }),
            ),
            (
                "faiss_flat".to_string(),
                IndexSpec::FaissFlat(FaissFlatConfig { threads: Some(2) }),
            ),
        ];
        for nprobe in [1, 8, 32] {
            specs.push((
                format!("ivfpq{lists}_nprobe{nprobe}"),
                IndexSpec::IvfPq(IvfPqConfig {
                    lists,
                    nprobe,
                    threads: Some(2),
                    ..IvfPqConfig::default()
                }),
            ));
        }
        let mut truth: Option<(patchcore_knn::Neighbors, patchcore_knn::Neighbors)> = None;
        let mut trained: Option<Vec<u8>> = None;
        for (name, spec) in specs {
            let started = Instant::now();
            // The IVFPQ index is trained once per bank and read back for the other nprobe values.
            let index = match (&spec, &trained) {
                (IndexSpec::IvfPq(_), Some(bytes)) => {
                    spec.read_from(&mut bytes.as_slice()).expect("read")
                }
                _ => spec.build(&bank, DIM).expect("build"),
            };
            let built = started.elapsed().as_secs_f64();
            if matches!(spec, IndexSpec::IvfPq(_)) && trained.is_none() {
                let mut bytes = Vec::new();
                index.write_to(&mut bytes).expect("write");
                trained = Some(bytes);
            }
            let found = index.search(&queries, 1).expect("search");
            let found_near = index.search(&near, 1).expect("search");
            let (truth, truth_near) =
                truth.get_or_insert_with(|| (found.clone(), found_near.clone()));
            let recall = |a: &patchcore_knn::Neighbors, b: &patchcore_knn::Neighbors| {
                let hits = a
                    .indices()
                    .iter()
                    .zip(b.indices())
                    .filter(|(x, y)| x == y)
                    .count();
                hits as f64 / QUERIES as f64
            };
            let mut errors: Vec<f64> = found
                .distances()
                .iter()
                .zip(truth.distances())
                .map(|(&d, &t)| (f64::from(d) - f64::from(t)).abs() / f64::from(t).max(1e-30))
                .collect();
            errors.sort_by(f64::total_cmp);
            println!(
                "knn_backends/{name}/{n}: built or read in {built:.2} s; recall@1 {:.4} (fresh \
                 queries), {:.4} (near the bank); median relative distance error {:.2e}; \
                 seed {seed:#x}",
                recall(&found, truth),
                recall(&found_near, truth_near),
                errors[QUERIES / 2]
            );
            group.bench_function(format!("{name}/{n}"), |b| {
                b.iter(|| {
                    index
                        .search(std::hint::black_box(&queries), 1)
                        .expect("search")
                })
            });
        }
    }
    group.finish();
}

#[cfg(not(feature = "faiss"))]
fn backends(_: &mut Criterion) {}

criterion_group!(benches, bench, backends);
criterion_main!(benches);
