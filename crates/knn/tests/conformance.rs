//! One conformance suite, instantiated for every built backend with `knn_conformance!`.
//!
//! Every backend must agree with a brute-force `f64` oracle: the pure-Rust exact backend always,
//! the FAISS backends when the cargo feature `faiss` (and `faiss-gpu` for the GPU) is enabled. The
//! IVFPQ backend runs the suite with `on_too_small: exact`, because these banks are too small to
//! train it (so the suite checks its fallback); its approximate search is checked against the
//! oracle by recall on clustered data at the end of this file.

use patchcore_knn::{ExactConfig, IndexSpec, KnnError, Neighbors, ShortlistArithmetic};
#[cfg(feature = "faiss")]
use patchcore_knn::{FaissFlatConfig, IvfPqConfig, OnTooSmall};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The exact `k` nearest rows of every query, by `f64` brute force, ties broken by lower index.
fn oracle(bank: &[f32], dim: usize, queries: &[f32], k: usize) -> Vec<Vec<(f64, u32)>> {
    queries
        .chunks_exact(dim)
        .map(|q| {
            let mut all: Vec<(f64, u32)> = bank
                .chunks_exact(dim)
                .enumerate()
                .map(|(j, y)| (exact(q, y), j as u32))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            all
        })
        .collect()
}

/// `Σ(x − y)²` in `f64`.
fn exact(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum()
}

/// Asserts that `found` equals the oracle: same indices except where the two candidates' exact
/// distances tie within `tol` (relative to the largest distance involved), and distances within
/// `tol` relative.
fn assert_matches_oracle(found: &Neighbors, bank: &[f32], dim: usize, queries: &[f32], tol: f64) {
    let k = found.k();
    let expected = oracle(bank, dim, queries, k);
    assert_eq!(found.len(), expected.len());
    for (q, want) in expected.iter().enumerate() {
        let (dist, idx) = found.row(q);
        let query = &queries[q * dim..(q + 1) * dim];
        let scale = want.last().unwrap().0.max(f64::MIN_POSITIVE);
        let mut seen = std::collections::HashSet::new();
        for r in 0..k {
            assert!(seen.insert(idx[r]), "query {q}: index {} repeated", idx[r]);
            let (want_d, want_i) = want[r];
            let got_exact = exact(query, &bank[idx[r] as usize * dim..][..dim]);
            if idx[r] != want_i {
                assert!(
                    (got_exact - want_d).abs() <= tol * scale,
                    "query {q} rank {r}: got index {} (distance {got_exact}), oracle {want_i} \
                     (distance {want_d})",
                    idx[r]
                );
            }
            assert!(
                (f64::from(dist[r]) - want_d).abs() <= tol * scale,
                "query {q} rank {r}: distance {} vs oracle {want_d}",
                dist[r]
            );
        }
    }
}

/// `n × dim` values uniform in `offset ± spread`.
fn random_rows(rng: &mut ChaCha8Rng, n: usize, dim: usize, offset: f32, spread: f32) -> Vec<f32> {
    (0..n * dim)
        .map(|_| offset + rng.random_range(-spread..spread))
        .collect()
}

