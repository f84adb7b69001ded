//! `patchcore`: fit, evaluate and apply PatchCore anomaly detectors from the command line.

mod dataset;
mod measure;
mod overlay;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use patchcore::{
    load_image, CalibrationConfig, GreedyConfig, IndexSpec, PatchCore, PatchCoreConfig, Progress,
    Sampler, ShortlistArithmetic, Threshold,
};
use serde_json::json;

/// PatchCore industrial anomaly detection: learn "normal" from good images, then score new ones.
#[derive(Debug, Parser)]
#[command(name = "patchcore", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fit a model on the good images of a folder (`<data>/train/good`, or `<data>` itself if it has no `train`).
    Fit(FitArgs),
    /// Score every test image of a folder in MVTec layout (`<data>/test/<kind>/`, `good` is normal) and write
    /// report.json and heatmap overlays.
    Eval(EvalArgs),
    /// Score image files or folders and write predictions.json and heatmap overlays.
    Predict(PredictArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MaskMode {
    OriginalBilinear,
    Nearest,
}

impl From<MaskMode> for patchcore::MaskResample {
    fn from(m: MaskMode) -> Self {
        match m {
            MaskMode::OriginalBilinear => patchcore::MaskResample::OriginalBilinear,
            MaskMode::Nearest => patchcore::MaskResample::Nearest,
        }
    }
}

/// How `eval` chooses a threshold to store in the model.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SetThreshold {
    /// The threshold with the best F1 score on the evaluated images.
    F1,
}

/// Nearest-neighbour backends selectable with `fit --nn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NnBackend {
    /// Exact search in pure Rust (always available).
    Exact,
    /// Exact search with FAISS IndexFlatL2 on the CPU (cargo feature `faiss`).
    FaissFlat,
    /// Exact search with FAISS GpuIndexFlatL2 on GPU 0 (cargo feature `faiss-gpu`).
    FaissGpu,
    /// Approximate search with FAISS IVFPQ, 512 lists, 64 sub-quantizers, 8 bits (cargo feature `faiss`).
    Ivfpq,
}

/// Shortlist arithmetics of the exact backend, selectable with `fit --shortlist`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shortlist {
    /// bfloat16 dot products where the CPU has AVX512-BF16, f32 elsewhere (the default).
    Bf16,
    /// f32 dot products.
    F32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// The original's default: WideResNet-50-2, taps `layer2` + `layer3`, ImageNet normalisation, 1024/1024,
    /// 3×3 patches, 10% coreset, k = 1.
    #[value(name = "wide_resnet50_2", alias = "wide-resnet50-2")]
    WideResNet50_2,
    /// EfficientNet-Lite0, taps `_blocks.4` + `_blocks.10`, the original's other defaults (10% coreset, k = 1).
    Lite0,
    /// ResNet-18, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "resnet18")]
    ResNet18,
    /// ResNet-34, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "resnet34")]
    ResNet34,
    /// ResNet-50, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "resnet50")]
    ResNet50,
    /// ResNet-101, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "resnet101")]
    ResNet101,
    /// ResNet-152, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "resnet152")]
    ResNet152,
    /// WideResNet-101-2, taps `layer2` + `layer3`, the original's other defaults.
    #[value(name = "wide_resnet101_2", alias = "wide-resnet101-2")]
    WideResNet101_2,
}

impl Preset {
    /// The preset's backbone and the file name its weights usually have.
    fn arch_and_weights(self) -> (patchcore::Arch, &'static str) {
        use patchcore::Arch;
        match self {
            Preset::WideResNet50_2 => (Arch::WideResNet50_2, "wide_resnet50_2-95faca4d.pth"),
            Preset::Lite0 => (Arch::EfficientNetLite0, "efficientnet-lite0-57934424.pth"),
            Preset::ResNet18 => (Arch::ResNet18, "resnet18-f37072fd.pth"),
            Preset::ResNet34 => (Arch::ResNet34, "resnet34-b627a593.pth"),
            Preset::ResNet50 => (Arch::ResNet50, "resnet50-0676ba61.pth"),
            Preset::ResNet101 => (Arch::ResNet101, "resnet101-63fe2227.pth"),
            Preset::ResNet152 => (Arch::ResNet152, "resnet152-394f9c45.pth"),
            Preset::WideResNet101_2 => (Arch::WideResNet101_2, "wide_resnet101_2-32ee1156.pth"),
        }
    }
}

