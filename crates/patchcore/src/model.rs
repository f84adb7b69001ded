//! The fitted model: fit, predict, save and load.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use ndarray::{Array3, Array4, ArrayView4, Axis};
use patchcore_backbone::FeatureExtractor;
use patchcore_knn::KnnIndex;
use patchcore_patch::Embedder;
use patchcore_segmentation::Segmentor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::threshold::{CalibrationConfig, Decision, Threshold};
use crate::{DeviceSpec, Error, PatchCoreConfig, Scoring};

/// The newest model-file format version this build writes and reads. Version 2 added the optional `threshold`
/// header field; version 1 files, which never have one, still load (without a threshold).
pub const FORMAT_VERSION: u32 = 2;

/// What [`PatchCore::fit`] reports while it works.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Progress {
    /// Images embedded so far.
    Embedded {
        /// Images done.
        images: usize,
        /// Patch embeddings collected.
        patches: usize,
    },
    /// Coreset picks so far.
    Coreset {
        /// Picks done.
        done: usize,
        /// Picks in all.
        total: usize,
    },
    /// The nearest-neighbour index is being built.
    Indexing {
        /// Bank entries.
        bank_size: usize,
    },
}

/// Facts about a fit, stored with the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FitStats {
    /// Training images.
    pub images: usize,
    /// Patch embeddings before subsampling.
    pub patches: usize,
    /// Memory-bank entries after subsampling.
    pub bank_size: usize,
    /// Seconds spent decoding, resizing, in the backbone and embedding.
    pub embed_seconds: f64,
    /// Seconds spent in coreset selection.
    pub coreset_seconds: f64,
    /// Seconds spent building the search index.
    pub index_seconds: f64,
}

/// Scores and maps of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// One score per image: the maximum of its patch scores.
    pub image_scores: Vec<f32>,
    /// Patch scores on the patch grid, (B, h, w).
    pub patch_scores: Array3<f32>,
    /// Anomaly maps at the model's input size, (B, crop, crop).
    pub anomaly_maps: Array3<f32>,
}

/// A fitted PatchCore model.
#[derive(Debug)]
pub struct PatchCore {
    config: PatchCoreConfig,
    backbone: Box<dyn FeatureExtractor>,
    embedder: Embedder,
    index: Box<dyn KnnIndex>,
    segmentor: Segmentor,
    device: Device,
    weights_sha256: String,
    stats: FitStats,
    threshold: Option<Threshold>,
}

fn device(spec: DeviceSpec) -> Result<Device, Error> {
    Ok(match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal)?,
    })
}

/// The parts of a model that do not depend on the memory bank.
struct Parts {
    backbone: Box<dyn FeatureExtractor>,
    embedder: Embedder,
    segmentor: Segmentor,
    device: Device,
    weights_sha256: String,
}

impl Parts {
    fn new(config: &PatchCoreConfig) -> Result<Self, Error> {
        config.validate()?;
        let weights_sha256 = patchcore_backbone::file_sha256(&config.backbone.weights)?;
        Self::with_weights_sha256(config, weights_sha256)
    }

    /// Like [`Parts::new`] when the weights' SHA-256 is already known.
    fn with_weights_sha256(
        config: &PatchCoreConfig,
        weights_sha256: String,
    ) -> Result<Self, Error> {
        config.validate()?;
        let device = device(config.device)?;
        let backbone = patchcore_backbone::load(
            config.backbone.arch,
            &config.backbone.weights,
            &config.backbone.taps,
            &device,
        )?;
        let embedder = Embedder::new(config.embed)?;
        let crop = config.preprocess.crop as usize;
        let segmentor = Segmentor::new(config.segmentation, (crop, crop))?;
        Ok(Self {
            backbone,
            embedder,
            segmentor,
            device,
            weights_sha256,
        })
    }
}

/// Preprocesses a batch of decoded images into one (B, 3, crop, crop) array, images in parallel.
fn prepare(config: &PatchCoreConfig, images: &[DynamicImage]) -> Array4<f32> {
    let crop = config.preprocess.crop as usize;
    let mut batch = Array4::<f32>::zeros((images.len(), 3, crop, crop));
    batch
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(images.par_iter())
        .for_each(|(mut dst, image)| dst.assign(&config.preprocess.apply(image)));
    batch
}

