//! CNN feature extractors for PatchCore, on candle, loading PyTorch checkpoints directly.
//!
//! The crate provides torchvision's ResNet-18/34/50/101/152 and WideResNet-50-2/101-2
//! ([`resnet`]; WideResNet-50-2 with taps `layer2` + `layer3` is PatchCore's default) and
//! EfficientNet-Lite0 … Lite4 ([`efficientnet`]) as *tapped* feature extractors: the caller names
//! intermediate layers by their state-dict module path (for example `layer2` and `layer3`, or
//! `_blocks.4` and `_blocks.10`) and gets one feature map per tap. Weights come straight from the
//! PyTorch checkpoints the reference models ship with, or from safetensors copies of them
//! ([`pth`]), so no conversion step is needed.
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use patchcore_backbone::{load, Arch};
//!
//! # fn main() -> Result<(), patchcore_backbone::BackboneError> {
//! let arch = Arch::EfficientNetLite0;
//! let device = Device::Cpu;
//! let model = load(arch, "efficientnet-lite0-57934424.pth".as_ref(), &arch.default_taps(), &device)?;
//! let x = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &device)?;
//! let taps = model.extract(&x)?; // [(1, 40, 28, 28), (1, 112, 14, 14)]
//! # Ok(()) }
//! ```
//!
//! ## Design
//!
//! * **Checkpoints.** [`pth::read_state_dict`] reads the legacy (pre-1.6) PyTorch format, the
//!   zip format and safetensors, recognised by their first bytes. The legacy format is
//!   unpickled with candle's public pickle machinery; locating storages, applying storage
//!   offsets and strides and handling shared storages is done here. Every failure on user input
//!   is a [`BackboneError`] naming the file; nothing panics on a malformed file.
//! * **Model.** The ResNets mirror `torchvision.models.resnet` (timm's `tv_in1k` weights use the
//!   same keys), the Lite models the PyPI package `efficientnet-lite-pytorch`, with parameter
//!   names equal to their state-dict keys. Only the layers up to the deepest requested
//!   tap are built, so only their weights are read from the checkpoint and nothing past the tap
//!   is computed. Batch norm runs in inference mode (epsilon 1e-5 for the ResNets, 1e-3 for the
//!   Lite models) and is folded into the preceding convolution's weight and bias when the model
//!   is built (the folding is computed in f64).
//! * **Padding.** The reference pads like TensorFlow's "same", computed statically for the
//!   native input size. Here the same formula is evaluated for the actual input size at every
//!   call, which equals the static padding at the native size and stays correct elsewhere.
//! * **Speed.** Candle's grouped convolution runs one convolution per group, far too slow for
//!   depthwise layers. [`ops::DepthwiseConv2d`] is a candle custom op with a CPU kernel that is
//!   parallel over batch × channel (rayon), handles stride and asymmetric padding, and splits
//!   strided rows into column phases so that its inner loop is contiguous. Dense and 1 × 1
//!   convolutions run as [`ops::Conv2dGemm`], one `gemm` product per image that accumulates into
//!   the bias and applies the activation in place; the `gemm` crate is built with its AVX-512
//!   kernels (`x86-v4`), chosen at run time where the processor has them. On other devices every op falls back to candle's own
//!   convolutions. On the CPU a large batch is run in sub-batches whose biggest activation stays
//!   under 16 MiB, because buffers beyond that come from fresh pages whose first-touch faults
//!   cost more than batching gains.
//! * **Devices.** The default build is CPU-only; the `cuda` feature forwards to candle's.
//!
//! The public surface the PatchCore pipeline relies on is [`Arch`], [`Normalization`],
//! [`FeatureExtractor`], [`load`], [`file_sha256`] and [`BackboneError`].

#![deny(missing_docs)]

pub mod efficientnet;
mod error;
pub mod ops;
pub mod pth;
pub mod resnet;
mod weights;

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
pub use error::{BackboneError, Result};
pub use pth::read_state_dict;
pub use resnet::{ResNet, ResNetConfig};

/// The supported backbone architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// EfficientNet-Lite0 (224 px).
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    /// EfficientNet-Lite1 (240 px).
    #[serde(rename = "efficientnet-lite1")]
    EfficientNetLite1,
    /// EfficientNet-Lite2 (260 px).
    #[serde(rename = "efficientnet-lite2")]
    EfficientNetLite2,
    /// EfficientNet-Lite3 (280 px).
    #[serde(rename = "efficientnet-lite3")]
    EfficientNetLite3,
    /// EfficientNet-Lite4 (300 px).
    #[serde(rename = "efficientnet-lite4")]
    EfficientNetLite4,
    /// torchvision's ResNet-18.
    #[serde(rename = "resnet18")]
    ResNet18,
    /// torchvision's ResNet-34.
    #[serde(rename = "resnet34")]
    ResNet34,
    /// torchvision's ResNet-50.
    #[serde(rename = "resnet50")]
    ResNet50,
    /// torchvision's ResNet-101.
    #[serde(rename = "resnet101")]
    ResNet101,
    /// torchvision's ResNet-152.
    #[serde(rename = "resnet152")]
    ResNet152,
    /// torchvision's WideResNet-50-2: PatchCore's default backbone.
    #[serde(rename = "wide_resnet50_2")]
    WideResNet50_2,
    /// torchvision's WideResNet-101-2.
    #[serde(rename = "wide_resnet101_2")]
    WideResNet101_2,
}

