//! The `patchcore` binary's behaviour on bad input: clear messages, non-zero exit, no panics, no partial files.

use std::path::Path;
use std::process::{Command, Output};

fn patchcore(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patchcore"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[test]
fn bad_fit_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("data/train/good")).unwrap();
    std::fs::write(root.join("w.pth"), b"weights").unwrap();
    for (flag, value, needle) in [
        ("--coreset", "0", "coreset ratio"),
        ("--coreset", "1.5", "coreset ratio"),
        ("--coreset", "-1", "coreset ratio"),
        ("--k", "0", "invalid k = 0"),
        ("--batch-size", "0", "batch_size"),
        ("--false-alarm-rate", "1.5", "calibration.false_alarm_rate"),
        ("--false-alarm-rate", "0", "calibration.false_alarm_rate"),
    ] {
        let o = patchcore(
            &[
                "fit",
                "--data",
                "data",
                "--weights",
                "w.pth",
                "--out",
                "m.pc",
                flag,
                value,
            ],
            root,
        );
        assert_clean_failure(&o, needle);
    }
    // A folder without images.
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "w.pth",
            "--out",
            "m.pc",
        ],
        root,
    );
    assert_clean_failure(&o, "no training images");
    // A held-out share without a false-alarm rate is refused by the parser.
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "w.pth",
            "--out",
            "m.pc",
            "--holdout",
            "0.3",
        ],
        root,
    );
    assert_clean_failure(&o, "--false-alarm-rate");
    // A share that holds out nothing is named with the image count.
    std::fs::write(root.join("data/train/good/only.png"), b"x").unwrap();
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "w.pth",
            "--out",
            "m.pc",
            "--false-alarm-rate",
            "0.01",
        ],
        root,
    );
    assert_clean_failure(&o, "at least 1 of the 1 training images");
    std::fs::remove_file(root.join("data/train/good/only.png")).unwrap();
    // Missing weights.
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "nope.pth",
            "--out",
            "m.pc",
        ],
        root,
    );
    assert_clean_failure(&o, "nope.pth");
    assert!(!root.join("m.pc").exists());
    // An output path that cannot be written fails before any work.
    std::fs::write(root.join("data/train/good/a.png"), b"x").unwrap();
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "w.pth",
            "--out",
            "no/such/m.pc",
        ],
        root,
    );
    assert_clean_failure(&o, "does not exist");
    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            "w.pth",
            "--out",
            "data",
        ],
        root,
    );
    assert_clean_failure(&o, "is a folder");
}

#[test]
fn bad_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("data/test/good")).unwrap();
    std::fs::write(root.join("model.pc"), b"not a model").unwrap();
    let o = patchcore(
        &[
            "eval", "--model", "model.pc", "--data", "data", "--out", "out",
        ],
        root,
    );
    assert_clean_failure(&o, "model.pc");
    let o = patchcore(
        &[
            "eval",
            "--model",
            "missing.pc",
            "--data",
            "data",
            "--out",
            "out",
        ],
        root,
    );
    assert_clean_failure(&o, "missing.pc");
    let o = patchcore(
        &["predict", "--model", "model.pc", "--out", "out", "x.png"],
        root,
    );
    assert_clean_failure(&o, "model.pc");
    assert!(!root.join("out/report.json").exists());
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run_ok(args: &[&str], cwd: &Path) -> Output {
    let o = patchcore(args, cwd);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    o
}