macro_rules! knn_conformance {
    ($name:ident, $spec:expr) => {
        mod $name {
            use super::*;

            fn spec() -> IndexSpec {
                $spec
            }

            #[test]
            fn empty_bank_is_an_error() {
                let err = spec().build(&[], 4).unwrap_err();
                assert!(matches!(err, KnnError::EmptyBank), "{err}");
            }

            #[test]
            fn zero_dimension_and_ragged_bank_are_errors() {
                let err = spec().build(&[1.0, 2.0], 0).unwrap_err();
                assert!(matches!(err, KnnError::ZeroDimension), "{err}");
                let err = spec().build(&[1.0, 2.0, 3.0], 2).unwrap_err();
                assert!(
                    matches!(err, KnnError::RaggedInput { len: 3, dim: 2 }),
                    "{err}"
                );
            }

            #[test]
            fn k_out_of_range_is_an_error() {
                let index = spec().build(&[0.0, 1.0, 2.0], 1).unwrap();
                let err = index.search(&[0.5], 4).unwrap_err();
                assert!(
                    matches!(err, KnnError::InvalidK { k: 4, bank_size: 3 }),
                    "{err}"
                );
                let err = index.search(&[0.5], 0).unwrap_err();
                assert!(
                    matches!(err, KnnError::InvalidK { k: 0, bank_size: 3 }),
                    "{err}"
                );
                // k equal to the bank size is allowed and returns every row.
                let found = index.search(&[0.5], 3).unwrap();
                let mut all = found.indices().to_vec();
                all.sort_unstable();
                assert_eq!(all, [0, 1, 2]);
            }

            #[test]
            fn dimension_mismatch_is_an_error() {
                let index = spec().build(&[0.0; 8], 4).unwrap();
                let err = index.search(&[0.0; 3], 1).unwrap_err();
                assert!(
                    matches!(
                        err,
                        KnnError::DimensionMismatch {
                            expected: 4,
                            got: 3
                        }
                    ),
                    "{err}"
                );
            }

            #[test]
            fn non_finite_values_are_errors() {
                let index = spec().build(&[0.0; 8], 2).unwrap();
                let err = index.search(&[0.0, 0.0, 1.0, f32::NAN], 1).unwrap_err();
                assert!(
                    matches!(
                        err,
                        KnnError::NonFinite {
                            row: 1,
                            what: "query"
                        }
                    ),
                    "{err}"
                );
                let err = index.search(&[f32::INFINITY, 0.0], 1).unwrap_err();
                assert!(
                    matches!(
                        err,
                        KnnError::NonFinite {
                            row: 0,
                            what: "query"
                        }
                    ),
                    "{err}"
                );
                let err = spec()
                    .build(&[0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY, 0.0], 2)
                    .unwrap_err();
                assert!(
                    matches!(
                        err,
                        KnnError::NonFinite {
                            row: 2,
                            what: "bank"
                        }
                    ),
                    "{err}"
                );
            }

            #[test]
            fn no_queries_give_an_empty_result() {
                let index = spec().build(&[0.0; 8], 2).unwrap();
                let found = index.search(&[], 2).unwrap();
                assert!(found.is_empty());
                assert_eq!(found.len(), 0);
                assert_eq!(found.k(), 2);
            }

            #[test]
            fn index_reports_its_shape_and_spec() {
                let index = spec().build(&[0.0; 12], 3).unwrap();
                assert_eq!(index.dim(), 3);
                assert_eq!(index.len(), 4);
                assert!(!index.is_empty());
                assert_eq!(index.spec(), spec());
            }

            #[test]
            fn exact_duplicates_are_found_at_distance_zero() {
                let seed = 0x5eed_0001;
                println!("seed = {seed:#x}");
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let dim = 48;
                let mut bank = random_rows(&mut rng, 300, dim, 500.0, 3.0);
                // Rows 17 and 250 are identical; row 40 is an isolated row.
                let row17 = bank[17 * dim..18 * dim].to_vec();
                bank[250 * dim..251 * dim].copy_from_slice(&row17);
                let mut queries = row17.clone();
                queries.extend_from_slice(&bank[40 * dim..41 * dim]);
                let index = spec().build(&bank, dim).unwrap();
                let found = index.search(&queries, 2).unwrap();
                for (q, query) in queries.chunks_exact(dim).enumerate() {
                    let norm2: f64 = query.iter().map(|&v| f64::from(v).powi(2)).sum();
                    let (d, _) = found.row(q);
                    assert!(
                        f64::from(d[0]) <= 1e-6 * norm2,
                        "query {q}: duplicate at distance {}",
                        d[0]
                    );
                }
                let (d, i) = found.row(0);
                let mut both = i.to_vec();
                both.sort_unstable();
                assert_eq!(both, [17, 250]);
                assert!(
                    f64::from(d[1])
                        <= 1e-6 * row17.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>()
                );
                assert_eq!(found.row(1).1[0], 40);
            }

            #[test]
            fn large_magnitudes_do_not_cancel() {
                let bank = [
                    10100.0, 10100.0, 10004.0, 10006.0, 10001.0, 10002.0, 10000.0, 10000.0,
                ];
                let index = spec().build(&bank, 2).unwrap();
                let found = index.search(&[10000.0, 10000.0], 4).unwrap();
                let (d, i) = found.row(0);
                assert_eq!(i, &[3, 2, 1, 0]);
                assert!(d[0] >= 0.0 && d[0] <= 1e-3, "distance to itself {}", d[0]);
                for (got, want) in d[1..].iter().zip([5.0f32, 52.0, 20000.0]) {
                    assert!(
                        ((got - want) / want).abs() <= 1e-3,
                        "distance {got}, expected {want}"
                    );
                }
            }

            #[test]
            fn random_data_matches_the_oracle() {
                // (bank rows, dim, queries, k, offset, spread)
                let cases: &[(usize, usize, usize, usize, f32, f32)] = &[
                    (1, 3, 5, 1, 0.0, 1.0),
                    (7, 1, 20, 7, 0.0, 1.0),
                    (500, 16, 70, 1, 0.0, 1.0),
                    (2000, 64, 130, 5, 0.0, 1.0),
                    (3000, 33, 9, 10, 1000.0, 0.5),
                    (9000, 8, 3, 3, -50.0, 2.0),
                    (1200, 128, 65, 20, 1e4, 1.0),
                ];
                for (c, &(n, dim, nq, k, offset, spread)) in cases.iter().enumerate() {
                    let seed = 0xC0FFEE + c as u64;
                    println!("case {c}: n={n} dim={dim} nq={nq} k={k} seed={seed:#x}");
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let bank = random_rows(&mut rng, n, dim, offset, spread);
                    let mut queries = random_rows(&mut rng, nq, dim, offset, spread);
                    // Some queries are bank rows.
                    for q in (0..nq).step_by(4) {
                        let j = rng.random_range(0..n);
                        queries[q * dim..(q + 1) * dim].copy_from_slice(&bank[j * dim..][..dim]);
                    }
                    let index = spec().build(&bank, dim).unwrap();
                    let found = index.search(&queries, k).unwrap();
                    assert_matches_oracle(&found, &bank, dim, &queries, 1e-5);
                }
            }

            #[test]
            fn concurrent_searches_agree() {
                let mut rng = ChaCha8Rng::seed_from_u64(7);
                let dim = 24;
                let bank = random_rows(&mut rng, 5000, dim, 0.0, 1.0);
                let queries = random_rows(&mut rng, 100, dim, 0.0, 1.0);
                let index = spec().build(&bank, dim).unwrap();
                let reference = index.search(&queries, 3).unwrap();
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..3)
                        .map(|_| s.spawn(|| index.search(&queries, 3).unwrap()))
                        .collect();
                    for h in handles {
                        assert_eq!(h.join().unwrap(), reference);
                    }
                });
            }

            #[test]
            fn write_then_read_round_trips() {
                let mut rng = ChaCha8Rng::seed_from_u64(11);
                let dim = 20;
                let bank = random_rows(&mut rng, 777, dim, 3.0, 1.0);
                let queries = random_rows(&mut rng, 50, dim, 3.0, 1.0);
                let index = spec().build(&bank, dim).unwrap();
                let mut bytes = Vec::new();
                index.write_to(&mut bytes).unwrap();
                let read = spec().read_from(&mut bytes.as_slice()).unwrap();
                assert_eq!(read.dim(), dim);
                assert_eq!(read.len(), 777);
                assert_eq!(read.spec(), spec());
                assert_eq!(
                    read.search(&queries, 4).unwrap(),
                    index.search(&queries, 4).unwrap()
                );
            }

            #[test]
            fn truncated_or_corrupted_streams_are_errors() {
                let mut rng = ChaCha8Rng::seed_from_u64(12);
                let bank = random_rows(&mut rng, 40, 5, 0.0, 1.0);
                let index = spec().build(&bank, 5).unwrap();
                let mut bytes = Vec::new();
                index.write_to(&mut bytes).unwrap();
                for cut in [0, 3, 8, 13, 20, bytes.len() / 2, bytes.len() - 1] {
                    let err = spec().read_from(&mut &bytes[..cut]).unwrap_err();
                    assert!(
                        matches!(err, KnnError::Corrupt(_)),
                        "cut at {cut}: unexpected error {err}"
                    );
                }
                let mut flipped = bytes.clone();
                let mid = flipped.len() / 2;
                flipped[mid] ^= 0x10;
                let err = spec().read_from(&mut flipped.as_slice()).unwrap_err();
                assert!(matches!(err, KnnError::Corrupt(_)), "bit flip: {err}");
                let err = spec()
                    .read_from(&mut &b"not an index at all!"[..])
                    .unwrap_err();
                assert!(matches!(err, KnnError::Corrupt(_)), "garbage: {err}");
            }
        }
    };
}

