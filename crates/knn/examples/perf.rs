//! Temporary timing harness.
use patchcore_knn::{ExactConfig, IndexSpec};
use rand::{Rng, SeedableRng};
fn main() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (n, nq, dim) = (16384, 784, 1024);
    let bank: Vec<f32> = (0..n * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let q: Vec<f32> = (0..nq * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let threads: Option<usize> = std::env::args().nth(1).map(|s| s.parse().unwrap());
    let index = IndexSpec::Exact(ExactConfig { threads })
        .build(&bank, dim)
        .unwrap();
    for _ in 0..4 {
        let t = std::time::Instant::now();
        let r = index.search(&q, 1).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{s:.3}s  {:.1} GFLOP/s  {}",
            2.0 * (n * nq * dim) as f64 / s / 1e9,
            r.indices()[0]
        );
    }
}
