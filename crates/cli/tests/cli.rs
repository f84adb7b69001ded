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