/// The architecture family, which decides the model code and the preprocessing constants.
#[derive(Debug, Clone, PartialEq)]
enum Family {
    EfficientNetLite(EfficientNetLiteConfig),
    ResNet(ResNetConfig),
}

impl Arch {
    /// Every architecture, in order.
    pub const ALL: [Arch; 12] = [
        Arch::EfficientNetLite0,
        Arch::EfficientNetLite1,
        Arch::EfficientNetLite2,
        Arch::EfficientNetLite3,
        Arch::EfficientNetLite4,
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
        Arch::WideResNet50_2,
        Arch::WideResNet101_2,
    ];

    /// The EfficientNet-Lite architectures.
    pub const EFFICIENTNET_LITE: [Arch; 5] = [
        Arch::EfficientNetLite0,
        Arch::EfficientNetLite1,
        Arch::EfficientNetLite2,
        Arch::EfficientNetLite3,
        Arch::EfficientNetLite4,
    ];

    /// The ResNet and WideResNet architectures.
    pub const RESNETS: [Arch; 7] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
        Arch::WideResNet50_2,
        Arch::WideResNet101_2,
    ];

    /// The canonical name, as used by serde, [`fmt::Display`] and [`FromStr`].
    ///
    /// The ResNets are named as in torchvision (`resnet50`, `wide_resnet50_2`), the Lite models
    /// as in their PyTorch package (`efficientnet-lite0`).
    pub fn name(&self) -> &'static str {
        match self {
            Arch::EfficientNetLite0 => "efficientnet-lite0",
            Arch::EfficientNetLite1 => "efficientnet-lite1",
            Arch::EfficientNetLite2 => "efficientnet-lite2",
            Arch::EfficientNetLite3 => "efficientnet-lite3",
            Arch::EfficientNetLite4 => "efficientnet-lite4",
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
            Arch::WideResNet50_2 => "wide_resnet50_2",
            Arch::WideResNet101_2 => "wide_resnet101_2",
        }
    }

    /// The model configuration behind the architecture.
    fn family(&self) -> Family {
        match (
            EfficientNetLiteConfig::for_arch(*self),
            ResNetConfig::for_arch(*self),
        ) {
            (Some(c), _) => Family::EfficientNetLite(c),
            (None, Some(c)) => Family::ResNet(c),
            // Every architecture belongs to one of the two families (checked by a unit test);
            // this arm is never taken.
            (None, None) => Family::EfficientNetLite(EfficientNetLiteConfig::lite0()),
        }
    }

    /// The taps PatchCore uses by default: the ends of the stride-8 and stride-16 stages.
    ///
    /// For the ResNets these are `["layer2", "layer3"]`, as in the original. For every Lite model
    /// they are the last blocks of stages 2 and 4, which for Lite0 are
    /// `["_blocks.4", "_blocks.10"]`.
    pub fn default_taps(&self) -> Vec<String> {
        match self.family() {
            Family::EfficientNetLite(c) => c.default_taps(),
            Family::ResNet(c) => c.default_taps(),
        }
    }

    /// Every tap name the architecture accepts.
    pub fn valid_taps(&self) -> Vec<String> {
        match self.family() {
            Family::EfficientNetLite(c) => c.tap_names(),
            Family::ResNet(c) => c.tap_names(),
        }
    }

    /// The input normalisation the pretrained weights expect.
    ///
    /// The ResNets take ImageNet's mean (0.485, 0.456, 0.406) and standard deviation
    /// (0.229, 0.224, 0.225), as torchvision's and timm's `tv_in1k` weights do. The Lite models
    /// take `(x − 127/255) / (128/255)` on every channel of an image in [0, 1], that is
    /// `(u8 − 127) / 128`.
    pub fn normalization(&self) -> Normalization {
        match self.family() {
            Family::EfficientNetLite(_) => Normalization {
                mean: [127.0 / 255.0; 3],
                std: [128.0 / 255.0; 3],
            },
            Family::ResNet(_) => Normalization {
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
            },
        }
    }

    /// The input resolution the model was trained at (square).
    pub fn native_input_size(&self) -> usize {
        match self.family() {
            Family::EfficientNetLite(c) => c.image_size,
            Family::ResNet(_) => 224,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = BackboneError;

    /// Parses a canonical name, ignoring case and treating `_` and `-` alike.
    fn from_str(s: &str) -> Result<Self> {
        let fold = |n: &str| n.trim().to_ascii_lowercase().replace('_', "-");
        let wanted = fold(s);
        Arch::ALL
            .into_iter()
            .find(|a| fold(a.name()) == wanted)
            .ok_or_else(|| BackboneError::UnknownArch {
                name: s.to_string(),
                valid: Arch::ALL.iter().map(|a| a.name().to_string()).collect(),
            })
    }
}

/// Per-channel input normalisation: `x_normalised = (x − mean) / std` for `x` in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    /// The mean subtracted from each RGB channel.
    pub mean: [f32; 3],
    /// The standard deviation each RGB channel is divided by.
    pub std: [f32; 3],
}