knn_conformance!(exact, IndexSpec::Exact(ExactConfig::default()));
knn_conformance!(
    exact_one_thread,
    IndexSpec::Exact(ExactConfig {
        threads: Some(1),
        ..ExactConfig::default()
    })
);
knn_conformance!(
    exact_three_threads,
    IndexSpec::Exact(ExactConfig {
        threads: Some(3),
        ..ExactConfig::default()
    })
);

knn_conformance!(
    exact_f32,
    IndexSpec::Exact(ExactConfig {
        shortlist: ShortlistArithmetic::F32,
        ..ExactConfig::default()
    })
);
knn_conformance!(
    exact_bf16_one_thread,
    IndexSpec::Exact(ExactConfig {
        threads: Some(1),
        shortlist: ShortlistArithmetic::Bf16,
    })
);

#[cfg(feature = "faiss")]
knn_conformance!(faiss_flat, IndexSpec::FaissFlat(FaissFlatConfig::default()));
#[cfg(feature = "faiss")]
knn_conformance!(
    faiss_flat_one_thread,
    IndexSpec::FaissFlat(FaissFlatConfig { threads: Some(1) })
);
#[cfg(feature = "faiss-gpu")]
knn_conformance!(
    faiss_gpu,
    IndexSpec::FaissGpuFlat(patchcore_knn::FaissGpuConfig { device: 0 })
);
#[cfg(feature = "faiss")]
knn_conformance!(
    ivfpq_fallback,
    IndexSpec::IvfPq(IvfPqConfig {
        // One sub-quantizer divides every dimension of the suite.
        sub_quantizers: 1,
        threads: Some(2),
        on_too_small: OnTooSmall::Exact,
        ..IvfPqConfig::default()
    })
);