/// Backbone and patch embedding of a normalised input batch.
fn embed(
    backbone: &dyn FeatureExtractor,
    embedder: &Embedder,
    device: &Device,
    input: ArrayView4<'_, f32>,
) -> Result<patchcore_patch::PatchEmbeddings, Error> {
    let (b, c, h, w) = input.dim();
    // A standard-layout input is copied in one block; anything else is gathered element by element.
    let data: Vec<f32> = match input.as_slice() {
        Some(values) => values.to_vec(),
        None => input.iter().copied().collect(),
    };
    let x = Tensor::from_vec(data, (b, c, h, w), device)?;
    let taps = backbone.extract(&x)?;
    let maps = taps
        .iter()
        .map(|t| {
            let dims = t.dims4()?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(Array4::from_shape_vec(dims, v).expect("tensor length equals its shape"))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let views: Vec<_> = maps.iter().map(|m| m.view()).collect();
    Ok(embedder.embed(&views)?)
}

impl Parts {
    /// Completes a model with its index and statistics.
    fn into_model(
        self,
        config: PatchCoreConfig,
        index: Box<dyn KnnIndex>,
        stats: FitStats,
    ) -> PatchCore {
        PatchCore {
            config,
            backbone: self.backbone,
            embedder: self.embedder,
            index,
            segmentor: self.segmentor,
            device: self.device,
            weights_sha256: self.weights_sha256,
            stats,
            threshold: None,
        }
    }
}

impl PatchCore {
    /// Fits a model on good images. Images are embedded `batch_size` at a time, so only the embeddings, never the
    /// decoded images, accumulate in memory.
    ///
    /// # Errors
    /// Invalid configuration, unreadable weights, an image the iterator reports as unreadable, no images at all,
    /// `k` larger than the resulting bank, or a failure in any stage.
    pub fn fit<I>(
        config: PatchCoreConfig,
        images: I,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self, Error>
    where
        I: IntoIterator<Item = Result<DynamicImage, Error>>,
    {
        let parts = Parts::new(&config)?;
        let started = Instant::now();
        let dim = config.embed.target_dim;
        let mut features: Vec<f32> = Vec::new();
        let mut count = 0usize;
        let mut pending: Vec<DynamicImage> = Vec::with_capacity(config.batch_size);
        let flush = |pending: &mut Vec<DynamicImage>,
                     features: &mut Vec<f32>|
         -> Result<(), Error> {
            let input = prepare(&config, pending);
            let emb = embed(
                parts.backbone.as_ref(),
                &parts.embedder,
                &parts.device,
                input.view(),
            )?;
            features.extend_from_slice(emb.rows.as_slice().expect("embedding rows are contiguous"));
            pending.clear();
            Ok(())
        };
        for image in images {
            pending.push(image?);
            count += 1;
            if pending.len() == config.batch_size {
                flush(&mut pending, &mut features)?;
                progress(Progress::Embedded {
                    images: count,
                    patches: features.len() / dim,
                });
            }
        }
        if !pending.is_empty() {
            flush(&mut pending, &mut features)?;
            progress(Progress::Embedded {
                images: count,
                patches: features.len() / dim,
            });
        }
        if count == 0 {
            return Err(Error::NoImages);
        }
        let embed_seconds = started.elapsed().as_secs_f64();
        let patches = features.len() / dim;

        let started = Instant::now();
        let picks = config
            .sampler
            .select(&features, dim, config.seed, &mut |done, total| {
                progress(Progress::Coreset { done, total })
            })
            .map_err(|e| match e {
                // Say which setting to change, and to what, in the terms of the configuration.
                patchcore_coreset::CoresetError::NoSamples { n, ratio } => {
                    Error::Config(crate::ConfigError::invalid(
                        "coreset ratio",
                        ratio.to_string(),
                        format!(
                            "at least {:.3e} for the {n} training patches of {count} images \
                             (int({n} × ratio) must be at least 1), or more training images",
                            1.0 / n as f64
                        ),
                    ))
                }
                other => other.into(),
            })?;
        let bank: Vec<f32> = if picks.len() == patches {
            features
        } else {
            let mut bank = Vec::with_capacity(picks.len() * dim);
            for &i in &picks {
                bank.extend_from_slice(&features[i * dim..(i + 1) * dim]);
            }
            drop(features);
            bank
        };
        let coreset_seconds = started.elapsed().as_secs_f64();
        let bank_size = bank.len() / dim;
        if config.k > bank_size {
            return Err(Error::KTooLarge {
                k: config.k,
                bank_size,
            });
        }

        progress(Progress::Indexing { bank_size });
        let started = Instant::now();
        let index = config.index.build(&bank, dim)?;
        let index_seconds = started.elapsed().as_secs_f64();
        let stats = FitStats {
            images: count,
            patches,
            bank_size,
            embed_seconds,
            coreset_seconds,
            index_seconds,
        };
        Ok(parts.into_model(config, index, stats))
    }

    /// Builds a model around an existing memory bank (row-major, `config.embed.target_dim` values per row), for
    /// example one fitted by another implementation. No images are embedded.
    ///
    /// # Errors
    /// Invalid configuration, unreadable weights, a ragged or empty bank, or `k` larger than the bank.
    pub fn from_memory_bank(config: PatchCoreConfig, bank: &[f32]) -> Result<Self, Error> {
        let parts = Parts::new(&config)?;
        let dim = config.embed.target_dim;
        let index = config.index.build(bank, dim)?;
        if config.k > index.len() {
            return Err(Error::KTooLarge {
                k: config.k,
                bank_size: index.len(),
            });
        }
        let stats = FitStats {
            bank_size: index.len(),
            ..FitStats::default()
        };
        Ok(parts.into_model(config, index, stats))
    }

    /// The configuration the model was fitted with.
    pub fn config(&self) -> &PatchCoreConfig {
        &self.config
    }

    /// Facts about the fit.
    pub fn stats(&self) -> &FitStats {
        &self.stats
    }

    /// Number of memory-bank entries.
    pub fn bank_size(&self) -> usize {
        self.index.len()
    }

    /// SHA-256 of the backbone weights file the model uses.
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// The decision threshold stored with the model, if one was calibrated or set.
    pub fn threshold(&self) -> Option<&Threshold> {
        self.threshold.as_ref()
    }

    /// Replaces the decision threshold (`None` removes it); [`PatchCore::save`] stores it.
    pub fn set_threshold(&mut self, threshold: Option<Threshold>) {
        self.threshold = threshold;
    }

    /// The decision for an image score under the stored threshold, or `None` when the model has none.
    pub fn decide(&self, score: f32) -> Option<Decision> {
        self.threshold.as_ref().map(|t| t.decide(score))
    }

    /// Calibrates and stores a threshold from good images that were held out of the memory bank (see
    /// [`CalibrationConfig::split`]): they are scored `batch_size` at a time, and the threshold is the
    /// [`crate::metrics::false_alarm_threshold`] of their image scores at `config.false_alarm_rate`. Returns their
    /// scores in the given order.
    ///
    /// # Errors
    /// An invalid configuration, an unreadable image, no images, or a failure in any stage.
    pub fn calibrate<I>(
        &mut self,
        config: &CalibrationConfig,
        held_out: I,
    ) -> Result<Vec<f32>, Error>
    where
        I: IntoIterator<Item = Result<DynamicImage, Error>>,
    {
        config.validate()?;
        let mut scores = Vec::new();
        let mut pending = Vec::with_capacity(self.config.batch_size);
        for image in held_out {
            pending.push(image?);
            if pending.len() == self.config.batch_size {
                scores.extend(self.predict(&pending)?.image_scores);
                pending.clear();
            }
        }
        if !pending.is_empty() {
            scores.extend(self.predict(&pending)?.image_scores);
        }
        self.threshold = Some(Threshold::from_held_out(config, &scores)?);
        Ok(scores)
    }

    /// Scores a batch of decoded images. Batches larger than the configured `batch_size` are processed in chunks.
    ///
    /// # Errors
    /// A failure in any stage.
    pub fn predict(&self, images: &[DynamicImage]) -> Result<Prediction, Error> {
        let mut out: Option<Prediction> = None;
        for chunk in images.chunks(self.config.batch_size.max(1)) {
            let input = prepare(&self.config, chunk);
            let p = self.predict_input(input.view())?;
            out = Some(match out {
                None => p,
                Some(mut acc) => {
                    acc.image_scores.extend(p.image_scores);
                    acc.patch_scores = ndarray::concatenate(
                        Axis(0),
                        &[acc.patch_scores.view(), p.patch_scores.view()],
                    )
                    .expect("grids of one model share their shape");
                    acc.anomaly_maps = ndarray::concatenate(
                        Axis(0),
                        &[acc.anomaly_maps.view(), p.anomaly_maps.view()],
                    )
                    .expect("maps of one model share their shape");
                    acc
                }
            });
        }
        Ok(out.unwrap_or_else(|| {
            let crop = self.config.preprocess.crop as usize;
            Prediction {
                image_scores: Vec::new(),
                patch_scores: Array3::zeros((0, 0, 0)),
                anomaly_maps: Array3::zeros((0, crop, crop)),
            }
        }))
    }

    /// Scores an already preprocessed, normalised input batch (B, 3, H, W).
    ///
    /// # Errors
    /// A failure in any stage.
    pub fn predict_input(&self, input: ArrayView4<'_, f32>) -> Result<Prediction, Error> {
        let emb = embed(self.backbone.as_ref(), &self.embedder, &self.device, input)?;
        let (gh, gw) = emb.grid;
        let rows = emb.rows.as_slice().expect("embedding rows are contiguous");
        let neighbors = self.index.search(rows, self.config.k)?;
        let scores: Vec<f32> = match self.config.scoring {
            Scoring::MeanOfK => (0..neighbors.len())
                .map(|i| {
                    let (d, _) = neighbors.row(i);
                    d.iter().sum::<f32>() / d.len() as f32
                })
                .collect(),
        };
        let grid = patchcore_patch::unpatch_scores(&scores, emb.batch)?;
        let image_scores = patchcore_patch::image_scores(grid.view());
        let patch_scores = grid
            .into_shape_with_order((emb.batch, gh, gw))
            .expect("unpatched scores have batch × grid entries");
        let anomaly_maps = self.segmentor.segment(patch_scores.view())?;
        Ok(Prediction {
            image_scores,
            patch_scores,
            anomaly_maps,
        })
    }

    /// Writes the model to one file, atomically: a temporary file in the same folder is renamed over `path` only
    /// once it is complete, so an interrupted save never leaves a partial model behind.
    ///
    /// The file is a safetensors container: the index's own serialisation as a byte tensor `index`, and in the
    /// header the format version, the configuration, the weights' SHA-256, the fit statistics, the index's
    /// SHA-256 and, if the model has one, the decision threshold with how it was chosen.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut payload = Vec::new();
        self.index.write_to(&mut payload)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "patchcore-model".to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("config".to_string(), json(&self.config));
        meta.insert("weights_sha256".to_string(), self.weights_sha256.clone());
        meta.insert("stats".to_string(), json(&self.stats));
        meta.insert("bank_size".to_string(), self.index.len().to_string());
        meta.insert("dim".to_string(), self.index.dim().to_string());
        meta.insert("index_sha256".to_string(), sha256_hex(&payload));
        if let Some(threshold) = &self.threshold {
            meta.insert("threshold".to_string(), json(threshold));
        }
        meta.insert(
            "writer".to_string(),
            format!("patchcore {}", env!("CARGO_PKG_VERSION")),
        );
        // Last: it covers every other header field.
        meta.insert("header_sha256".to_string(), header_sha256(&meta));
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::U8,
            vec![payload.len()],
            &payload,
        )
        .map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let bytes = safetensors::serialize([("index", view)], Some(meta)).map_err(|e| {
            Error::ModelFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        write_atomic(path, &bytes)?;
        Ok(())
    }

    /// Reads a model written by [`PatchCore::save`]. `weights` overrides the weights path recorded in the model
    /// (the file must still have the recorded SHA-256).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::ModelFile`] (not a model, truncated, inconsistent dimensions),
    /// [`Error::UnsupportedVersion`], [`Error::Checksum`], [`Error::WeightsMismatch`].
    pub fn load(path: &Path, weights: Option<&Path>) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file = ModelFile::from_bytes(&bytes, path)?;
        let mut config = file.config;
        if let Some(w) = weights {
            config.backbone.weights = w.to_path_buf();
        }
        // Check the weights' identity before building the backbone, so that other weights are reported as such
        // rather than as a shape error.
        let got = patchcore_backbone::file_sha256(&config.backbone.weights)?;
        if got != file.weights_sha256 {
            return Err(Error::WeightsMismatch {
                path: config.backbone.weights.clone(),
                expected: file.weights_sha256,
                got,
            });
        }
        let parts = Parts::with_weights_sha256(&config, got)?;
        let mut model = parts.into_model(config, file.index, file.stats);
        model.threshold = file.threshold;
        Ok(model)
    }
}

/// The content of a model file, parsed and checked without loading the backbone.
#[derive(Debug)]
pub struct ModelFile {
    /// The format version the file was written with.
    pub format_version: u32,
    /// The full configuration.
    pub config: PatchCoreConfig,
    /// Facts about the fit.
    pub stats: FitStats,
    /// SHA-256 of the backbone weights the model was fitted with.
    pub weights_sha256: String,
    /// The memory bank's search index.
    pub index: Box<dyn KnnIndex>,
    /// The decision threshold, if one was stored (format version 2 and later).
    pub threshold: Option<Threshold>,
}

impl ModelFile {
    /// Parses and checks a model file's bytes: container, format name and version, configuration, the index's
    /// checksum, and the consistency of the bank with the configuration. `path` only names the file in errors.
    ///
    /// # Errors
    /// [`Error::ModelFile`], [`Error::UnsupportedVersion`], [`Error::Checksum`], [`Error::Config`],
    /// [`Error::KTooLarge`], [`Error::Knn`] (a corrupt index).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a PatchCore model file ({e})")))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| bad("no PatchCore header".into()))?;
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("header field `{k}` is missing")))
        };
        if field("format")? != "patchcore-model" {
            return Err(bad("not a PatchCore model file (wrong `format`)".into()));
        }
        let format_version: u32 = field("format_version")?
            .parse()
            .map_err(|_| bad("`format_version` is not a number".into()))?;
        if format_version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        let expected = field("header_sha256")?;
        let got = header_sha256(&meta);
        if expected != got {
            return Err(Error::Checksum {
                path: path.to_path_buf(),
                what: "header",
                expected,
                got,
            });
        }
        let config: PatchCoreConfig = serde_json::from_str(&field("config")?)
            .map_err(|e| bad(format!("invalid `config`: {e}")))?;
        config.validate()?;
        let stats: FitStats = serde_json::from_str(&field("stats")?)
            .map_err(|e| bad(format!("invalid `stats`: {e}")))?;
        let threshold = match meta.get("threshold") {
            None => None,
            Some(text) => {
                let t: Threshold = serde_json::from_str(text)
                    .map_err(|e| bad(format!("invalid `threshold`: {e}")))?;
                t.check()
                    .map_err(|e| bad(format!("invalid `threshold`: {e}")))?;
                Some(t)
            }
        };
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("truncated or corrupt tensor data ({e})")))?;
        let payload = tensors
            .tensor("index")
            .map_err(|_| bad("the `index` tensor is missing".into()))?
            .data();
        let expected = field("index_sha256")?;
        let got = sha256_hex(payload);
        if expected != got {
            return Err(Error::Checksum {
                path: path.to_path_buf(),
                what: "index",
                expected,
                got,
            });
        }
        let mut reader = payload;
        let index = config.index.read_from(&mut reader)?;
        if index.dim() != config.embed.target_dim {
            return Err(bad(format!(
                "the memory bank has dimension {}, but the configuration's target_dim is {}",
                index.dim(),
                config.embed.target_dim
            )));
        }
        if config.k > index.len() {
            return Err(Error::KTooLarge {
                k: config.k,
                bank_size: index.len(),
            });
        }
        Ok(Self {
            format_version,
            config,
            stats,
            weights_sha256: field("weights_sha256")?,
            index,
            threshold,
        })
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("configuration types serialise to JSON")
}

/// Writes `bytes` to `path` atomically: through a temporary file in the same folder, flushed to disk and renamed
/// over `path` only once complete, so that no reader ever sees a partial file and an interrupted write leaves
/// nothing behind. The file gets the usual permissions (0666 less the umask).
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".patchcore-").suffix(".tmp");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(&dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// SHA-256 over every header field but itself, in name order, as `name=value` lines: it covers the
/// configuration, the weights' hash and the index's hash, so no part of a model file goes unchecked.
fn header_sha256(meta: &HashMap<String, String>) -> String {
    let mut names: Vec<&String> = meta.keys().filter(|k| *k != "header_sha256").collect();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update(b"=");
        hasher.update(meta[name].as_bytes());
        hasher.update(b"\n");
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