/// Runs `patchcore fit --preset lite0 --data data --weights W --out OUT EXTRA… --quiet` in `root`; it must succeed.
fn fit_lite0(weights: &str, out: &str, extra: &[&str], root: &Path) -> Output {
    let mut args = vec![
        "fit",
        "--preset",
        "lite0",
        "--data",
        "data",
        "--weights",
        weights,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args.push("--quiet");
    run_ok(&args, root)
}

/// The Lite0 weights (from `PATCHCORE_LITE0_WEIGHTS`) and a temporary MVTec-style folder `data/` of five real
/// cells: three good training images, one good test image and one test image of the kind `defect_kind`. `None`
/// (with a notice) when the weights are not set, unless `PATCHCORE_REQUIRE_WEIGHTS=1` demands them.
fn real_cells(defect_kind: &str) -> Option<(String, tempfile::TempDir)> {
    let Some(weights) = std::env::var_os("PATCHCORE_LITE0_WEIGHTS") else {
        assert!(
            std::env::var("PATCHCORE_REQUIRE_WEIGHTS").as_deref() != Ok("1"),
            "PATCHCORE_REQUIRE_WEIGHTS=1 but PATCHCORE_LITE0_WEIGHTS is not set"
        );
        eprintln!("notice: PATCHCORE_LITE0_WEIGHTS is not set; skipping this test");
        return None;
    };
    let weights = weights.to_str().unwrap().to_string();
    let cells = Path::new(env!("CARGO_MANIFEST_DIR")).join("../patchcore/tests/data");
    let dir = tempfile::tempdir().unwrap();
    let defect = format!("data/test/{defect_kind}/d.png");
    for (from, to) in [
        ("cell0004.png", "data/train/good/a.png"),
        ("cell0009.png", "data/train/good/b.png"),
        ("cell0060.png", "data/train/good/c.png"),
        ("cell0011.png", "data/test/good/g.png"),
        ("cell0001.png", defect.as_str()),
    ] {
        let to = dir.path().join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(cells.join(from), to).unwrap();
    }
    Some((weights, dir))
}

/// Thresholds end to end on real cells: calibrated at fit time from a held-out good image, chosen for F1 by
/// `eval --set-threshold f1`, given with `predict --threshold`; `predict` reports score, decision and threshold.
#[test]
fn thresholds_are_calibrated_stored_and_reported() {
    let Some((weights, dir)) = real_cells("defect") else {
        return;
    };
    let root = dir.path();
    let o = fit_lite0(
        &weights,
        "m.pc",
        &[
            "--coreset",
            "1",
            "--false-alarm-rate",
            "0.5",
            "--holdout",
            "0.34",
            "--report",
            "fit.json",
        ],
        root,
    );
    // ⌊0.34 · 3⌋ = 1 image held out: 2 in the bank, and a warning that one image cannot resolve 50%.
    assert!(stdout(&o).contains("fitted on 2 images"), "{}", stdout(&o));
    assert!(stdout(&o).contains("threshold "), "{}", stdout(&o));
    assert!(stderr(&o).contains("cannot resolve"), "{}", stderr(&o));
    let fit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("fit.json")).unwrap()).unwrap();
    assert_eq!(fit["held_out_images"], 1);
    assert_eq!(fit["threshold"]["method"]["name"], "false-alarm-rate");
    assert_eq!(fit["threshold"]["method"]["held_out_above"], 0);
    // 2 images × 784 patches × 1024 values × 4 bytes before the coreset.
    assert_eq!(
        fit["memory"]["bank_before_coreset_bytes"],
        2 * 784 * 1024 * 4
    );
    assert!(fit["memory"]["weights_bytes"].as_u64().unwrap() > 1_000_000);

    // predict: one line per image with score, decision and path; the threshold on stderr and in the JSON.
    let o = run_ok(
        &[
            "predict",
            "--model",
            "m.pc",
            "--out",
            "p",
            "--no-overlays",
            "data/test/defect/d.png",
        ],
        root,
    );
    let line = stdout(&o);
    let fields: Vec<&str> = line.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 3, "{line}");
    assert!(["anomalous", "normal"].contains(&fields[1]), "{line}");
    assert!(stderr(&o).contains("from the model"), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("p/predictions.json")).unwrap())
            .unwrap();
    assert_eq!(doc["threshold"]["source"], "model");
    assert_eq!(doc["predictions"][0]["decision"], fields[1]);

    // An explicit threshold overrides the model's: a huge one calls nothing anomalous.
    let o = run_ok(
        &[
            "predict",
            "--model",
            "m.pc",
            "--out",
            "p",
            "--no-overlays",
            "--threshold",
            "1e30",
            "data/test/defect/d.png",
        ],
        root,
    );
    assert!(stdout(&o).contains("\tnormal\t"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("from the command line"),
        "{}",
        stderr(&o)
    );
    let o = patchcore(
        &[
            "predict",
            "--model",
            "m.pc",
            "--out",
            "p",
            "--threshold",
            "nan",
            "data/test/defect/d.png",
        ],
        root,
    );
    assert_clean_failure(&o, "threshold");

    // eval --set-threshold f1: one good and one defective image separate perfectly, so the stored threshold is
    // the good image's score and the decisions are all right.
    let o = run_ok(
        &[
            "eval",
            "--model",
            "m.pc",
            "--data",
            "data",
            "--out",
            "e",
            "--overlays",
            "0",
            "--set-threshold",
            "f1",
            "--quiet",
        ],
        root,
    );
    assert!(stdout(&o).contains("F1-optimal"), "{}", stdout(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("e/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["image_auroc"], 1.0);
    assert_eq!(report["f1_max"]["f1"], 1.0);
    assert_eq!(report["threshold"]["method"]["name"], "f1-max");
    assert_eq!(report["decisions"]["true_positives"], 1);
    assert_eq!(report["decisions"]["true_negatives"], 1);
    let good_score = report["scores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "good")
        .unwrap()["score"]
        .clone();
    assert_eq!(report["threshold"]["value"], good_score);
    assert_eq!(
        report["roc_curve"],
        serde_json::json!([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    );
    let o = run_ok(
        &[
            "predict",
            "--model",
            "m.pc",
            "--out",
            "p",
            "--no-overlays",
            "data/test/defect",
            "data/test/good",
        ],
        root,
    );
    let out = stdout(&o);
    assert!(out.contains("\tanomalous\tdata/test/defect/d.png"), "{out}");
    assert!(out.contains("\tnormal\tdata/test/good/g.png"), "{out}");

    // A model without a threshold says so instead of inventing one.
    fit_lite0(&weights, "plain.pc", &["--coreset", "1"], root);
    let o = run_ok(
        &[
            "predict",
            "--model",
            "plain.pc",
            "--out",
            "q",
            "--no-overlays",
            "data/test/good/g.png",
        ],
        root,
    );
    assert!(stdout(&o).contains("\tno-threshold\t"), "{}", stdout(&o));
    assert!(stderr(&o).contains("no threshold"), "{}", stderr(&o));
}

/// Pixel AUROC and PRO end to end from MVTec-style `ground_truth/<kind>/<name>_mask.png` masks: both mask rules on a
/// mask that covers the whole image (they must agree there) and on a square (where the original's rule shrinks the
/// region), and no pixel metrics at all, with a note, when an anomalous image has no mask.
#[test]
fn pixel_metrics_come_from_ground_truth_masks() {
    let Some((weights, dir)) = real_cells("crack") else {
        return;
    };
    let root = dir.path();
    fit_lite0(&weights, "m.pc", &["--coreset", "1"], root);
    let mask_path = root.join("data/ground_truth/crack/d_mask.png");
    std::fs::create_dir_all(mask_path.parent().unwrap()).unwrap();
    let eval = |masks: &str, out: &str| -> serde_json::Value {
        run_ok(
            &[
                "eval",
                "--model",
                "m.pc",
                "--data",
                "data",
                "--out",
                out,
                "--overlays",
                "0",
                "--masks",
                masks,
                "--quiet",
            ],
            root,
        );
        serde_json::from_str(&std::fs::read_to_string(root.join(out).join("report.json")).unwrap())
            .unwrap()
    };
    let metric = |r: &serde_json::Value, key: &str| -> f64 {
        let v = r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {r}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        v
    };

    // The whole defective image is anomalous: both rules see the same mask, so the same metrics.
    image::GrayImage::from_pixel(300, 300, image::Luma([255u8]))
        .save(&mask_path)
        .unwrap();
    let full_original = eval("original-bilinear", "full-o");
    let full_nearest = eval("nearest", "full-n");
    assert!(full_original["pixel_metrics_note"].is_null());
    for key in ["pixel_auroc", "pro"] {
        assert_eq!(
            metric(&full_original, key),
            metric(&full_nearest, key),
            "{key}"
        );
    }

    // A square: the original's rule keeps only the pixels still at full intensity after the bilinear resize, a
    // smaller region than nearest-neighbour's, so the two rules give different pixel AUROCs.
    image::GrayImage::from_fn(300, 300, |x, y| {
        let inside = (100..200).contains(&x) && (120..220).contains(&y);
        image::Luma([if inside { 255u8 } else { 0 }])
    })
    .save(&mask_path)
    .unwrap();
    let square_original = eval("original-bilinear", "sq-o");
    let square_nearest = eval("nearest", "sq-n");
    assert_ne!(
        metric(&square_original, "pixel_auroc"),
        metric(&square_nearest, "pixel_auroc")
    );
    metric(&square_original, "pro");
    metric(&square_nearest, "pro");
    assert!(square_original["pro_curve"].as_array().unwrap().len() >= 2);

    // A second defective image without a mask: pixel metrics would count its defect as normal, so none are given.
    std::fs::copy(
        root.join("data/train/good/c.png"),
        root.join("data/test/crack/e.png"),
    )
    .unwrap();
    let partial = eval("original-bilinear", "partial");
    assert!(partial["pixel_auroc"].is_null() && partial["pro"].is_null());
    let note = partial["pixel_metrics_note"].as_str().unwrap();
    assert!(note.contains("have no mask"), "{note}");
    assert!(partial["image_auroc"].as_f64().is_some());
}

/// `fit --shortlist f32` records the arithmetic in the model, `--nn exact` keeps it, and the scores equal those of
/// the default (bfloat16 where the CPU has it) shortlist bit for bit; `--shortlist` with another backend is refused.
#[test]
fn shortlist_arithmetic_is_recorded_and_changes_no_score() {
    let Some((weights, dir)) = real_cells("defect") else {
        return;
    };
    let root = dir.path();
    let fit_eval = |extra: &[&str], name: &str| -> (Vec<u8>, serde_json::Value) {
        let model = format!("{name}.pc");
        let mut args = vec!["--coreset", "0.5"];
        args.extend_from_slice(extra);
        fit_lite0(&weights, &model, &args, root);
        run_ok(
            &[
                "eval",
                "--model",
                &model,
                "--data",
                "data",
                "--out",
                name,
                "--overlays",
                "0",
                "--quiet",
            ],
            root,
        );
        let report = std::fs::read_to_string(root.join(name).join("report.json")).unwrap();
        (
            std::fs::read(root.join(&model)).unwrap(),
            serde_json::from_str(&report).unwrap(),
        )
    };
    let contains =
        |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let (default_model, default_report) = fit_eval(&[], "default");
    let (f32_model, f32_report) = fit_eval(&["--nn", "exact", "--shortlist", "f32"], "f32");
    assert!(!contains(&default_model, "shortlist"));
    // The configuration is a JSON string inside the model's JSON header, so its quotes are escaped.
    assert!(contains(&f32_model, r#"\"shortlist\":\"f32\""#));
    assert_eq!(default_report["scores"], f32_report["scores"]);
    assert!(default_report["scores"]
        .as_array()
        .is_some_and(|s| s.len() == 2));

    let o = patchcore(
        &[
            "fit",
            "--data",
            "data",
            "--weights",
            &weights,
            "--out",
            "x.pc",
            "--nn",
            "faiss-flat",
            "--shortlist",
            "f32",
        ],
        root,
    );
    assert_clean_failure(&o, "--shortlist applies to the exact backend");
}
