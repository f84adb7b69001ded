//! Determinism and numerical safety of fitting and prediction.
//!
//! These tests need the real Lite0 weights through `PATCHCORE_LITE0_WEIGHTS` (see `tests/pipeline.rs`).

use image::{DynamicImage, GrayImage, Luma};
use patchcore::{load_image, PatchCore, PatchCoreConfig};
use safetensors::SafeTensors;

mod common;

use common::{data, weights, TEST, TRAIN};

fn images(names: &[&str]) -> Vec<DynamicImage> {
    names
        .iter()
        .map(|n| load_image(&data(n)).unwrap())
        .collect()
}

fn fit(config: &PatchCoreConfig, train: &[DynamicImage]) -> PatchCore {
    PatchCore::fit(config.clone(), train.iter().cloned().map(Ok), &mut |_| {}).unwrap()
}

/// The memory bank as stored in a saved model (the index's own serialisation).
fn bank_bytes(model: &PatchCore) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.patchcore");
    model.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let index = st.tensor("index").unwrap().data().to_vec();
    index
}

#[test]
fn same_seed_is_bit_identical_across_runs_and_thread_counts() {
    let Some(weights) = weights() else { return };
    let config = PatchCoreConfig::lite0(&weights);
    let train = images(&TRAIN);
    let test = images(&TEST);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let model = fit(&config, &train);
            let p = model.predict(&test).unwrap();
            (bank_bytes(&model), p)
        })
    };
    let (bank1, p1) = run(1);
    let (bank2, p2) = run(2);
    let (bank3, p3) = run(3);
    assert!(
        bank1 == bank2 && bank2 == bank3,
        "banks differ across thread counts"
    );
    assert_eq!(p1, p2);
    assert_eq!(p2, p3);
    let (again, p_again) = run(2);
    assert!(again == bank2);
    assert_eq!(p_again, p2);

    // Another seed changes the coreset (and so the bank), nothing before it.
    let mut other = config.clone();
    other.seed = 1;
    let model = fit(&other, &train);
    assert_eq!(model.stats().patches, 2352);
    assert_eq!(model.bank_size(), 235);
    assert!(
        bank_bytes(&model) != bank2,
        "a different seed must pick a different coreset"
    );
}

#[test]
fn scores_do_not_depend_on_the_batch() {
    let Some(weights) = weights() else { return };
    let mut config = PatchCoreConfig::lite0(&weights);
    config.batch_size = 3;
    let model = fit(&config, &images(&TRAIN));
    let test = images(&[
        "cell0011.png",
        "cell0001.png",
        "cell0004.png",
        "cell0060.png",
    ]);
    let together = model.predict(&test).unwrap();
    for (i, image) in test.iter().enumerate() {
        let alone = model.predict(std::slice::from_ref(image)).unwrap();
        let (a, b) = (alone.image_scores[0], together.image_scores[i]);
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "image {i}: {a} alone vs {b} in a batch"
        );
        let map_err = (&alone.anomaly_maps.index_axis(ndarray::Axis(0), 0)
            - &together.anomaly_maps.index_axis(ndarray::Axis(0), i))
            .mapv(f32::abs)
            .fold(0.0f32, |m, &v| m.max(v));
        assert!(
            map_err <= 1e-5 * b.abs().max(1.0),
            "image {i}: maps differ by {map_err}"
        );
    }
}

#[test]
fn degenerate_training_sets_give_finite_non_negative_scores() {
    let Some(weights) = weights() else { return };
    let config = PatchCoreConfig::lite0(&weights);
    let black = DynamicImage::ImageLuma8(GrayImage::from_pixel(300, 300, Luma([0])));
    let white = DynamicImage::ImageLuma8(GrayImage::from_pixel(300, 300, Luma([255])));
    let cell = images(&["cell0004.png"]).remove(0);
    let cases: Vec<(&str, Vec<DynamicImage>)> = vec![
        ("one constant image", vec![black.clone()]),
        ("identical constant images", vec![white.clone(); 3]),
        ("one real image", vec![cell.clone()]),
        ("identical real images", vec![cell.clone(); 2]),
    ];
    let probes = vec![black, white, cell];
    let mut keep_all = config.clone();
    keep_all.sampler = patchcore::Sampler::KeepAll;
    for (name, train) in cases {
        let model = fit(&config, &train);
        let p = model.predict(&probes).unwrap();
        assert!(
            p.image_scores.iter().all(|s| s.is_finite() && *s >= 0.0),
            "{name}, coreset 10%: {:?}",
            p.image_scores
        );
        let model = fit(&keep_all, &train);
        let p = model.predict(&probes).unwrap();
        assert!(
            p.image_scores.iter().all(|s| s.is_finite() && *s >= 0.0),
            "{name}: {:?}",
            p.image_scores
        );
        assert!(
            p.anomaly_maps.iter().all(|v| v.is_finite() && *v >= 0.0),
            "{name}: maps"
        );
        // With the full bank, an image seen in training scores (near) zero.
        let seen = probes
            .iter()
            .position(|q| q.as_bytes() == train[0].as_bytes())
            .unwrap();
        assert!(
            p.image_scores[seen] < 1e-2,
            "{name}: a training image scores {}",
            p.image_scores[seen]
        );
    }
}