/// A CNN that returns intermediate feature maps ("taps").
pub trait FeatureExtractor: Send + Sync + std::fmt::Debug {
    /// The architecture.
    fn arch(&self) -> Arch;

    /// The tap names, in the order [`FeatureExtractor::extract`] returns them.
    fn taps(&self) -> &[String];

    /// The channel count of each tap, in tap order.
    fn tap_channels(&self) -> Vec<usize>;

    /// The total stride of each tap relative to the input, in tap order.
    fn tap_strides(&self) -> Vec<usize>;

    /// Runs the network on a batch.
    ///
    /// `x`: (B, 3, H, W) f32, already normalised. Returns one (B, C_i, H_i, W_i) tensor per tap,
    /// in tap order.
    ///
    /// # Errors
    ///
    /// [`BackboneError::InvalidInput`] for a tensor of the wrong shape or type, and
    /// [`BackboneError::Candle`] when a computation fails.
    fn extract(&self, x: &Tensor) -> Result<Vec<Tensor>>;
}

/// Builds a feature extractor from a checkpoint.
///
/// `weights` may be a PyTorch checkpoint (legacy or zip) or a safetensors file whose keys are the
/// reference model's state-dict keys. `taps` names the layers to return (see
/// [`Arch::valid_taps`]); only the layers up to the deepest tap are loaded and run.
///
/// # Errors
///
/// Tap errors ([`BackboneError::UnknownTap`], [`BackboneError::DuplicateTap`],
/// [`BackboneError::NoTaps`]), checkpoint errors ([`BackboneError::Io`],
/// [`BackboneError::Format`], [`BackboneError::UnsupportedStorage`]) and weight errors
/// ([`BackboneError::MissingWeight`], [`BackboneError::ShapeMismatch`]).
pub fn load(
    arch: Arch,
    weights: &Path,
    taps: &[String],
    device: &Device,
) -> Result<Box<dyn FeatureExtractor>> {
    Ok(match arch.family() {
        Family::EfficientNetLite(_) => {
            Box::new(EfficientNetLite::load(arch, weights, taps, device)?)
        }
        Family::ResNet(_) => Box::new(ResNet::load(arch, weights, taps, device)?),
    })
}

/// The SHA-256 of a file as lowercase hex, used to identify weights.
///
/// # Errors
///
/// [`BackboneError::Io`] when the file cannot be read.
pub fn file_sha256(path: &Path) -> Result<String> {
    let io = |source| BackboneError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.to_string().parse::<Arch>().ok(), Some(a));
        }
        assert_eq!(
            "EfficientNet_Lite3".parse::<Arch>().ok(),
            Some(Arch::EfficientNetLite3)
        );
        assert_eq!(
            "wide-resnet50-2".parse::<Arch>().ok(),
            Some(Arch::WideResNet50_2)
        );
        assert_eq!("ResNet18".parse::<Arch>().ok(), Some(Arch::ResNet18));
        let err = "resnet19".parse::<Arch>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("wide_resnet50_2") && e.contains("resnet19")));
        for a in Arch::ALL {
            let lite = EfficientNetLiteConfig::for_arch(a).is_some();
            let resnet = ResNetConfig::for_arch(a).is_some();
            assert!(lite != resnet, "{a} must belong to exactly one family");
            assert_eq!(lite, Arch::EFFICIENTNET_LITE.contains(&a));
            assert_eq!(resnet, Arch::RESNETS.contains(&a));
        }
    }

    #[test]
    fn arch_facts() {
        let a = Arch::EfficientNetLite0;
        assert_eq!(a.default_taps(), vec!["_blocks.4", "_blocks.10"]);
        assert_eq!(a.native_input_size(), 224);
        assert_eq!(Arch::EfficientNetLite4.native_input_size(), 300);
        let n = a.normalization();
        assert_eq!(n.mean, [127.0 / 255.0; 3]);
        assert_eq!(n.std, [128.0 / 255.0; 3]);
        let w = Arch::WideResNet50_2;
        assert_eq!(w.default_taps(), vec!["layer2", "layer3"]);
        assert_eq!(w.valid_taps(), vec!["layer1", "layer2", "layer3", "layer4"]);
        assert_eq!(w.native_input_size(), 224);
        assert_eq!(w.normalization().mean, [0.485, 0.456, 0.406]);
        assert_eq!(w.normalization().std, [0.229, 0.224, 0.225]);
    }
}
