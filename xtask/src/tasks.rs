//! The tasks that drive cargo: the full test run and the demo.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::elpv::{self, CellType};
use crate::paths::workspace_root;
use crate::report;
use crate::weights;

/// Returns the cargo that runs this task, or `cargo` from PATH.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// Returns a cargo command with `args`, run in the workspace root.
pub(crate) fn cargo_command(args: &[&str]) -> Command {
    let mut command = Command::new(cargo());
    command.args(args).current_dir(workspace_root());
    command
}

/// Runs `command` with inherited output, failing with `step` named unless it succeeds.
fn run_step(step: &str, command: &mut Command) -> Result<()> {
    eprintln!("xtask: running `{step}`");
    let status = command
        .status()
        .with_context(|| format!("could not start `{step}`"))?;
    if !status.success() {
        bail!("step `{step}` failed ({status})");
    }
    Ok(())
}

/// Runs the project's full test command.
///
/// It fetches the Lite0 weights, runs the workspace tests with them required,
/// and then, unless `quick`, checks formatting, lints and documentation.
pub fn test(cache: &Path, quick: bool) -> Result<()> {
    let weights = weights::fetch_lite0(cache).context("step `fetch lite0-weights` failed")?;
    eprintln!("xtask: weights at {}", weights.display());

    run_step(
        "cargo test --workspace --release",
        cargo_command(&["test", "--workspace", "--release"])
            .env("PATCHCORE_LITE0_WEIGHTS", &weights)
            .env("PATCHCORE_REQUIRE_WEIGHTS", "1"),
    )?;
    if quick {
        return Ok(());
    }
    run_step(
        "cargo fmt --all -- --check",
        &mut cargo_command(&["fmt", "--all", "--", "--check"]),
    )?;
    run_step(
        "cargo clippy --workspace --all-targets --release -- -D warnings",
        &mut cargo_command(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step(
        "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps --release",
        cargo_command(&["doc", "--workspace", "--no-deps", "--release"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    eprintln!("xtask: all test steps passed");
    Ok(())
}

/// Returns the demo's default output folder for `cell_type`.
pub fn default_demo_out(cell_type: CellType) -> PathBuf {
    workspace_root()
        .join("target")
        .join("patchcore-demo")
        .join(format!("elpv-{}", cell_type.name()))
}

/// Runs the demo: fits PatchCore on the ELPV cells of `cell_type`, evaluates
/// it, and prints a summary of the report.
pub fn demo(cache: &Path, out: &Path, cell_type: CellType) -> Result<()> {
    let weights = weights::fetch_lite0(cache).context("fetching the Lite0 weights failed")?;
    let layout = elpv::fetch(cache).context("fetching the ELPV data set failed")?;
    let data = layout.root.join(cell_type.name());
    fs::create_dir_all(out)
        .with_context(|| format!("could not create the folder {}", out.display()))?;
    let model = out.join("model.patchcore");
    let report_path = out.join("report.json");
    // A report left by an earlier run must not pass for this run's.
    if report_path.exists() {
        fs::remove_file(&report_path)
            .with_context(|| format!("could not remove {}", report_path.display()))?;
    }

    let cli = ["run", "--release", "-q", "-p", "patchcore-cli", "--"];
    let mut fit = cargo_command(&cli);
    fit.arg("fit")
        .arg("--data")
        .arg(&data)
        .args(["--preset", "lite0", "--weights"])
        .arg(&weights)
        .args(["--coreset", "0.01", "--k", "1", "--seed", "0", "--out"])
        .arg(&model);
    let started = Instant::now();
    run_step("patchcore fit", &mut fit)?;
    let fit_wall = started.elapsed().as_secs_f64();

    let mut eval = cargo_command(&cli);
    eval.arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--weights")
        .arg(&weights)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(out);
    let started = Instant::now();
    run_step("patchcore eval", &mut eval)?;
    let eval_wall = started.elapsed().as_secs_f64();

    let text = fs::read_to_string(&report_path).with_context(|| {
        format!(
            "`patchcore eval` succeeded but {} cannot be read",
            report_path.display()
        )
    })?;
    let summary = report::parse_report(&text)
        .with_context(|| format!("{} is not a valid report", report_path.display()))?;
    let overlays = crate::fsutil::count_pngs(&out.join("overlays"))?;
    let reference = (cell_type == CellType::Mono).then_some(report::REFERENCE_MONO_AUROC);
    println!("PatchCore demo on ELPV {} cells", cell_type.name());
    print!(
        "{}",
        report::render_summary(&summary, reference, out, overlays)
    );
    println!("wall time: fit {fit_wall:.1} s, eval {eval_wall:.1} s (including any build)");
    Ok(())
}
