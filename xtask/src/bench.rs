//! `cargo xtask bench`: fit and evaluate per category, then write a report (markdown, JSON, CSV, ROC and PRO
//! plots, and a few heatmap overlays per category).
//!
//! Every fit and every evaluation runs as its own `patchcore` process (the release binary, built once), so each
//! stage's peak memory is its own: `patchcore fit --report` records the process's `VmHWM` at the end of the fit,
//! and the bound it is compared with is 1.5 × (the embeddings before the coreset + the weights file).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::args::Options;
use crate::elpv::{self, CellType};
use crate::fsutil::ScratchDir;
use crate::paths::workspace_root;
use crate::plot::{self, PlotSpec};
use crate::tasks::cargo_command;
use crate::weights;

/// A backbone the bench can run: its name on the command line, the `patchcore fit --preset` it maps to, and how
/// to get its weights into the cache.
#[derive(Debug)]
pub struct Backbone {
    /// The name given to `--backbone`.
    pub name: &'static str,
    /// The `patchcore fit --preset` value.
    pub preset: &'static str,
    /// Fetches the weights (if missing) and returns their path.
    pub weights: fn(&Path) -> Result<PathBuf>,
}

/// A ResNet-family backbone whose preset and torchvision checkpoint share its name.
macro_rules! torchvision_backbone {
    ($name:literal) => {
        Backbone {
            name: $name,
            preset: $name,
            weights: |cache| crate::torchvision::fetch_model(cache, $name),
        }
    };
}

/// Every backbone the bench knows; a new preset is one line here.
pub const BACKBONES: &[Backbone] = &[
    Backbone {
        name: "lite0",
        preset: "lite0",
        weights: weights::fetch_lite0,
    },
    torchvision_backbone!("wide_resnet50_2"),
    torchvision_backbone!("wide_resnet101_2"),
    torchvision_backbone!("resnet18"),
    torchvision_backbone!("resnet34"),
    torchvision_backbone!("resnet50"),
    torchvision_backbone!("resnet101"),
    torchvision_backbone!("resnet152"),
];

/// A nearest-neighbour backend the bench can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NnBackend {
    /// The name `--nn` takes.
    pub name: &'static str,
    /// The extra `patchcore fit` arguments that select it (exact search is every preset's default).
    pub fit_args: &'static [&'static str],
    /// The cargo feature of `patchcore-cli` the backend needs, if any.
    pub feature: Option<&'static str>,
}

/// Every nearest-neighbour backend the bench knows; a new backend is one line here.
pub const NN_BACKENDS: &[NnBackend] = &[
    NnBackend {
        name: "exact",
        fit_args: &[],
        feature: None,
    },
    NnBackend {
        name: "faiss-flat",
        fit_args: &["--nn", "faiss-flat"],
        feature: Some("faiss"),
    },
    NnBackend {
        name: "ivfpq",
        fit_args: &["--nn", "ivfpq"],
        feature: Some("faiss"),
    },
    NnBackend {
        name: "faiss-gpu",
        fit_args: &["--nn", "faiss-gpu"],
        feature: Some("faiss-gpu"),
    },
];

/// Which data set to run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dataset {
    /// MVTec AD under `<cache>/data/mvtec/<category>/`.
    Mvtec,
    /// The ELPV cells of one type, from the cache (fetched when missing).
    Elpv(CellType),
    /// A folder in MVTec layout: one category (it has `train/good`) or a folder of categories.
    Path(PathBuf),
}

impl Dataset {
    /// Parses `--dataset`.
    pub fn parse(name: &str) -> Self {
        match name {
            "mvtec" => Self::Mvtec,
            "elpv-mono" => Self::Elpv(CellType::Mono),
            "elpv-poly" => Self::Elpv(CellType::Poly),
            path => Self::Path(PathBuf::from(path)),
        }
    }

    /// A short name for folder names and the report.
    pub fn label(&self) -> String {
        match self {
            Self::Mvtec => "mvtec".into(),
            Self::Elpv(t) => format!("elpv-{}", t.name()),
            Self::Path(p) => p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("data")
                .to_string(),
        }
    }
}

