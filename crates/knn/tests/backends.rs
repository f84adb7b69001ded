//! Backend selection and the FAISS backends' own behaviour: configuration format, builds without
//! a backend's feature, IVFPQ training limits, fallback, padding and serialisation.

use patchcore_knn::{
    ExactConfig, FaissFlatConfig, FaissGpuConfig, IndexSpec, IvfPqConfig, KnnError, OnTooSmall,
};
#[cfg(feature = "faiss")]
use rand::{Rng, SeedableRng};
#[cfg(feature = "faiss")]
use rand_chacha::ChaCha8Rng;

/// Every backend's configuration, with non-default values.
fn all_specs() -> Vec<IndexSpec> {
    vec![
        IndexSpec::Exact(ExactConfig {
            threads: Some(2),
            ..ExactConfig::default()
        }),
        IndexSpec::FaissFlat(FaissFlatConfig { threads: Some(3) }),
        IndexSpec::FaissGpuFlat(FaissGpuConfig { device: 1 }),
        IndexSpec::IvfPq(IvfPqConfig {
            nprobe: 8,
            on_too_small: OnTooSmall::Exact,
            ..IvfPqConfig::default()
        }),
    ]
}

#[test]
fn specs_round_trip_through_json_with_stable_tags() {
    let tags = ["exact", "faiss-flat", "faiss-gpu", "ivfpq"];
    for (spec, tag) in all_specs().into_iter().zip(tags) {
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(&format!("\"backend\":\"{tag}\"")), "{json}");
        assert_eq!(spec.backend_name(), tag);
        let back: IndexSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
    }
    let ivfpq: IndexSpec = serde_json::from_str(r#"{"backend": "ivfpq", "nprobe": 32}"#).unwrap();
    assert_eq!(
        ivfpq,
        IndexSpec::IvfPq(IvfPqConfig {
            lists: 512,
            sub_quantizers: 64,
            bits: 8,
            nprobe: 32,
            threads: None,
            on_too_small: OnTooSmall::Error,
        })
    );
    let json = serde_json::to_string(&ivfpq).unwrap();
    assert_eq!(
        json,
        r#"{"backend":"ivfpq","lists":512,"sub_quantizers":64,"bits":8,"nprobe":32,"threads":null,"on_too_small":"error"}"#
    );
    let err = serde_json::from_str::<IndexSpec>(r#"{"backend": "ivfpq", "nlist": 4}"#);
    assert!(err.is_err());
}

#[test]
fn unavailable_backends_are_clear_errors() {
    for spec in all_specs() {
        let available = spec.is_available();
        match spec.required_feature() {
            None => assert!(available),
            Some("faiss") => assert_eq!(available, cfg!(feature = "faiss")),
            Some("faiss-gpu") => assert_eq!(available, cfg!(feature = "faiss-gpu")),
            Some(other) => panic!("unexpected feature {other}"),
        }
        if available {
            continue;
        }
        let err = spec.build(&[0.0; 4], 2).unwrap_err();
        let feature = spec.required_feature().unwrap();
        assert!(
            matches!(err, KnnError::Unavailable { backend, feature: f }
                if backend == spec.backend_name() && f == feature),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("without the cargo feature `{feature}`")),
            "{err}"
        );
        let err = spec.read_from(&mut &[0u8; 16][..]).unwrap_err();
        assert!(matches!(err, KnnError::Unavailable { .. }), "{err}");
    }
}

