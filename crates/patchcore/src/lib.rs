//! PatchCore industrial anomaly detection (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
//! CVPR 2022, <https://arxiv.org/abs/2106.08265>) in native Rust.
//!
//! PatchCore learns "normal" from good images only: a pretrained CNN turns each image into patch embeddings, the
//! training embeddings are thinned by a greedy coreset into a memory bank, and a test patch's anomaly score is its
//! squared distance to the nearest bank entries. The image score is the maximum patch score; the anomaly map is the
//! patch-score grid upsampled and blurred.
//!
//! ```no_run
//! use patchcore::{load_image, PatchCore, PatchCoreConfig, Progress};
//! # fn main() -> Result<(), patchcore::Error> {
//! let mut config = PatchCoreConfig::wide_resnet50_2("wide_resnet50_2-95faca4d.pth"); // the original's default
//! config.sampler = patchcore::Sampler::ApproximateGreedy(patchcore::GreedyConfig::new(0.01));
//! let train = ["good/000.png", "good/001.png"].map(|p| load_image(p.as_ref()));
//! let model = PatchCore::fit(config, train, &mut |_: Progress| {})?;
//! model.save("model.patchcore".as_ref())?;
//! let prediction = model.predict(&[load_image("test/000.png".as_ref())?])?;
//! println!("score {} map {:?}", prediction.image_scores[0], prediction.anomaly_maps.dim());
//! # Ok(())
//! # }
//! ```
//!
//! ## Design
//!
//! This crate owns the pipeline and re-exports the layers it is built from: [`backbone`] (candle feature
//! extractors), [`patch`] (patch embedding), [`coreset`] (memory-bank subsampling), [`knn`] (nearest-neighbour
//! backends behind one trait) and [`segmentation`] (anomaly maps). Every stage reproduces the original
//! implementation (patchcore-inspection) numerically unless a configuration value names another behaviour; the
//! deviations that cannot be avoided (the random numbers behind the coreset) are documented on
//! [`GreedyConfig`]. Configuration is plain serde data ([`PatchCoreConfig`]) with named presets; a fitted model is
//! one file ([`PatchCore::save`]) that records the configuration, the backbone weights' SHA-256 and the bank.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

pub mod metrics;
mod model;
pub mod preprocess;
mod threshold;

use std::path::PathBuf;

pub use image::DynamicImage;
pub use model::{
    write_atomic, FitStats, ModelFile, PatchCore, Prediction, Progress, FORMAT_VERSION,
};
pub use patchcore_backbone as backbone;
pub use patchcore_backbone::{Arch, Normalization};
pub use patchcore_coreset as coreset;
pub use patchcore_coreset::{GreedyConfig, Sampler};
pub use patchcore_knn as knn;
pub use patchcore_knn::{
    ExactConfig, FaissFlatConfig, FaissGpuConfig, IndexSpec, IvfPqConfig, OnTooSmall,
    ShortlistArithmetic,
};
pub use patchcore_patch as patch;
pub use patchcore_patch::{EmbedConfig, PatchMaker};
pub use patchcore_segmentation as segmentation;
pub use patchcore_segmentation::{Border, GaussianBlur, SegmentationConfig, Upsample};
pub use preprocess::{decode_image, load_image, MaskResample, PreprocessConfig, Resample};
pub use threshold::{CalibrationConfig, Decision, HoldoutSplit, Threshold, ThresholdMethod};

use serde::{Deserialize, Serialize};

/// Which backbone to run, with which weights, and which layers to tap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// The architecture.
    pub arch: Arch,
    /// Path to the weights: a PyTorch `.pth` (zip or legacy format) or a `.safetensors` file.
    pub weights: PathBuf,
    /// Tapped layers by their state-dict module path (e.g. `layer2`, or `_blocks.4` for EfficientNet-Lite). As in the original, the first tap sets
    /// the patch grid and the others are aligned to it, so it is normally the shallowest.
    pub taps: Vec<String>,
}

/// How the nearest-neighbour distances of a patch become its score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// The mean of the k smallest squared L2 distances: the original's `NearestNeighbourScorer`.
    #[default]
    MeanOfK,
}

/// Where the backbone runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceSpec {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs the `cuda` feature.
    Cuda(usize),
}