/// The bench's settings, as parsed from the command line.
#[derive(Debug)]
pub struct BenchArgs {
    /// The data set.
    pub dataset: Dataset,
    /// Only these categories, if given.
    pub categories: Option<Vec<String>>,
    /// The backbone's name (see [`BACKBONES`]).
    pub backbone: &'static Backbone,
    /// The coreset ratio.
    pub coreset: f64,
    /// The nearest-neighbour backend (see [`NN_BACKENDS`]).
    pub nn: &'static NnBackend,
    /// Overlays per category.
    pub overlays: usize,
    /// The output folder, if given.
    pub out: Option<PathBuf>,
}

impl BenchArgs {
    /// The options `cargo xtask bench` accepts besides `--cache`.
    pub const OPTIONS: &'static [&'static str] = &[
        "--dataset",
        "--category",
        "--backbone",
        "--coreset",
        "--nn",
        "--overlays",
        "--out",
        "--cache",
    ];

    /// Reads the options; unknown names and out-of-range values are errors naming the option.
    pub fn from_options(options: &Options) -> Result<Self> {
        let dataset = Dataset::parse(options.value("--dataset").unwrap_or("elpv-mono"));
        let categories = options.value("--category").map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        });
        let backbone = lookup_backbone(options.value("--backbone").unwrap_or("lite0"))?;
        let coreset: f64 = match options.value("--coreset") {
            None => 0.01,
            Some(text) => text
                .parse()
                .ok()
                .filter(|r: &f64| *r > 0.0 && *r <= 1.0)
                .with_context(|| {
                    format!("`--coreset {text}`: expected a ratio in (0, 1], such as 0.01")
                })?,
        };
        let nn = lookup_nn(options.value("--nn").unwrap_or("exact"))?;
        let overlays = match options.value("--overlays") {
            None => 4,
            Some(text) => text.parse().with_context(|| {
                format!("`--overlays {text}`: expected a number of images, such as 4")
            })?,
        };
        Ok(Self {
            dataset,
            categories,
            backbone,
            coreset,
            nn,
            overlays,
            out: options.value("--out").map(PathBuf::from),
        })
    }
}

/// The backbone named `name`.
pub fn lookup_backbone(name: &str) -> Result<&'static Backbone> {
    BACKBONES.iter().find(|b| b.name == name).with_context(|| {
        let known: Vec<&str> = BACKBONES.iter().map(|b| b.name).collect();
        format!(
            "unknown backbone `{name}`: expected one of {}",
            known.join(", ")
        )
    })
}

/// The nearest-neighbour backend named `name`.
pub fn lookup_nn(name: &str) -> Result<&'static NnBackend> {
    NN_BACKENDS
        .iter()
        .find(|b| b.name == name)
        .with_context(|| {
            let known: Vec<&str> = NN_BACKENDS.iter().map(|b| b.name).collect();
            format!(
                "unknown nearest-neighbour backend `{name}`: expected one of {}",
                known.join(", ")
            )
        })
}

/// The categories of a data set: (name, folder in MVTec layout), in name order.
pub fn categories(dataset: &Dataset, cache: &Path) -> Result<Vec<(String, PathBuf)>> {
    match dataset {
        Dataset::Elpv(cell_type) => {
            let layout = elpv::fetch(cache).context("fetching the ELPV data set failed")?;
            Ok(vec![(
                cell_type.name().to_string(),
                layout.root.join(cell_type.name()),
            )])
        }
        Dataset::Mvtec => {
            let root = cache.join("data").join("mvtec");
            if !root.is_dir() {
                bail!(
                    "MVTec AD is not in the cache: expected {}/<category>/train/good (download it into the cache \
                     first, or pass --dataset PATH to a folder in MVTec layout)",
                    root.display()
                );
            }
            category_folders(&root)
        }
        Dataset::Path(path) => {
            if !path.is_dir() {
                bail!("--dataset {}: no such folder", path.display());
            }
            if path.join("train").join("good").is_dir() {
                Ok(vec![(dataset.label(), path.clone())])
            } else {
                category_folders(path)
            }
        }
    }
}

/// The subfolders of `root` that have `train/good`, in name order.
fn category_folders(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(root).with_context(|| format!("could not list {}", root.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("could not list {}", root.display()))?
            .path();
        if path.join("train").join("good").is_dir() {
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "no categories in {}: expected <category>/train/good/ subfolders (MVTec layout)",
            root.display()
        );
    }
    Ok(out)
}