#[derive(Debug, clap::Args)]
struct FitArgs {
    /// Folder with `train/good/` (MVTec layout) or a folder of good images.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the model file.
    #[arg(long)]
    out: PathBuf,
    /// Starting configuration.
    #[arg(long, value_enum, default_value_t = Preset::WideResNet50_2)]
    preset: Preset,
    /// A JSON configuration file (as written in a model's header); replaces the preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backbone weights (.pth or .safetensors).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Coreset ratio in (0, 1]; 1 keeps every patch.
    #[arg(long, allow_negative_numbers = true)]
    coreset: Option<f64>,
    /// Number of nearest neighbours averaged into a patch score.
    #[arg(long)]
    k: Option<usize>,
    /// Seed of the coreset's random projection and start points.
    #[arg(long)]
    seed: Option<u64>,
    /// Images per backbone pass.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Calibrate a decision threshold without defect examples: hold a share of the good training images out of
    /// the memory bank (--holdout), score them after the fit, and store the threshold that at most this share of
    /// them exceeds (for example 0.01). Without it the fit uses every image and stores no threshold.
    #[arg(long)]
    false_alarm_rate: Option<f64>,
    /// Share of the good training images held out for --false-alarm-rate, chosen at random with --seed.
    #[arg(long, requires = "false_alarm_rate", default_value_t = CalibrationConfig::default().holdout_fraction)]
    holdout: f64,
    /// Also write a JSON summary of the fit here: statistics, memory (peak RSS, bank before coreset, weights),
    /// threshold.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Nearest-neighbour backend; the FAISS ones need a build with the matching cargo feature.
    #[arg(long, value_enum)]
    nn: Option<NnBackend>,
    /// Inverted lists visited per query by the `ivfpq` backend (1 to 512; default 1).
    #[arg(long)]
    nprobe: Option<usize>,
    /// Arithmetic of the `exact` backend's candidate shortlist; results are identical, only speed differs.
    #[arg(long, value_enum)]
    shortlist: Option<Shortlist>,
    /// Skip unreadable image files (each is reported with the reason) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// The model file written by `patchcore fit`.
    #[arg(long)]
    model: PathBuf,
    /// Folder with `test/<kind>/` subfolders; `good` is normal, every other kind anomalous.
    #[arg(long)]
    data: PathBuf,
    /// Output folder for report.json and overlays/.
    #[arg(long)]
    out: PathBuf,
    /// Backbone weights, if not at the path recorded in the model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Write heatmap overlays for at most this many test images (all by default).
    #[arg(long)]
    overlays: Option<usize>,
    /// How ground-truth masks (`ground_truth/<kind>/<name>_mask.png`) are resized for pixel AUROC and PRO:
    /// `original-bilinear` as the original evaluates (only pixels still at full intensity count), or `nearest`.
    #[arg(long, value_enum, default_value_t = MaskMode::OriginalBilinear)]
    masks: MaskMode,
    /// Choose a decision threshold on these labelled images and store it in the model file (rewritten
    /// atomically in place); the report's decisions then use it.
    #[arg(long, value_enum)]
    set_threshold: Option<SetThreshold>,
    /// Skip unreadable image files (each is reported with the reason) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct PredictArgs {
    /// The model file written by `patchcore fit`.
    #[arg(long)]
    model: PathBuf,
    /// Output folder for predictions.json and overlays/.
    #[arg(long)]
    out: PathBuf,
    /// Backbone weights, if not at the path recorded in the model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Do not write overlays.
    #[arg(long)]
    no_overlays: bool,
    /// Decide with this threshold on the image score (anomalous when above it) instead of the model's.
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f32>,
    /// Overlay size: the model's input crop, or the original image (after EXIF orientation).
    #[arg(long, value_enum, default_value_t = overlay::MapSize::Input)]
    map_size: overlay::MapSize,
    /// Skip unreadable image files (each is reported with the reason) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
    /// Image files or folders of images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fit(a) => fit(a),
        Command::Eval(a) => eval(a),
        Command::Predict(a) => predict(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // Library errors already quote their cause; print only causes that add something.
            let mut shown = e.to_string();
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                    shown.push_str(&text);
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn fit(a: FitArgs) -> Result<()> {
    let mut config = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the configuration {}", path.display()))?;
            serde_json::from_str::<PatchCoreConfig>(&text)
                .with_context(|| format!("{} is not a valid configuration", path.display()))?
        }
        None => {
            let (arch, weights) = a.preset.arch_and_weights();
            PatchCoreConfig::for_arch(arch, weights)
        }
    };
    if let Some(w) = a.weights {
        config.backbone.weights = w;
    }
    if let Some(r) = a.coreset {
        config.sampler = if r == 1.0 {
            Sampler::KeepAll
        } else {
            match config.sampler {
                Sampler::ApproximateGreedy(g) => {
                    Sampler::ApproximateGreedy(GreedyConfig { ratio: r, ..g })
                }
                _ => Sampler::ApproximateGreedy(GreedyConfig::new(r)),
            }
        };
    }
    if let Some(k) = a.k {
        config.k = k;
    }
    if let Some(s) = a.seed {
        config.seed = s;
    }
    if let Some(b) = a.batch_size {
        config.batch_size = b;
    }
    // `--nn` keeps the configuration's own settings when it names the backend already configured.
    let same_backend = |index: &IndexSpec, nn: NnBackend| {
        matches!(
            (index, nn),
            (IndexSpec::Exact(_), NnBackend::Exact)
                | (IndexSpec::FaissFlat(_), NnBackend::FaissFlat)
                | (IndexSpec::FaissGpuFlat(_), NnBackend::FaissGpu)
                | (IndexSpec::IvfPq(_), NnBackend::Ivfpq)
        )
    };
    if let Some(nn) = a.nn.filter(|&nn| !same_backend(&config.index, nn)) {
        config.index = match nn {
            NnBackend::Exact => IndexSpec::Exact(Default::default()),
            NnBackend::FaissFlat => IndexSpec::FaissFlat(Default::default()),
            NnBackend::FaissGpu => IndexSpec::FaissGpuFlat(Default::default()),
            NnBackend::Ivfpq => IndexSpec::IvfPq(Default::default()),
        };
    }
    if let Some(nprobe) = a.nprobe {
        match &mut config.index {
            IndexSpec::IvfPq(c) => c.nprobe = nprobe,
            other => bail!(
                "--nprobe applies to the ivfpq backend, not to `{}` (add --nn ivfpq)",
                other.backend_name()
            ),
        }
    }
    if let Some(shortlist) = a.shortlist {
        match &mut config.index {
            IndexSpec::Exact(c) => {
                c.shortlist = match shortlist {
                    Shortlist::Bf16 => ShortlistArithmetic::Bf16,
                    Shortlist::F32 => ShortlistArithmetic::F32,
                }
            }
            other => bail!(
                "--shortlist applies to the exact backend, not to `{}` (add --nn exact)",
                other.backend_name()
            ),
        }
    }
    if !config.index.is_available() {
        bail!(
            "the `{}` nearest-neighbour backend is not in this build: rebuild with `--features {}`",
            config.index.backend_name(),
            config.index.required_feature().unwrap_or("none")
        );
    }
    config.validate()?;
    if !config.backbone.weights.is_file() {
        bail!(
            "backbone weights {} not found: pass --weights (`cargo xtask fetch weights <model>` prints the path of a model's weights)",
            config.backbone.weights.display()
        );
    }
    let calibration = a
        .false_alarm_rate
        .map(|rate| CalibrationConfig {
            holdout_fraction: a.holdout,
            false_alarm_rate: rate,
            seed: config.seed,
        })
        .map(|c| c.validate().map(|()| c))
        .transpose()?;
    check_output_file(&a.out)?;
    if let Some(report) = &a.report {
        check_output_file(report)?;
    }
    let weights_bytes = std::fs::metadata(&config.backbone.weights)
        .with_context(|| format!("cannot read {}", config.backbone.weights.display()))?
        .len();
    let all_files = dataset::train_images(&a.data)?;
    let (files, held_out): (Vec<PathBuf>, Vec<PathBuf>) = match &calibration {
        None => (all_files, Vec::new()),
        Some(c) => {
            let split = c.split(all_files.len()).with_context(|| {
                format!(
                    "cannot hold out good images of {} for --false-alarm-rate",
                    a.data.display()
                )
            })?;
            (
                split.train.iter().map(|&i| all_files[i].clone()).collect(),
                split
                    .held_out
                    .iter()
                    .map(|&i| all_files[i].clone())
                    .collect(),
            )
        }
    };
    let started = Instant::now();
    let embed_bar = bar(files.len() as u64, "embedding", a.quiet);
    let mut coreset_bar: Option<ProgressBar> = None;
    let mut skipped = Skipped::new();
    let load = |p: &PathBuf, pb: &ProgressBar, skipped: &mut Skipped| match load_image(p) {
        Ok(image) => Some(Ok(image)),
        Err(e) if a.skip_bad => {
            pb.suspend(|| eprintln!("skipped {}: {e}", p.display()));
            skipped.push((p.clone(), e.to_string()));
            None
        }
        Err(e) => Some(Err(e)),
    };
    let images = files
        .iter()
        .filter_map(|p| load(p, &embed_bar, &mut skipped));
    let mut model = PatchCore::fit(config, images, &mut |p| match p {
        Progress::Embedded { images, .. } => embed_bar.set_position(images as u64),
        Progress::Coreset { done, total } => {
            embed_bar.finish();
            let pb = coreset_bar.get_or_insert_with(|| bar(total as u64, "coreset", a.quiet));
            pb.set_position(done as u64);
        }
        Progress::Indexing { .. } => {
            embed_bar.finish();
            if let Some(pb) = &coreset_bar {
                pb.finish();
            }
        }
    })?;
    embed_bar.finish_and_clear();
    if let Some(pb) = coreset_bar {
        pb.finish_and_clear();
    }
    let mut calibration_seconds = None;
    if let Some(c) = &calibration {
        let started = Instant::now();
        let pb = bar(held_out.len() as u64, "held out", a.quiet);
        let images = held_out.iter().filter_map(|p| {
            pb.inc(1);
            load(p, &pb, &mut skipped)
        });
        let scores = model
            .calibrate(c, images)
            .context("cannot calibrate the threshold on the held-out good images")?;
        pb.finish_and_clear();
        calibration_seconds = Some(started.elapsed().as_secs_f64());
        if !c.resolves_rate(scores.len()) {
            eprintln!(
                "warning: {} held-out images cannot resolve a false-alarm rate of {} (that needs at least {}); \
                 the threshold is the largest held-out score",
                scores.len(),
                c.false_alarm_rate,
                (1.0 / c.false_alarm_rate).ceil()
            );
        }
    }
    model
        .save(&a.out)
        .with_context(|| format!("cannot save the model to {}", a.out.display()))?;
    if !skipped.is_empty() {
        eprintln!("skipped {} unreadable training images", skipped.len());
    }
    let s = model.stats();
    let fit_seconds = started.elapsed().as_secs_f64();
    println!(
        "fitted on {} images: {} patches -> memory bank of {} in {:.1} s (embedding {:.1} s, coreset {:.1} s, index {:.2} s)",
        s.images,
        s.patches,
        s.bank_size,
        fit_seconds,
        s.embed_seconds,
        s.coreset_seconds,
        s.index_seconds
    );
    if let Some(t) = model.threshold() {
        println!("threshold {} ({})", t.value, t.describe());
    }
    println!("model written to {}", a.out.display());
    if let Some(path) = &a.report {
        let dim = model.config().embed.target_dim as u64;
        let bank_before_coreset_bytes = s.patches as u64 * dim * 4;
        let peak = measure::peak_rss_bytes();
        let bound = 1.5 * (bank_before_coreset_bytes + weights_bytes) as f64;
        let report = json!({
            "data": a.data,
            "model": a.out,
            "fit": s,
            "fit_seconds": fit_seconds,
            "calibration_seconds": calibration_seconds,
            "held_out_images": held_out.len(),
            "threshold": model.threshold(),
            "memory": {
                "peak_rss_bytes": peak,
                "bank_before_coreset_bytes": bank_before_coreset_bytes,
                "weights_bytes": weights_bytes,
                "bound_bytes": bound,
                "within_bound": peak.map(|p| (p as f64) < bound),
            },
            "skipped": skipped_json(&skipped),
        });
        overlay::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}

/// Files that could not be read and were skipped on request, with the reason.
type Skipped = Vec<(PathBuf, String)>;

/// Scores files in batches of the model's batch size, reporting progress. `each` receives the file's index in
/// `files`. With `skip_bad`, unreadable files are reported on stderr and collected in `skipped` instead of
/// stopping the run.
fn score_files(
    model: &PatchCore,
    files: &[PathBuf],
    pb: &ProgressBar,
    skip_bad: bool,
    skipped: &mut Skipped,
    mut each: impl FnMut(usize, &patchcore::DynamicImage, f32, ndarray::ArrayView2<'_, f32>),
) -> Result<f64> {
    let mut predict_seconds = 0.0;
    let mut start = 0;
    for chunk in files.chunks(model.config().batch_size) {
        let mut images = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for (offset, path) in chunk.iter().enumerate() {
            match load_image(path) {
                Ok(image) => {
                    images.push(image);
                    kept.push(start + offset);
                }
                Err(e) if skip_bad => {
                    pb.suspend(|| eprintln!("skipped {}: {e}", path.display()));
                    skipped.push((path.clone(), e.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        start += chunk.len();
        if !images.is_empty() {
            let started = Instant::now();
            let prediction = model.predict(&images)?;
            predict_seconds += started.elapsed().as_secs_f64();
            for (i, &index) in kept.iter().enumerate() {
                each(
                    index,
                    &images[i],
                    prediction.image_scores[i],
                    prediction.anomaly_maps.index_axis(ndarray::Axis(0), i),
                );
            }
        }
        pb.inc(chunk.len() as u64);
    }
    Ok(predict_seconds)
}

/// Points per curve in a report.
const CURVE_POINTS: usize = 500;

/// Pixel-level results of an evaluation.
struct PixelMetrics {
    auroc: Option<f64>,
    pro: Option<f64>,
    /// The PRO curve up to FPR 0.3, thinned to about [`CURVE_POINTS`] points.
    pro_curve: Option<Vec<[f64; 2]>>,
    note: Option<String>,
}

/// Pixel AUROC and PRO over the scored test images when every anomalous one has a ground-truth mask.
fn pixel_metrics(
    a: &EvalArgs,
    model: &PatchCore,
    test: &[dataset::TestImage],
    mask_paths: &[Option<PathBuf>],
    maps: &[(usize, ndarray::Array2<f32>)],
) -> Result<PixelMetrics> {
    let none = |note: String| PixelMetrics {
        auroc: None,
        pro: None,
        pro_curve: None,
        note: Some(note),
    };
    if mask_paths.iter().all(|m| m.is_none()) {
        return Ok(none(
            "no ground_truth/<kind>/<name>_mask.png masks in the data folder".into(),
        ));
    }
    let missing: Vec<_> = maps
        .iter()
        .filter(|(i, _)| test[*i].kind != "good" && mask_paths[*i].is_none())
        .map(|(i, _)| test[*i].path.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Ok(none(format!(
            "{} anomalous images have no mask (e.g. {}); pixel metrics would be wrong, so none are given",
            missing.len(),
            missing[0]
        )));
    }
    let crop = model.config().preprocess.crop as usize;
    let mut masks = Vec::with_capacity(maps.len());
    for (i, _) in maps {
        masks.push(match &mask_paths[*i] {
            Some(p) => {
                let image = load_image(p)
                    .with_context(|| format!("cannot read the mask {}", p.display()))?;
                model.config().preprocess.mask(&image, a.masks.into())
            }
            None => ndarray::Array2::from_elem((crop, crop), false),
        });
    }
    let map_views: Vec<_> = maps.iter().map(|(_, m)| m.view()).collect();
    let mask_views: Vec<_> = masks.iter().map(|m| m.view()).collect();
    let auroc = patchcore::metrics::pixel_auroc(&map_views, &mask_views);
    // PRO is the area under its curve, so the curve is computed once for both (as `metrics::pro_auc` does).
    let pro_curve = patchcore::metrics::pro_curve(&map_views, &mask_views, 0.3);
    Ok(match (auroc, pro_curve) {
        (Ok(auroc), Ok(curve)) => PixelMetrics {
            auroc: Some(auroc),
            pro: Some(patchcore::metrics::trapezoid_area(&curve) / 0.3),
            pro_curve: Some(measure::thin_curve(&curve, CURVE_POINTS)),
            note: None,
        },
        (Err(e), _) | (_, Err(e)) => none(e.to_string()),
    })
}

/// An f32 as the shortest decimal that reads back to it (not the f64 widening, 27437.048828125).
fn json_f32(v: f32) -> serde_json::Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Fails early, before any expensive work, when `path` cannot become an output file.
fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "--out {} is a folder; expected a file path such as model.patchcore",
            path.display()
        );
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--out {}: the folder {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

fn skipped_json(skipped: &Skipped) -> serde_json::Value {
    skipped
        .iter()
        .map(|(p, why)| json!({ "path": p, "reason": why }))
        .collect()
}

fn eval(a: EvalArgs) -> Result<()> {
    let started = Instant::now();
    let mut model = PatchCore::load(&a.model, a.weights.as_deref())
        .with_context(|| format!("cannot load the model {}", a.model.display()))?;
    let load_seconds = started.elapsed().as_secs_f64();
    let test = dataset::test_images(&a.data)?;
    let files: Vec<PathBuf> = test.iter().map(|t| t.path.clone()).collect();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create the output folder {}", a.out.display()))?;
    let pb = bar(files.len() as u64, "scoring", a.quiet);
    let limit = a.overlays.unwrap_or(usize::MAX);
    let mut maps = overlay::Collector::new(limit, overlay::MapSize::Input);
    let mut scored: Vec<(usize, f32)> = Vec::with_capacity(files.len());
    let mut skipped = Skipped::new();
    // Ground-truth masks, where the folder has them (MVTec AD layout); good images have none and are all normal.
    let mask_paths: Vec<Option<PathBuf>> = test
        .iter()
        .map(|t| dataset::mask_for(&a.data, &t.kind, &t.path))
        .collect();
    let with_masks = mask_paths.iter().filter(|m| m.is_some()).count();
    let mut pixel_maps: Vec<(usize, ndarray::Array2<f32>)> = Vec::new();
    let started = Instant::now();
    let predict_seconds = score_files(
        &model,
        &files,
        &pb,
        a.skip_bad,
        &mut skipped,
        |i, image, score, map| {
            scored.push((i, score));
            maps.push(&files[i], image, model.config(), map);
            if with_masks > 0 {
                pixel_maps.push((i, map.to_owned()));
            }
        },
    )?;
    let eval_seconds = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let test_all = test;
    let test: Vec<_> = scored.iter().map(|&(i, _)| test_all[i].clone()).collect();
    let scores: Vec<f32> = scored.iter().map(|&(_, s)| s).collect();
    let labels: Vec<bool> = test.iter().map(|t| t.kind != "good").collect();
    // A test set with one class only still gets its scores reported; its AUROC is undefined, never 0 or 0.5.
    let (auroc, auroc_note) = match patchcore::metrics::auroc(&scores, &labels) {
        Ok(v) => (Some(v), None),
        Err(e @ patchcore::metrics::MetricError::Undefined { .. }) => (None, Some(e.to_string())),
        Err(e) => return Err(e).with_context(|| format!("cannot evaluate {}", a.data.display())),
    };
    let written = maps.write(&a.out.join("overlays"), &a.data)?;
    let pixel = pixel_metrics(&a, &model, &test_all, &mask_paths, &pixel_maps)?;
    let (roc_curve, f1_max) = match auroc {
        Some(_) => (
            Some(measure::thin_curve(
                &patchcore::metrics::roc_curve(&scores, &labels)?,
                CURVE_POINTS,
            )),
            Some(patchcore::metrics::f1_threshold(&scores, &labels)?),
        ),
        None => (None, None),
    };
    if let Some(SetThreshold::F1) = a.set_threshold {
        let threshold = Threshold::f1_optimal(&scores, &labels).with_context(|| {
            format!(
                "--set-threshold f1 needs good and anomalous test images in {}",
                a.data.display()
            )
        })?;
        model.set_threshold(Some(threshold));
        model
            .save(&a.model)
            .with_context(|| format!("cannot rewrite the model {}", a.model.display()))?;
    }
    let threshold = model.threshold();
    let mut confusion = [0usize; 4];
    for (&score, &label) in scores.iter().zip(&labels) {
        if let Some(t) = threshold {
            let called = t.decide(score) == patchcore::Decision::Anomalous;
            confusion[2 * usize::from(label) + usize::from(called)] += 1;
        }
    }

    let stats = model.stats();
    let entries: Vec<_> = test
        .iter()
        .zip(&scores)
        .map(|(t, s)| {
            json!({
                "path": t.path.strip_prefix(&a.data).unwrap_or(&t.path),
                "kind": t.kind,
                "label": if t.kind == "good" { 0 } else { 1 },
                "score": json_f32(*s),
                "decision": model.decide(*s),
            })
        })
        .collect();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for t in &test {
        *kinds.entry(t.kind.clone()).or_default() += 1;
    }
    let report = json!({
        "data": a.data,
        "model": a.model,
        "image_auroc": auroc,
        "image_auroc_note": auroc_note,
        "pixel_auroc": pixel.auroc,
        "pro": pixel.pro,
        "pixel_metrics_note": pixel.note,
        "threshold": threshold.map(|t| json!({
            "value": json_f32(t.value),
            "method": t.method,
            "description": t.describe(),
            "set_by_this_run": a.set_threshold.is_some(),
        })),
        "decisions": threshold.map(|_| json!({
            "true_negatives": confusion[0],
            "false_positives": confusion[1],
            "false_negatives": confusion[2],
            "true_positives": confusion[3],
        })),
        "f1_max": f1_max.map(|(f1, t)| json!({ "f1": f1, "threshold": json_f32(t) })),
        "roc_curve": roc_curve,
        "pro_curve": pixel.pro_curve,
        "peak_rss_bytes": measure::peak_rss_bytes(),
        "masks": format!("{:?}", a.masks),
        "bank_size": model.bank_size(),
        "images": kinds,
        "timings": {
            "fit_embed_seconds": stats.embed_seconds,
            "fit_coreset_seconds": stats.coreset_seconds,
            "fit_index_seconds": stats.index_seconds,
            "eval_model_load_seconds": load_seconds,
            "eval_total_seconds": eval_seconds,
            "predict_seconds": predict_seconds,
            "predict_seconds_per_image": predict_seconds / scores.len().max(1) as f64,
        },
        "fit": stats,
        "config": model.config(),
        "overlays": written,
        "skipped": skipped_json(&skipped),
        "scores": entries,
    });
    let path = a.out.join("report.json");
    overlay::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable test images (listed in report.json)",
            skipped.len()
        );
    }
    let auroc_text = match (auroc, &auroc_note) {
        (Some(v), _) => format!("{v:.4}"),
        (None, Some(note)) => {
            eprintln!("warning: {note}");
            "undefined".to_string()
        }
        (None, None) => "undefined".to_string(),
    };
    println!(
        "image AUROC {auroc_text} on {} test images ({}), bank size {}, {:.1} ms per image",
        scores.len(),
        kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        model.bank_size(),
        1000.0 * predict_seconds / scores.len().max(1) as f64
    );
    if let (Some(p), Some(pro)) = (pixel.auroc, pixel.pro) {
        println!("pixel AUROC {p:.4}, PRO (FPR ≤ 0.3) {pro:.4}");
    } else if let Some(note) = &pixel.note {
        println!("pixel metrics: {note}");
    }
    match threshold {
        Some(t) => println!(
            "threshold {} ({}{}): {} of {} anomalous and {} of {} good images called anomalous",
            t.value,
            t.describe(),
            if a.set_threshold.is_some() {
                format!(", stored in {}", a.model.display())
            } else {
                String::new()
            },
            confusion[3],
            confusion[2] + confusion[3],
            confusion[1],
            confusion[0] + confusion[1]
        ),
        None => println!(
            "no threshold in the model: scores only (fit --false-alarm-rate or eval --set-threshold f1 stores one)"
        ),
    }
    println!("report written to {} ({written} overlays)", path.display());
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let mut model = PatchCore::load(&a.model, a.weights.as_deref())
        .with_context(|| format!("cannot load the model {}", a.model.display()))?;
    let source = match a.threshold {
        Some(value) => {
            model.set_threshold(Some(
                Threshold::manual(value).context("invalid --threshold")?,
            ));
            "command line"
        }
        None => "model",
    };
    let mut files = Vec::new();
    for input in &a.inputs {
        if input.is_dir() {
            files.extend(dataset::images_in(input)?);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("input {} does not exist", input.display());
        }
    }
    if files.is_empty() {
        bail!(
            "no images among the inputs ({}); folders are searched one level deep for image files",
            a.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create the output folder {}", a.out.display()))?;
    let pb = bar(files.len() as u64, "scoring", a.quiet);
    let limit = if a.no_overlays { 0 } else { usize::MAX };
    let mut maps = overlay::Collector::new(limit, a.map_size);
    let mut entries = Vec::new();
    let mut skipped = Skipped::new();
    score_files(
        &model,
        &files,
        &pb,
        a.skip_bad,
        &mut skipped,
        |i, image, score, map| {
            entries.push(json!({
                "path": files[i],
                "score": json_f32(score),
                "decision": model.decide(score),
                "width": image.width(),
                "height": image.height(),
            }));
            maps.push(&files[i], image, model.config(), map);
        },
    )?;
    pb.finish_and_clear();
    // Overlays of loose files are named by file name alone.
    let written = maps.write(&a.out.join("overlays"), Path::new("/"))?;
    let path = a.out.join("predictions.json");
    let threshold = model.threshold();
    let doc = json!({
        "model": a.model,
        "threshold": threshold.map(|t| json!({
            "value": json_f32(t.value),
            "method": t.method,
            "description": t.describe(),
            "source": source,
        })),
        "predictions": entries,
        "overlays": written,
        "skipped": skipped_json(&skipped),
    });
    overlay::write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    match threshold {
        Some(t) => eprintln!(
            "threshold {} from the {source} ({}): anomalous when the score is above it",
            t.value,
            t.describe()
        ),
        None => eprintln!(
            "no threshold: the model stores none and --threshold was not given, so there are no decisions \
             (fit --false-alarm-rate or eval --set-threshold f1 stores one)"
        ),
    }
    // One line per image: score, decision ("no-threshold" without one), path.
    for e in &entries {
        println!(
            "{}\t{}\t{}",
            e["score"],
            e["decision"].as_str().unwrap_or("no-threshold"),
            e["path"].as_str().unwrap_or_default()
        );
    }
    eprintln!("predictions written to {}", path.display());
    Ok(())
}