/// Every setting of a PatchCore model. Build one from a preset and adjust fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchCoreConfig {
    /// Feature extractor.
    pub backbone: BackboneConfig,
    /// Image preprocessing; the normalisation comes from the backbone's preset.
    pub preprocess: PreprocessConfig,
    /// Patch size, stride and embedding dimensions.
    pub embed: EmbedConfig,
    /// Memory-bank subsampling.
    pub sampler: Sampler,
    /// Nearest-neighbour backend.
    pub index: IndexSpec,
    /// Number of nearest bank entries per patch (the original's `anomaly_scorer_num_nn`).
    pub k: usize,
    /// How distances become patch scores.
    pub scoring: Scoring,
    /// Anomaly-map construction.
    pub segmentation: SegmentationConfig,
    /// Seed of every random choice (coreset projection and start points).
    pub seed: u64,
    /// Images per backbone forward pass.
    pub batch_size: usize,
    /// Where the backbone runs.
    #[serde(default)]
    pub device: DeviceSpec,
}

impl PatchCoreConfig {
    /// The original's default preset: WideResNet-50-2 (torchvision's ImageNet weights, for example
    /// `wide_resnet50_2-95faca4d.pth` or timm's `wide_resnet50_2.tv_in1k` safetensors), taps `layer2` and `layer3`,
    /// ImageNet normalisation, resize 256, crop 224, 3×3 patches, 1024/1024 dimensions, approximate greedy coreset at
    /// 10%, k = 1, exact search, bilinear upsampling and σ = 4 blur.
    pub fn wide_resnet50_2(weights: impl Into<PathBuf>) -> Self {
        Self::for_arch(Arch::WideResNet50_2, weights)
    }

    /// EfficientNet-Lite0 with the original's other defaults: taps `_blocks.4` and `_blocks.10`, resize 256,
    /// crop 224, 3×3 patches, 1024/1024 dimensions, approximate greedy coreset at 10%, k = 1, exact search,
    /// bilinear upsampling and σ = 4 blur.
    pub fn lite0(weights: impl Into<PathBuf>) -> Self {
        Self::for_arch(Arch::EfficientNetLite0, weights)
    }

    /// Any backbone with its own default taps and normalisation, and the original's other defaults (as in
    /// [`PatchCoreConfig::wide_resnet50_2`]).
    pub fn for_arch(arch: Arch, weights: impl Into<PathBuf>) -> Self {
        Self {
            backbone: BackboneConfig {
                arch,
                weights: weights.into(),
                taps: arch.default_taps(),
            },
            preprocess: PreprocessConfig {
                resize: 256,
                crop: 224,
                normalization: arch.normalization(),
                resample: Resample::PilBilinear,
            },
            embed: EmbedConfig::inspection(),
            sampler: Sampler::ApproximateGreedy(GreedyConfig::new(0.1)),
            index: IndexSpec::Exact(ExactConfig::default()),
            k: 1,
            scoring: Scoring::MeanOfK,
            segmentation: SegmentationConfig::inspection(),
            seed: 0,
            batch_size: 8,
            device: DeviceSpec::Cpu,
        }
    }