/// Keeps the categories named in `wanted`; a name that is not there is an error listing those that are.
pub fn select(
    all: Vec<(String, PathBuf)>,
    wanted: Option<&[String]>,
) -> Result<Vec<(String, PathBuf)>> {
    let Some(wanted) = wanted else {
        return Ok(all);
    };
    for name in wanted {
        if !all.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "unknown category `{name}`: this data set has {}",
                known.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|(n, _)| wanted.contains(n))
        .collect())
}

/// One category's results; `None` where a value does not apply (pixel metrics without masks) or the category
/// failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CategoryResult {
    /// The category's name.
    pub category: String,
    /// Image AUROC.
    pub image_auroc: Option<f64>,
    /// Pixel AUROC.
    pub pixel_auroc: Option<f64>,
    /// PRO up to FPR 0.3.
    pub pro: Option<f64>,
    /// Wall time of `patchcore fit`, seconds.
    pub fit_seconds: Option<f64>,
    /// Coreset selection, seconds.
    pub coreset_seconds: Option<f64>,
    /// Predict time per test image, milliseconds.
    pub predict_ms_per_image: Option<f64>,
    /// Peak RSS of the fit process, bytes.
    pub fit_peak_rss_bytes: Option<u64>,
    /// The embeddings before the coreset, bytes.
    pub bank_before_coreset_bytes: Option<u64>,
    /// The weights file, bytes.
    pub weights_bytes: Option<u64>,
    /// Memory-bank entries after the coreset.
    pub bank_size: Option<u64>,
    /// Test images scored.
    pub test_images: Option<u64>,
    /// The ROC curve's points.
    pub roc_curve: Vec<(f64, f64)>,
    /// The PRO curve's points.
    pub pro_curve: Vec<(f64, f64)>,
    /// Why the category failed, if it did.
    pub error: Option<String>,
}

impl CategoryResult {
    /// 1.5 × (embeddings before the coreset + weights), the bound on the fit's peak RSS.
    pub fn rss_bound_bytes(&self) -> Option<f64> {
        Some(1.5 * (self.bank_before_coreset_bytes? + self.weights_bytes?) as f64)
    }
}

/// One column of the tables: header, unit note, digits, and the value.
struct Column {
    header: &'static str,
    key: &'static str,
    digits: usize,
    value: fn(&CategoryResult) -> Option<f64>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The report's columns, in order; the markdown, CSV and JSON mean row all come from this list.
const COLUMNS: &[Column] = &[
    Column {
        header: "image AUROC",
        key: "image_auroc",
        digits: 4,
        value: |r| r.image_auroc,
    },
    Column {
        header: "pixel AUROC",
        key: "pixel_auroc",
        digits: 4,
        value: |r| r.pixel_auroc,
    },
    Column {
        header: "PRO",
        key: "pro",
        digits: 4,
        value: |r| r.pro,
    },
    Column {
        header: "fit s",
        key: "fit_seconds",
        digits: 1,
        value: |r| r.fit_seconds,
    },
    Column {
        header: "coreset s",
        key: "coreset_seconds",
        digits: 1,
        value: |r| r.coreset_seconds,
    },
    Column {
        header: "predict ms/image",
        key: "predict_ms_per_image",
        digits: 1,
        value: |r| r.predict_ms_per_image,
    },
    Column {
        header: "fit peak RSS MiB",
        key: "fit_peak_rss_mib",
        digits: 0,
        value: |r| r.fit_peak_rss_bytes.map(|b| b as f64 / MIB),
    },
    Column {
        header: "bound MiB",
        key: "rss_bound_mib",
        digits: 0,
        value: |r| r.rss_bound_bytes().map(|b| b / MIB),
    },
    Column {
        header: "bank size",
        key: "bank_size",
        digits: 0,
        value: |r| r.bank_size.map(|b| b as f64),
    },
];

/// The mean of each column over the categories; `None` for a column where any category has no value (a mean over
/// some categories only would not be comparable with other runs), or when there are no categories.
fn means(results: &[CategoryResult]) -> Vec<Option<f64>> {
    COLUMNS
        .iter()
        .map(|c| {
            let values: Option<Vec<f64>> = results.iter().map(|r| (c.value)(r)).collect();
            values
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64)
        })
        .collect()
}

fn cell(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) => format!("{v:.digits$}"),
        None => "n/a".into(),
    }
}