/// `n` rows around `clusters` random centres: centres uniform in `±10`, rows at Gaussian-like
/// offsets of scale 1 (sum of uniforms), so that neighbours are well separated only inside a
/// cluster.
#[cfg(feature = "faiss")]
fn clustered(rng: &mut ChaCha8Rng, n: usize, dim: usize, clusters: usize) -> Vec<f32> {
    let centres = random_rows(rng, clusters, dim, 0.0, 10.0);
    let mut rows = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = rng.random_range(0..clusters);
        for j in 0..dim {
            let noise: f32 = (0..3).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            rows.push(centres[c * dim + j] + noise);
        }
    }
    rows
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_recall_at_1_on_clustered_data() {
    // (bank rows, dim, lists, sub-quantizers, bits, nprobe, minimum recall@1)
    let cases: &[(usize, usize, usize, usize, usize, usize, f64)] = &[
        (20_000, 64, 512, 16, 8, 8, 0.9),
        (10_000, 32, 64, 8, 8, 4, 0.9),
    ];
    for (c, &(n, dim, lists, m, bits, nprobe, minimum)) in cases.iter().enumerate() {
        let seed = 0x1f_0000 + c as u64;
        println!(
            "case {c}: n={n} dim={dim} IVF{lists},PQ{m}x{bits} nprobe={nprobe} seed={seed:#x}"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bank = clustered(&mut rng, n, dim, 100);
        // Queries: bank rows moved by a small perturbation, as test patches near normal ones.
        let nq = 300;
        let mut queries = Vec::with_capacity(nq * dim);
        for _ in 0..nq {
            let j = rng.random_range(0..n);
            queries.extend(
                bank[j * dim..(j + 1) * dim]
                    .iter()
                    .map(|&v| v + rng.random_range(-0.05f32..0.05)),
            );
        }
        let spec = IndexSpec::IvfPq(IvfPqConfig {
            lists,
            sub_quantizers: m,
            bits,
            nprobe,
            threads: Some(2),
            on_too_small: OnTooSmall::Error,
        });
        let started = std::time::Instant::now();
        let index = spec.build(&bank, dim).unwrap();
        println!(
            "case {c}: built in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert!(format!("{index:?}").contains("IndexIVFPQ"), "{index:?}");
        let found = index.search(&queries, 1).unwrap();
        let truth = oracle(&bank, dim, &queries, 1);
        let hits = (0..nq)
            .filter(|&q| found.row(q).1[0] == truth[q][0].1)
            .count();
        let recall = hits as f64 / nq as f64;
        println!("case {c}: recall@1 = {recall:.3}");
        assert!(
            recall >= minimum,
            "case {c} (seed {seed:#x}): recall@1 {recall} < {minimum}"
        );
        for q in 0..nq {
            let (d, i) = found.row(q);
            assert!(d[0] >= 0.0 && d[0].is_finite() && (i[0] as usize) < n);
        }
    }
}