/// `n × dim` values uniform in `±1`.
#[cfg(feature = "faiss")]
fn random_rows(rng: &mut ChaCha8Rng, n: usize, dim: usize) -> Vec<f32> {
    (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[cfg(feature = "faiss")]
fn ivfpq(lists: usize, sub_quantizers: usize, bits: usize, nprobe: usize) -> IvfPqConfig {
    IvfPqConfig {
        lists,
        sub_quantizers,
        bits,
        nprobe,
        threads: Some(2),
        on_too_small: OnTooSmall::Error,
    }
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_refuses_banks_too_small_to_train() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let bank = random_rows(&mut rng, 1000, 64);
    let err = IndexSpec::IvfPq(IvfPqConfig::default())
        .build(&bank, 64)
        .unwrap_err();
    assert!(
        matches!(
            err,
            KnnError::TooFewToTrain {
                bank_size: 1000,
                per_centroid: 39,
                lists: 512,
                needed_for_lists: 19_968,
                bits: 8,
                codebook: 256,
                needed_for_codebooks: 9_984,
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("19968") && text.contains("9984"), "{text}");
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_falls_back_to_exact_search_when_asked() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let dim = 64;
    let bank = random_rows(&mut rng, 1000, dim);
    let queries = random_rows(&mut rng, 40, dim);
    let spec = IndexSpec::IvfPq(IvfPqConfig {
        on_too_small: OnTooSmall::Exact,
        ..IvfPqConfig::default()
    });
    let index = spec.build(&bank, dim).unwrap();
    assert!(format!("{index:?}").contains("IndexFlatL2"), "{index:?}");
    assert_eq!(index.spec(), spec);
    let exact = IndexSpec::Exact(ExactConfig::default())
        .build(&bank, dim)
        .unwrap();
    let found = index.search(&queries, 3).unwrap();
    assert_eq!(
        found.indices(),
        exact.search(&queries, 3).unwrap().indices()
    );
    // The fallback survives writing and reading with the same configuration...
    let mut bytes = Vec::new();
    index.write_to(&mut bytes).unwrap();
    let read = spec.read_from(&mut bytes.as_slice()).unwrap();
    assert_eq!(read.search(&queries, 3).unwrap(), found);
    // ...but a configuration that forbids it does not read a flat index as IVFPQ.
    let strict = IndexSpec::IvfPq(IvfPqConfig::default());
    let err = strict.read_from(&mut bytes.as_slice()).unwrap_err();
    assert!(matches!(err, KnnError::Corrupt(_)), "{err}");
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_rejects_bad_parameters() {
    let bank = vec![0.5f32; 100 * 30];
    let err = IndexSpec::IvfPq(IvfPqConfig::default())
        .build(&bank, 100)
        .unwrap_err();
    assert!(
        matches!(
            err,
            KnnError::SubQuantizers {
                dim: 100,
                sub_quantizers: 64
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("100") && err.to_string().contains("64"));
    for config in [
        ivfpq(0, 1, 8, 1),
        ivfpq(4, 1, 0, 1),
        ivfpq(4, 1, 17, 1),
        ivfpq(4, 1, 8, 0),
        ivfpq(4, 1, 8, 5),
    ] {
        let err = IndexSpec::IvfPq(config.clone())
            .build(&bank, 100)
            .unwrap_err();
        assert!(matches!(err, KnnError::Config(_)), "{config:?}: {err}");
    }
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_never_returns_padding() {
    // 64 lists of about 39 rows each: with nprobe 1, k = 100 exceeds what one list holds, so FAISS
    // pads with -1; the backend widens the search until every query has k real rows.
    let seed = 3;
    println!("seed = {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dim = 16;
    let n = 39 * 256;
    let bank = random_rows(&mut rng, n, dim);
    let queries = random_rows(&mut rng, 50, dim);
    let index = IndexSpec::IvfPq(ivfpq(64, 4, 8, 1))
        .build(&bank, dim)
        .unwrap();
    let k = 400;
    let found = index.search(&queries, k).unwrap();
    for q in 0..found.len() {
        let (d, i) = found.row(q);
        let mut seen = std::collections::HashSet::new();
        for r in 0..k {
            assert!((i[r] as usize) < n, "query {q}: index {}", i[r]);
            assert!(seen.insert(i[r]), "query {q}: index {} repeated", i[r]);
            assert!(
                d[r].is_finite() && d[r] >= 0.0,
                "query {q}: distance {}",
                d[r]
            );
            assert!(d[r] < 1e30, "query {q}: padding distance {}", d[r]);
            if r > 0 {
                assert!(d[r - 1] <= d[r]);
            }
        }
    }
}

#[cfg(feature = "faiss")]
#[test]
fn ivfpq_round_trips_and_detects_damage() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let dim = 32;
    let bank = random_rows(&mut rng, 39 * 256, dim);
    let queries = random_rows(&mut rng, 30, dim);
    let spec = IndexSpec::IvfPq(ivfpq(32, 8, 8, 4));
    let index = spec.build(&bank, dim).unwrap();
    let mut bytes = Vec::new();
    index.write_to(&mut bytes).unwrap();
    let read = spec.read_from(&mut bytes.as_slice()).unwrap();
    assert_eq!(read.spec(), spec);
    assert_eq!((read.dim(), read.len()), (dim, 39 * 256));
    assert_eq!(
        read.search(&queries, 5).unwrap(),
        index.search(&queries, 5).unwrap()
    );
    for cut in [0, 7, 12, 30, 200, bytes.len() / 2, bytes.len() - 1] {
        let err = spec.read_from(&mut &bytes[..cut]).unwrap_err();
        assert!(matches!(err, KnnError::Corrupt(_)), "cut at {cut}: {err}");
    }
    for at in [9, 40, bytes.len() / 3, bytes.len() - 3] {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x04;
        let err = spec.read_from(&mut damaged.as_slice()).unwrap_err();
        assert!(matches!(err, KnnError::Corrupt(_)), "flip at {at}: {err}");
    }
    // Another backend or another list count does not read it.
    let err = IndexSpec::FaissFlat(FaissFlatConfig::default())
        .read_from(&mut bytes.as_slice())
        .unwrap_err();
    assert!(matches!(err, KnnError::Corrupt(_)), "{err}");
    let err = IndexSpec::IvfPq(ivfpq(64, 8, 8, 4))
        .read_from(&mut bytes.as_slice())
        .unwrap_err();
    assert!(err.to_string().contains("32 lists"), "{err}");
    // Nor does the exact backend read a FAISS stream, or FAISS an exact one.
    let err = IndexSpec::Exact(ExactConfig::default())
        .read_from(&mut bytes.as_slice())
        .unwrap_err();
    assert!(matches!(err, KnnError::Corrupt(_)), "{err}");
    let exact = IndexSpec::Exact(ExactConfig::default())
        .build(&bank, dim)
        .unwrap();
    let mut exact_bytes = Vec::new();
    exact.write_to(&mut exact_bytes).unwrap();
    let err = spec.read_from(&mut exact_bytes.as_slice()).unwrap_err();
    assert!(matches!(err, KnnError::Corrupt(_)), "{err}");
}

#[cfg(feature = "faiss")]
#[test]
fn faiss_flat_is_exact_on_offset_data_where_f32_cancels() {
    // Rows far from the origin and close to each other: FAISS's ‖x‖² + ‖y‖² − 2x·y in f32 would
    // be noise without centring and rescoring; the answer must equal the exact backend's.
    let seed = 5;
    println!("seed = {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dim = 96;
    let n = 3000;
    let bank: Vec<f32> = (0..n * dim)
        .map(|j| (if j % 2 == 0 { 3e4 } else { -2e4 }) + rng.random_range(-0.5f32..0.5))
        .collect();
    let queries: Vec<f32> = bank[..60 * dim]
        .iter()
        .map(|&v| v + rng.random_range(-0.01f32..0.01))
        .collect();
    let faiss = IndexSpec::FaissFlat(FaissFlatConfig { threads: Some(2) })
        .build(&bank, dim)
        .unwrap();
    let exact = IndexSpec::Exact(ExactConfig::default())
        .build(&bank, dim)
        .unwrap();
    for k in [1, 7] {
        let a = faiss.search(&queries, k).unwrap();
        let b = exact.search(&queries, k).unwrap();
        assert_eq!(a.indices(), b.indices(), "k = {k}");
        for (x, y) in a.distances().iter().zip(b.distances()) {
            assert!((x - y).abs() <= 1e-5 * y.max(1e-30), "{x} vs {y}");
        }
    }
}

#[cfg(feature = "faiss")]
#[test]
fn faiss_flat_breaks_ties_among_many_duplicates_by_the_lower_index() {
    // 150 copies of one row among 2,000: FAISS's candidates are all ties, so certification fails
    // and the backend widens the search, then rescans the bank; the answer must still be the
    // lowest-indexed copies, as the exact backend returns.
    let seed = 6;
    println!("seed = {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dim = 24;
    let n = 2000;
    let mut bank = random_rows(&mut rng, n, dim);
    let copy = bank[..dim].to_vec();
    for c in 0..150 {
        let j = 1 + c * 13;
        bank[j * dim..(j + 1) * dim].copy_from_slice(&copy);
    }
    let mut queries = copy.clone();
    queries.extend(random_rows(&mut rng, 20, dim));
    let faiss = IndexSpec::FaissFlat(FaissFlatConfig { threads: Some(1) })
        .build(&bank, dim)
        .unwrap();
    let exact = IndexSpec::Exact(ExactConfig::default())
        .build(&bank, dim)
        .unwrap();
    for k in [1, 3, 40] {
        let a = faiss.search(&queries, k).unwrap();
        let b = exact.search(&queries, k).unwrap();
        assert_eq!(a.indices(), b.indices(), "k = {k}");
        // Equal up to the rounding of the centring (a few units in the last place).
        for (x, y) in a.distances().iter().zip(b.distances()) {
            assert!((x - y).abs() <= 1e-6 * y.max(1e-30), "k = {k}: {x} vs {y}");
        }
    }
    let found = faiss.search(&copy, 3).unwrap();
    assert_eq!(found.indices(), &[0, 1, 14]);
    assert_eq!(found.distances(), &[0.0, 0.0, 0.0]);
}