/// What the report says about how it was made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BenchSettings {
    /// The data set's label.
    pub dataset: String,
    /// The backbone's name.
    pub backbone: String,
    /// The coreset ratio.
    pub coreset: f64,
    /// The nearest-neighbour backend's name.
    pub nn: String,
    /// When the bench started, UTC.
    pub started: String,
    /// The machine: CPUs, memory, load.
    pub machine: String,
}

/// The markdown report: settings, the table with a mean row, a legend and links to the plots.
pub fn render_markdown(settings: &BenchSettings, results: &[CategoryResult]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# PatchCore bench: {}\n", settings.dataset);
    let _ = writeln!(
        md,
        "Backbone `{}`, coreset {}, nearest neighbours `{}`, k = 1, seed 0. Started {} UTC on {}.\n",
        settings.backbone, settings.coreset, settings.nn, settings.started, settings.machine
    );
    let headers: Vec<&str> = COLUMNS.iter().map(|c| c.header).collect();
    let _ = writeln!(md, "| category | {} |", headers.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(COLUMNS.len()));
    for r in results {
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|c| cell((c.value)(r), c.digits))
            .collect();
        let _ = writeln!(md, "| {} | {} |", r.category, cells.join(" | "));
    }
    let cells: Vec<String> = means(results)
        .iter()
        .zip(COLUMNS)
        .map(|(m, c)| cell(*m, c.digits))
        .collect();
    let _ = writeln!(md, "| **mean** | {} |", cells.join(" | "));
    md.push_str(
        "\nn/a: not applicable (pixel AUROC and PRO need ground-truth masks) or not measured; a mean is n/a when \
         any category lacks the value. Fit s is the wall time of `patchcore fit` (decode, embed, coreset, index, \
         save); predict ms/image covers preprocessing (resize, crop, normalise), the backbone, embedding, search \
         and the anomaly map, per image in batches of the model's batch size (file decoding is not timed). Fit \
         peak RSS is the \
         fit process's `VmHWM`; the bound is 1.5 × (embeddings before the coreset + the weights file).\n",
    );
    let failed: Vec<&CategoryResult> = results.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        md.push_str("\n## Failures\n\n");
        for r in failed {
            let _ = writeln!(
                md,
                "- {}: {}",
                r.category,
                r.error.as_deref().unwrap_or_default()
            );
        }
    }
    md.push_str(
        "\n## Curves\n\n`roc_<category>.png`: ROC, false-positive rate (x, 0–1) against true-positive rate \
         (y, 0–1), blue, with the dashed chance diagonal. `pro_<category>.png`: PRO, false-positive rate (x, \
         0–0.3) against per-region overlap (y, 0–1), red. Grid lines every tenth of each axis. Overlays: \
         `<category>/overlays/`.\n\n",
    );
    for r in results {
        if !r.roc_curve.is_empty() {
            let _ = writeln!(md, "![ROC {0}](roc_{0}.png)", r.category);
        }
        if !r.pro_curve.is_empty() {
            let _ = writeln!(md, "![PRO {0}](pro_{0}.png)", r.category);
        }
    }
    md
}

/// The CSV report: one row per category and a mean row; empty cells where the markdown says n/a.
pub fn render_csv(results: &[CategoryResult]) -> String {
    let mut csv = String::from("category");
    for c in COLUMNS {
        csv.push(',');
        csv.push_str(c.key);
    }
    csv.push('\n');
    let row = |csv: &mut String, name: &str, values: Vec<Option<f64>>| {
        // Category names come from folder names; quote them when they could break the row.
        if name.contains([',', '"', '\n']) {
            let _ = write!(csv, "\"{}\"", name.replace('"', "\"\""));
        } else {
            csv.push_str(name);
        }
        for v in values {
            csv.push(',');
            if let Some(v) = v {
                let _ = write!(csv, "{v}");
            }
        }
        csv.push('\n');
    };
    for r in results {
        row(
            &mut csv,
            &r.category,
            COLUMNS.iter().map(|c| (c.value)(r)).collect(),
        );
    }
    row(&mut csv, "mean", means(results));
    csv
}

fn curve_json(points: &[(f64, f64)]) -> Value {
    points.iter().map(|(x, y)| json!([x, y])).collect()
}