    /// Checks every value that can be checked without data.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad parameter, its value and what was expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backbone.taps.is_empty() {
            return Err(ConfigError::invalid(
                "backbone.taps",
                "[]",
                "at least one layer name",
            ));
        }
        let valid_taps = self.backbone.arch.valid_taps();
        if let Some(bad) = self.backbone.taps.iter().find(|t| !valid_taps.contains(t)) {
            return Err(ConfigError::invalid(
                "backbone.taps",
                format!("{bad:?}"),
                format!(
                    "a layer of {}: {}",
                    self.backbone.arch,
                    valid_taps.join(", ")
                ),
            ));
        }
        self.preprocess.validate()?;
        // The normalisation belongs to the backbone: weights trained with other constants see shifted inputs.
        let expected = self.backbone.arch.normalization();
        if self.preprocess.normalization != expected {
            return Err(ConfigError::invalid(
                "preprocess.normalization",
                format!("{:?}", self.preprocess.normalization),
                format!(
                    "the {} backbone's constants {expected:?}",
                    self.backbone.arch
                ),
            ));
        }
        self.embed.validate().map_err(|e| match e {
            patchcore_patch::PatchError::InvalidParameter {
                parameter,
                value,
                expected,
            } => ConfigError::invalid(
                format!("embed.{}", parameter.replace("patch ", "patch.")),
                value,
                expected,
            ),
            other => ConfigError::invalid("embed", format!("{:?}", self.embed), other.to_string()),
        })?;
        if let Sampler::ApproximateGreedy(g) = &self.sampler {
            if !(g.ratio > 0.0 && g.ratio <= 1.0) {
                return Err(ConfigError::invalid(
                    "coreset ratio",
                    g.ratio.to_string(),
                    "a number in (0, 1]",
                ));
            }
            if g.projection_dim == 0 {
                return Err(ConfigError::invalid(
                    "coreset projection_dim",
                    "0",
                    "at least 1",
                ));
            }
            if g.start_points == 0 {
                return Err(ConfigError::invalid(
                    "coreset start_points",
                    "0",
                    "at least 1",
                ));
            }
        }
        if self.k == 0 {
            return Err(ConfigError::invalid(
                "k",
                "0",
                "at least 1 nearest neighbour",
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::invalid("batch_size", "0", "at least 1"));
        }
        self.segmentation.blur.validate().map_err(|e| match e {
            patchcore_segmentation::SegmentationError::InvalidParameter {
                parameter,
                value,
                expected,
            } => ConfigError::invalid(format!("segmentation.blur.{parameter}"), value, expected),
            other => ConfigError::invalid(
                "segmentation.blur",
                format!("{:?}", self.segmentation.blur),
                other.to_string(),
            ),
        })?;
        Ok(())
    }
}

/// An invalid configuration value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A parameter is out of its valid range.
    #[error("invalid {parameter} = {value}: expected {expected}")]
    Invalid {
        /// The parameter's name.
        parameter: String,
        /// The given value.
        value: String,
        /// What would have been valid.
        expected: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        parameter: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            parameter: parameter.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid configuration value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An image file could not be read or decoded.
    #[error("cannot read image {path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        source: image::ImageError,
    },
    /// An image decoded to zero pixels.
    #[error("image {path} has no pixels")]
    EmptyImage {
        /// The file.
        path: PathBuf,
    },
    /// Fitting was given no images.
    #[error("no training images were given")]
    NoImages,
    /// `k` exceeds the memory bank.
    #[error("invalid k = {k}: the memory bank holds only {bank_size} entries (k must be at most the bank size)")]
    KTooLarge {
        /// The requested number of neighbours.
        k: usize,
        /// The bank size.
        bank_size: usize,
    },
    /// The backbone failed (weights, taps, forward pass).
    #[error(transparent)]
    Backbone(#[from] patchcore_backbone::BackboneError),
    /// Patch embedding failed.
    #[error(transparent)]
    Patch(#[from] patchcore_patch::PatchError),
    /// Coreset selection failed.
    #[error(transparent)]
    Coreset(#[from] patchcore_coreset::CoresetError),
    /// Nearest-neighbour search failed.
    #[error(transparent)]
    Knn(#[from] patchcore_knn::KnnError),
    /// Anomaly-map construction failed.
    #[error(transparent)]
    Segmentation(#[from] patchcore_segmentation::SegmentationError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model file is not a valid PatchCore model.
    #[error("model file {path}: {reason}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model file was written by a newer format version.
    #[error(
        "model file {path} has format version {found}; this build reads versions up to {supported}"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A checksum in a model file does not match its content.
    #[error("model file {path}: the {what} checksum does not match (expected {expected}, computed {got}); the file is corrupt")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Which part failed.
        what: &'static str,
        /// The recorded checksum.
        expected: String,
        /// The computed checksum.
        got: String,
    },
    /// The backbone weights differ from those the model was fitted with.
    #[error("backbone weights {path} have SHA-256 {got}, but the model was fitted with weights of SHA-256 {expected}")]
    WeightsMismatch {
        /// The weights file.
        path: PathBuf,
        /// The recorded hash.
        expected: String,
        /// The hash of the given file.
        got: String,
    },
    /// A metric or threshold could not be computed.
    #[error(transparent)]
    Metric(#[from] metrics::MetricError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
}