/// The JSON report: settings, every category with raw values (bytes, seconds) and curves, and the mean row.
pub fn render_json(settings: &BenchSettings, results: &[CategoryResult]) -> Value {
    let categories: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "category": r.category,
                "image_auroc": r.image_auroc,
                "pixel_auroc": r.pixel_auroc,
                "pro": r.pro,
                "fit_seconds": r.fit_seconds,
                "coreset_seconds": r.coreset_seconds,
                "predict_ms_per_image": r.predict_ms_per_image,
                "fit_peak_rss_bytes": r.fit_peak_rss_bytes,
                "bank_before_coreset_bytes": r.bank_before_coreset_bytes,
                "weights_bytes": r.weights_bytes,
                "rss_bound_bytes": r.rss_bound_bytes(),
                "within_rss_bound": r.fit_peak_rss_bytes.zip(r.rss_bound_bytes()).map(|(p, b)| (p as f64) < b),
                "bank_size": r.bank_size,
                "test_images": r.test_images,
                "roc_curve": curve_json(&r.roc_curve),
                "pro_curve": curve_json(&r.pro_curve),
                "error": r.error,
            })
        })
        .collect();
    let mean: serde_json::Map<String, Value> = COLUMNS
        .iter()
        .zip(means(results))
        .map(|(c, m)| (c.key.to_string(), json!(m)))
        .collect();
    json!({
        "dataset": settings.dataset,
        "backbone": settings.backbone,
        "coreset": settings.coreset,
        "nn": settings.nn,
        "k": 1,
        "seed": 0,
        "started_utc": settings.started,
        "machine": settings.machine,
        "categories": categories,
        "mean": mean,
    })
}

/// The UTC date and time of `secs` seconds after the Unix epoch as (year, month, day, hour, minute, second).
pub fn utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm): eras of 400 years starting on 1 March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// A description of this machine for the report: CPU model and count, memory, load average.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let kb: f64 = t
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB RAM", kb / MIB))
        })
        .unwrap_or_else(|| "unknown memory".into());
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{cpus} CPUs ({model}), {memory}, {} {}, load average {load} at the start",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// Builds the CLI once, with the cargo feature the nearest-neighbour backend needs, and returns the path of the
/// release binary.
fn build_cli(feature: Option<&str>) -> Result<PathBuf> {
    eprintln!("xtask: building the patchcore binary (release)");
    let mut cargo_args = vec![
        "build",
        "--release",
        "-q",
        "-p",
        "patchcore-cli",
        "--message-format=json-render-diagnostics",
    ];
    if let Some(feature) = feature {
        cargo_args.extend(["--features", feature]);
    }
    let output = cargo_command(&cargo_args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start `cargo build -p patchcore-cli`")?;
    if !output.status.success() {
        bail!(
            "`cargo build --release -p patchcore-cli` failed ({})",
            output.status
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == "patchcore" {
            if let Some(exe) = message["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("`cargo build -p patchcore-cli` reported no `patchcore` executable")
}

/// Runs one stage as a child process with inherited output.
fn run_stage(what: &str, command: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn curve(value: &Value) -> Vec<(f64, f64)> {
    value
        .as_array()
        .map(|points| {
            points
                .iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Fits and evaluates one category into `dir`.
fn run_category(
    exe: &Path,
    args: &BenchArgs,
    weights: &Path,
    name: &str,
    data: &Path,
    dir: &Path,
) -> Result<CategoryResult> {
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let model = dir.join("model.patchcore");
    let fit_report = dir.join("fit.json");
    let mut fit = Command::new(exe);
    fit.arg("fit")
        .arg("--data")
        .arg(data)
        .args(["--preset", args.backbone.preset, "--weights"])
        .arg(weights)
        .args([
            "--coreset",
            &args.coreset.to_string(),
            "--k",
            "1",
            "--seed",
            "0",
        ])
        .args(args.nn.fit_args)
        .args(["--quiet", "--out"])
        .arg(&model)
        .arg("--report")
        .arg(&fit_report);
    eprintln!("xtask: {name}: patchcore fit");
    let fit_seconds = run_stage("patchcore fit", &mut fit)?;
    let mut eval = Command::new(exe);
    eval.arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--weights")
        .arg(weights)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(dir)
        .args(["--quiet", "--overlays", &args.overlays.to_string()]);
    eprintln!("xtask: {name}: patchcore eval");
    run_stage("patchcore eval", &mut eval)?;
    let fit = read_json(&fit_report)?;
    let report = read_json(&dir.join("report.json"))?;
    let memory = &fit["memory"];
    Ok(CategoryResult {
        category: name.to_string(),
        image_auroc: report["image_auroc"].as_f64(),
        pixel_auroc: report["pixel_auroc"].as_f64(),
        pro: report["pro"].as_f64(),
        fit_seconds: Some(fit_seconds),
        coreset_seconds: fit["fit"]["coreset_seconds"].as_f64(),
        predict_ms_per_image: report["timings"]["predict_seconds_per_image"]
            .as_f64()
            .map(|s| s * 1000.0),
        fit_peak_rss_bytes: memory["peak_rss_bytes"].as_u64(),
        bank_before_coreset_bytes: memory["bank_before_coreset_bytes"].as_u64(),
        weights_bytes: memory["weights_bytes"].as_u64(),
        bank_size: report["bank_size"].as_u64(),
        test_images: report["scores"].as_array().map(|s| s.len() as u64),
        roc_curve: curve(&report["roc_curve"]),
        pro_curve: curve(&report["pro_curve"]),
        error: None,
    })
}

/// Writes a file inside the bench's scratch folder.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    fs::write(&path, bytes).with_context(|| format!("could not write {}", path.display()))
}

/// Runs the bench and returns the report folder.
pub fn bench(cache: &Path, args: &BenchArgs) -> Result<PathBuf> {
    let all = categories(&args.dataset, cache)?;
    let chosen = select(all, args.categories.as_deref())?;
    let weights = (args.backbone.weights)(cache)
        .with_context(|| format!("fetching the {} weights failed", args.backbone.name))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, mo, d, h, mi, s) = utc(now);
    let stamp = format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}");
    let out = match &args.out {
        Some(out) => crate::paths::absolute(out)?,
        None => workspace_root()
            .join("target")
            .join("patchcore-bench")
            .join(format!("{}-{stamp}", args.dataset.label())),
    };
    if out.exists() {
        bail!(
            "the report folder {} exists already; pass another --out",
            out.display()
        );
    }
    let settings = BenchSettings {
        dataset: args.dataset.label(),
        backbone: args.backbone.name.to_string(),
        coreset: args.coreset,
        nn: args.nn.name.to_string(),
        started: format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"),
        machine: machine(),
    };
    let exe = build_cli(args.nn.feature)?;
    // Everything is written into a scratch folder next to the destination and renamed into place at the end,
    // so an interrupted bench leaves no half-written report.
    let parent = out
        .parent()
        .context("the report folder has no parent folder")?;
    let scratch = ScratchDir::new(parent, "patchcore-bench")?;
    let mut results = Vec::new();
    for (name, data) in &chosen {
        let dir = scratch.path().join(name);
        let result = run_category(&exe, args, &weights, name, data, &dir).unwrap_or_else(|e| {
            eprintln!("xtask: {name} failed: {e:#}");
            CategoryResult {
                category: name.clone(),
                error: Some(format!("{e:#}")),
                ..CategoryResult::default()
            }
        });
        if !result.roc_curve.is_empty() {
            write(
                scratch.path(),
                &format!("roc_{name}.png"),
                &plot::plot_png(&PlotSpec::ROC, &result.roc_curve)?,
            )?;
        }
        if !result.pro_curve.is_empty() {
            write(
                scratch.path(),
                &format!("pro_{name}.png"),
                &plot::plot_png(&PlotSpec::PRO, &result.pro_curve)?,
            )?;
        }
        results.push(result);
    }
    let markdown = render_markdown(&settings, &results);
    write(scratch.path(), "report.md", markdown.as_bytes())?;
    write(
        scratch.path(),
        "report.json",
        serde_json::to_string_pretty(&render_json(&settings, &results))?.as_bytes(),
    )?;
    write(
        scratch.path(),
        "report.csv",
        render_csv(&results).as_bytes(),
    )?;
    scratch.persist_as(&out)?;
    print!("{markdown}");
    println!("\nreport written to {}", out.display());
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} categories failed (see {})",
            results.len(),
            out.join("report.md").display()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BenchSettings {
        BenchSettings {
            dataset: "synthetic".into(),
            backbone: "lite0".into(),
            coreset: 0.01,
            nn: "exact".into(),
            started: "2026-12-03 12:00:00".into(),
            machine: "test machine".into(),
        }
    }

    fn results() -> Vec<CategoryResult> {
        vec![
            CategoryResult {
                category: "bottle".into(),
                image_auroc: Some(1.0),
                pixel_auroc: Some(0.98),
                pro: Some(0.9),
                fit_seconds: Some(10.0),
                coreset_seconds: Some(4.0),
                predict_ms_per_image: Some(50.0),
                fit_peak_rss_bytes: Some(1024 * 1024 * 1024),
                bank_before_coreset_bytes: Some(1024 * 1024 * 1024),
                weights_bytes: Some(0),
                bank_size: Some(1000),
                test_images: Some(10),
                roc_curve: vec![(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)],
                pro_curve: vec![(0.0, 0.0), (0.3, 0.9)],
                error: None,
            },
            CategoryResult {
                category: "cable".into(),
                image_auroc: Some(0.8),
                pixel_auroc: None,
                pro: None,
                fit_seconds: Some(20.0),
                coreset_seconds: Some(6.0),
                predict_ms_per_image: Some(70.0),
                fit_peak_rss_bytes: Some(512 * 1024 * 1024),
                bank_before_coreset_bytes: Some(512 * 1024 * 1024),
                weights_bytes: Some(512 * 1024 * 1024),
                bank_size: Some(3000),
                test_images: Some(20),
                roc_curve: vec![(0.0, 0.0), (1.0, 1.0)],
                pro_curve: Vec::new(),
                error: None,
            },
        ]
    }

    #[test]
    fn markdown_has_rows_mean_and_n_a() {
        let md = render_markdown(&settings(), &results());
        assert!(
            md.contains("| category | image AUROC | pixel AUROC | PRO | fit s |"),
            "{md}"
        );
        // Bound: 1.5 × (1024 MiB + 0) = 1536 MiB; 1.5 × (512 + 512) MiB = 1536 MiB.
        assert!(
            md.contains(
                "| bottle | 1.0000 | 0.9800 | 0.9000 | 10.0 | 4.0 | 50.0 | 1024 | 1536 | 1000 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| cable | 0.8000 | n/a | n/a | 20.0 | 6.0 | 70.0 | 512 | 1536 | 3000 |"),
            "{md}"
        );
        // Means: AUROC (1 + 0.8) / 2; pixel metrics n/a because cable has none; bank (1000 + 3000) / 2.
        assert!(
            md.contains(
                "| **mean** | 0.9000 | n/a | n/a | 15.0 | 5.0 | 60.0 | 768 | 1536 | 2000 |"
            ),
            "{md}"
        );
        assert!(md.contains("![ROC bottle](roc_bottle.png)"), "{md}");
        assert!(md.contains("![PRO bottle](pro_bottle.png)"), "{md}");
        assert!(!md.contains("![PRO cable]"), "{md}");
        assert!(!md.contains("Failures"), "{md}");
    }

    #[test]
    fn csv_has_empty_cells_for_n_a_and_a_mean_row() {
        let csv = render_csv(&results());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "category,image_auroc,pixel_auroc,pro,fit_seconds,coreset_seconds,predict_ms_per_image,\
             fit_peak_rss_mib,rss_bound_mib,bank_size"
        );
        assert_eq!(lines[1], "bottle,1,0.98,0.9,10,4,50,1024,1536,1000");
        assert_eq!(lines[2], "cable,0.8,,,20,6,70,512,1536,3000");
        assert_eq!(lines[3], "mean,0.9,,,15,5,60,768,1536,2000");
        assert_eq!(lines.len(), 4);
        let odd = CategoryResult {
            category: "a,\"b\"".into(),
            ..CategoryResult::default()
        };
        assert!(render_csv(&[odd]).contains("\n\"a,\"\"b\"\"\",,,"));
    }

    #[test]
    fn json_has_raw_values_curves_and_mean() {
        let v = render_json(&settings(), &results());
        assert_eq!(v["dataset"], "synthetic");
        assert_eq!(v["categories"][0]["fit_peak_rss_bytes"], 1024 * 1024 * 1024);
        assert_eq!(v["categories"][0]["within_rss_bound"], true);
        assert_eq!(v["categories"][1]["pixel_auroc"], Value::Null);
        assert_eq!(
            v["categories"][0]["roc_curve"],
            json!([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        );
        assert_eq!(v["mean"]["image_auroc"], 0.9);
        assert_eq!(v["mean"]["pro"], Value::Null);
    }

    #[test]
    fn failures_are_listed_and_no_categories_mean_n_a() {
        let failed = CategoryResult {
            category: "screw".into(),
            error: Some("`patchcore fit` failed".into()),
            ..CategoryResult::default()
        };
        let md = render_markdown(&settings(), &[failed]);
        assert!(md.contains("| screw | n/a | n/a | n/a |"), "{md}");
        assert!(md.contains("- screw: `patchcore fit` failed"), "{md}");
        assert!(render_markdown(&settings(), &[]).contains("| **mean** | n/a |"));
    }

    #[test]
    fn names_map_in_one_place_and_unknown_ones_are_errors() {
        assert_eq!(lookup_backbone("lite0").unwrap().preset, "lite0");
        assert_eq!(
            lookup_backbone("wide_resnet50_2").unwrap().preset,
            "wide_resnet50_2"
        );
        // Every ResNet-family backbone has a torchvision checkpoint to fetch.
        for backbone in BACKBONES.iter().filter(|b| b.name != "lite0") {
            assert!(
                crate::torchvision::MODELS
                    .iter()
                    .any(|(model, _)| *model == backbone.name),
                "{}",
                backbone.name
            );
        }
        let e = lookup_backbone("resnet9000").unwrap_err().to_string();
        assert!(
            e.contains("unknown backbone `resnet9000`") && e.contains("lite0"),
            "{e}"
        );
        assert_eq!(lookup_nn("exact").unwrap().name, "exact");
        assert_eq!(lookup_nn("ivfpq").unwrap().feature, Some("faiss"));
        assert!(lookup_nn("faiss")
            .unwrap_err()
            .to_string()
            .contains("exact"));
        assert_eq!(Dataset::parse("mvtec"), Dataset::Mvtec);
        assert_eq!(Dataset::parse("elpv-poly"), Dataset::Elpv(CellType::Poly));
        assert_eq!(Dataset::parse("/d/x").label(), "x");
        let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let options =
            Options::parse(&strings(&["--coreset", "2"]), BenchArgs::OPTIONS, &[]).unwrap();
        let e = BenchArgs::from_options(&options).unwrap_err().to_string();
        assert!(e.contains("--coreset 2"), "{e}");
        let options =
            Options::parse(&strings(&["--category", "a, b"]), BenchArgs::OPTIONS, &[]).unwrap();
        let args = BenchArgs::from_options(&options).unwrap();
        assert_eq!(
            args.categories,
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            (args.coreset, args.nn.name, args.overlays),
            (0.01, "exact", 4)
        );
    }

    #[test]
    fn categories_are_found_selected_and_named() {
        let dir = tempfile_dir();
        let root = dir.join("set");
        for c in ["carpet", "bottle"] {
            fs::create_dir_all(root.join(c).join("train/good")).unwrap();
        }
        fs::create_dir_all(root.join("notes")).unwrap();
        let cache = dir.join("cache");
        let all = categories(&Dataset::Path(root.clone()), &cache).unwrap();
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bottle", "carpet"]);
        // A single category folder is its own category.
        let one = categories(&Dataset::Path(root.join("bottle")), &cache).unwrap();
        assert_eq!(one[0].0, "bottle");
        let picked = select(all.clone(), Some(&["carpet".to_string()])).unwrap();
        assert_eq!(picked.len(), 1);
        let e = select(all, Some(&["zipper".to_string()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zipper") && e.contains("bottle, carpet"), "{e}");
        // MVTec AD missing from the cache is named with the expected path.
        let e = categories(&Dataset::Mvtec, &cache).unwrap_err().to_string();
        assert!(
            e.contains("MVTec AD is not in the cache") && e.contains("data/mvtec"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh folder under the system's temporary folder (xtask has no tempfile dependency).
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xtask-bench-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn utc_dates_are_right() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        // 2000-02-29 12:34:56 is 951 827 696 s after the epoch.
        assert_eq!(utc(951_827_696), (2000, 2, 29, 12, 34, 56));
        // 2026-12-03 00:00:00.
        assert_eq!(utc(1_796_256_000), (2026, 12, 3, 0, 0, 0));
    }
}
