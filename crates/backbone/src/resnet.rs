//! ResNet-18/34/50/101/152 and WideResNet-50-2/101-2 as truncated, tapped feature extractors.
//!
//! The architecture is torchvision's (`torchvision.models.resnet`), which is also the layout of
//! timm's `resnet*.tv_in1k` and `wide_resnet*_2.tv_in1k` weights; both use the same state-dict
//! keys (`conv1`, `bn1`, `layer1.0.conv1`, …, `layer4.2.downsample.1.running_var`, `fc`):
//!
//! * a stem: 7 × 7 convolution with stride 2 and padding 3 (64 channels, no bias), batch norm,
//!   ReLU, then 3 × 3 max pooling with stride 2 and padding 1;
//! * four stages `layer1` … `layer4` with 64, 128, 256 and 512 "planes", the first with stride 1
//!   and the others with stride 2 on their first block;
//! * ResNet-18/34 use the basic block (two 3 × 3 convolutions, output = planes channels);
//!   ResNet-50/101/152 use the bottleneck (1 × 1 to the width, 3 × 3 with the stage's stride,
//!   1 × 1 to 4 × planes channels: torchvision's "v1.5", stride on the 3 × 3). The wide variants
//!   double the bottleneck's inner width (`width_per_group` 128 instead of 64) and keep its
//!   output channels;
//! * a block whose stride is not 1 or whose input and output channels differ projects its input
//!   with `downsample` (a 1 × 1 convolution with the block's stride and a batch norm); the block's
//!   output is `relu(residual + shortcut)`.
//!
//! Every batch norm runs in inference mode with epsilon 1e-5 and is folded into the preceding
//! convolution when the model is built. The average pooling and `fc` head are not built: this is
//! a feature extractor. Only the stages up to the deepest requested tap are built, so only their
//! weights are read and nothing deeper is computed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};
use crate::ops::{self, Activation, Padding2d};
use crate::weights::Weights;
use crate::{Arch, FeatureExtractor};

/// The residual block of a ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3 × 3 convolutions (ResNet-18/34); expansion 1.
    Basic,
    /// 1 × 1, 3 × 3, 1 × 1 convolutions (ResNet-50 and deeper, WideResNets); expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// The ratio of a block's output channels to its stage's planes.
    pub fn expansion(&self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The hyper-parameters of a torchvision ResNet.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    /// Which preset this is.
    pub arch: Arch,
    /// The block type.
    pub block: BlockKind,
    /// The number of blocks of `layer1` … `layer4`.
    pub layers: [usize; 4],
    /// The bottleneck width of the first stage: 64, or 128 for the wide variants.
    pub width_per_group: usize,
    /// The batch-norm epsilon (1e-5, PyTorch's default).
    pub batch_norm_epsilon: f64,
}

/// The concrete arguments of one residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResBlockConfig {
    /// The stage index, 0 for `layer1` … 3 for `layer4`.
    pub stage: usize,
    /// The block's index inside its stage.
    pub index: usize,
    /// Input channels.
    pub in_channels: usize,
    /// The inner width: the output channels of `conv1` (and `conv2` for bottlenecks).
    pub width: usize,
    /// Output channels.
    pub out_channels: usize,
    /// The stride of the block (on `conv1` for basic blocks, `conv2` for bottlenecks).
    pub stride: usize,
    /// Whether the block has a `downsample` projection.
    pub downsample: bool,
}

impl ResBlockConfig {
    /// The block's state-dict prefix, e.g. `layer2.0`.
    pub fn prefix(&self) -> String {
        format!("layer{}.{}", self.stage + 1, self.index)
    }
}

/// The stem's output channels.
const STEM_CHANNELS: usize = 64;

impl ResNetConfig {
    fn new(arch: Arch, block: BlockKind, layers: [usize; 4], width_per_group: usize) -> Self {
        Self {
            arch,
            block,
            layers,
            width_per_group,
            batch_norm_epsilon: 1e-5,
        }
    }

    /// The preset of an architecture, or `None` when it is not a ResNet.
    pub fn for_arch(arch: Arch) -> Option<Self> {
        use BlockKind::{Basic, Bottleneck};
        Some(match arch {
            Arch::ResNet18 => Self::new(arch, Basic, [2, 2, 2, 2], 64),
            Arch::ResNet34 => Self::new(arch, Basic, [3, 4, 6, 3], 64),
            Arch::ResNet50 => Self::new(arch, Bottleneck, [3, 4, 6, 3], 64),
            Arch::ResNet101 => Self::new(arch, Bottleneck, [3, 4, 23, 3], 64),
            Arch::ResNet152 => Self::new(arch, Bottleneck, [3, 8, 36, 3], 64),
            Arch::WideResNet50_2 => Self::new(arch, Bottleneck, [3, 4, 6, 3], 128),
            Arch::WideResNet101_2 => Self::new(arch, Bottleneck, [3, 4, 23, 3], 128),
            Arch::EfficientNetLite0
            | Arch::EfficientNetLite1
            | Arch::EfficientNetLite2
            | Arch::EfficientNetLite3
            | Arch::EfficientNetLite4 => return None,
        })
    }

    /// The output channels of stage `stage` (0 … 3).
    pub fn stage_channels(&self, stage: usize) -> usize {
        (64 << stage) * self.block.expansion()
    }

    /// The blocks of stage `stage` (0 … 3), as torchvision's `_make_layer` builds them.
    pub fn stage_blocks(&self, stage: usize) -> Vec<ResBlockConfig> {
        let planes = 64 << stage;
        let out = self.stage_channels(stage);
        let width = match self.block {
            BlockKind::Basic => planes,
            BlockKind::Bottleneck => planes * self.width_per_group / 64,
        };
        let mut in_channels = if stage == 0 {
            STEM_CHANNELS
        } else {
            self.stage_channels(stage - 1)
        };
        let first_stride = if stage == 0 { 1 } else { 2 };
        (0..self.layers.get(stage).copied().unwrap_or(0))
            .map(|index| {
                let stride = if index == 0 { first_stride } else { 1 };
                let b = ResBlockConfig {
                    stage,
                    index,
                    in_channels,
                    width,
                    out_channels: out,
                    stride,
                    downsample: stride != 1 || in_channels != out,
                };
                in_channels = out;
                b
            })
            .collect()
    }

    /// Every valid tap: `layer1` … `layer4`.
    pub fn tap_names(&self) -> Vec<String> {
        (1..=4).map(|i| format!("layer{i}")).collect()
    }

    /// PatchCore's taps: `layer2` and `layer3`.
    pub fn default_taps(&self) -> Vec<String> {
        vec!["layer2".to_string(), "layer3".to_string()]
    }

    /// The stage index (0 … 3), channels and total stride of a tap, or `None` for an unknown name.
    pub fn tap_info(&self, tap: &str) -> Option<ResNetTap> {
        let stage = match tap {
            "layer1" => 0,
            "layer2" => 1,
            "layer3" => 2,
            "layer4" => 3,
            _ => return None,
        };
        Some(ResNetTap {
            stage,
            channels: self.stage_channels(stage),
            stride: 4 << stage,
        })
    }

    /// The float tensors of the torchvision state dict that the stem and `layer1` …
    /// `layer{stages}` need, with their shapes, in the model's order. The classifier (`fc`) and
    /// the batch norms' `num_batches_tracked` counters are not needed and not listed.
    pub fn weight_shapes(&self, stages: usize) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut conv_bn = |conv: &str, bn: &str, shape: [usize; 4]| {
            out.push((format!("{conv}.weight"), shape.to_vec()));
            for name in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{bn}.{name}"), vec![shape[0]]));
            }
        };
        conv_bn("conv1", "bn1", [STEM_CHANNELS, 3, 7, 7]);
        for stage in 0..stages.min(4) {
            for b in self.stage_blocks(stage) {
                for (conv, bn, shape) in block_convs(&b, self.block) {
                    conv_bn(&conv, &bn, shape);
                }
            }
        }
        out
    }
}

/// The convolutions of a block: (conv key prefix, batch-norm key prefix, weight shape).
fn block_convs(b: &ResBlockConfig, kind: BlockKind) -> Vec<(String, String, [usize; 4])> {
    let p = b.prefix();
    let mut convs = match kind {
        BlockKind::Basic => vec![
            (
                format!("{p}.conv1"),
                format!("{p}.bn1"),
                [b.width, b.in_channels, 3, 3],
            ),
            (
                format!("{p}.conv2"),
                format!("{p}.bn2"),
                [b.out_channels, b.width, 3, 3],
            ),
        ],
        BlockKind::Bottleneck => vec![
            (
                format!("{p}.conv1"),
                format!("{p}.bn1"),
                [b.width, b.in_channels, 1, 1],
            ),
            (
                format!("{p}.conv2"),
                format!("{p}.bn2"),
                [b.width, b.width, 3, 3],
            ),
            (
                format!("{p}.conv3"),
                format!("{p}.bn3"),
                [b.out_channels, b.width, 1, 1],
            ),
        ],
    };
    if b.downsample {
        convs.push((
            format!("{p}.downsample.0"),
            format!("{p}.downsample.1"),
            [b.out_channels, b.in_channels, 1, 1],
        ));
    }
    convs
}

/// What a ResNet tap yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetTap {
    /// The stage whose output it is (0 for `layer1`).
    pub stage: usize,
    /// Its channel count.
    pub channels: usize,
    /// Its total stride relative to the input.
    pub stride: usize,
}

/// A convolution with its batch norm folded in, and an activation.
#[derive(Debug, Clone)]
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    activation: Activation,
}

impl FoldedConv {
    fn load(
        w: &mut Weights<'_>,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        stride: usize,
        activation: Activation,
        eps: f64,
    ) -> Result<Self> {
        let (weight, bias) = w.conv_bn(conv, bn, &shape, eps)?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: shape[2] / 2,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv2d(
            x,
            &self.weight,
            &self.bias,
            self.stride,
            Padding2d::uniform(self.padding),
            self.activation,
        )
    }
}

/// One residual block with its batch norms folded.
#[derive(Debug, Clone)]
struct ResBlock {
    /// The residual branch; the last convolution has no activation.
    convs: Vec<FoldedConv>,
    downsample: Option<FoldedConv>,
}

impl ResBlock {
    fn load(w: &mut Weights<'_>, b: &ResBlockConfig, kind: BlockKind, eps: f64) -> Result<Self> {
        let specs = block_convs(b, kind);
        let n_branch = match kind {
            BlockKind::Basic => 2,
            BlockKind::Bottleneck => 3,
        };
        let mut convs = Vec::with_capacity(n_branch);
        let mut downsample = None;
        for (i, (conv, bn, shape)) in specs.into_iter().enumerate() {
            // Basic blocks stride on conv1, bottlenecks on conv2 (3 × 3); the projection strides
            // as the block does.
            let stride = match (kind, i) {
                (BlockKind::Basic, 0) | (BlockKind::Bottleneck, 1) => b.stride,
                (_, i) if i == n_branch => b.stride,
                _ => 1,
            };
            let activation = if i + 1 < n_branch {
                Activation::Relu
            } else {
                Activation::Identity
            };
            let c = FoldedConv::load(w, &conv, &bn, shape, stride, activation, eps)?;
            if i < n_branch {
                convs.push(c);
            } else {
                downsample = Some(c);
            }
        }
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for c in &self.convs {
            h = c.forward(&h)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        ops::add_relu(&h, &shortcut)
    }
}

/// A torchvision ResNet truncated after its deepest requested tap.
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: FoldedConv,
    stages: Vec<Vec<ResBlock>>,
    taps: Vec<String>,
    tap_infos: Vec<ResNetTap>,
}

impl ResNet {
    /// Builds the model from a state dict (`key → tensor`, torchvision's keys).
    ///
    /// `path` only names the checkpoint in errors. Keys the model does not need (the classifier,
    /// stages deeper than the deepest tap, `num_batches_tracked`) are ignored. The weights end up
    /// on `device`.
    ///
    /// # Errors
    ///
    /// [`BackboneError::NoTaps`], [`BackboneError::DuplicateTap`] and
    /// [`BackboneError::UnknownTap`] for bad taps; [`BackboneError::MissingWeight`] and
    /// [`BackboneError::ShapeMismatch`] for weights that do not fit the architecture.
    pub fn from_state_dict(
        config: ResNetConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        taps: &[String],
        device: &Device,
    ) -> Result<Self> {
        let tap_infos = resolve_taps(&config, taps)?;
        let deepest = tap_infos
            .iter()
            .map(|t| t.stage)
            .max()
            .ok_or(BackboneError::NoTaps)?;
        let eps = config.batch_norm_epsilon;
        let mut w = Weights {
            path,
            tensors,
            device,
        };
        let stem = FoldedConv::load(
            &mut w,
            "conv1",
            "bn1",
            [STEM_CHANNELS, 3, 7, 7],
            2,
            Activation::Relu,
            eps,
        )?;
        let stages = (0..=deepest)
            .map(|s| {
                config
                    .stage_blocks(s)
                    .iter()
                    .map(|b| ResBlock::load(&mut w, b, config.block, eps))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            stem,
            stages,
            taps: taps.to_vec(),
            tap_infos,
        })
    }

    /// Reads a checkpoint with [`crate::pth::read_state_dict`] and builds the model from it.
    ///
    /// # Errors
    ///
    /// [`BackboneError::UnknownArch`] when `arch` is not a ResNet, and any error of
    /// [`crate::pth::read_state_dict`] or [`ResNet::from_state_dict`].
    pub fn load(arch: Arch, weights: &Path, taps: &[String], device: &Device) -> Result<Self> {
        let config = ResNetConfig::for_arch(arch).ok_or_else(|| BackboneError::UnknownArch {
            name: arch.to_string(),
            valid: Arch::RESNETS.iter().map(|a| a.to_string()).collect(),
        })?;
        // Tap errors are reported before the (slower) checkpoint read.
        resolve_taps(&config, taps)?;
        let tensors = crate::pth::read_state_dict(weights, &Device::Cpu)?
            .into_iter()
            .collect();
        Self::from_state_dict(config, tensors, weights, taps, device)
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// How many stages were built (the deepest tapped stage plus one).
    pub fn num_stages_built(&self) -> usize {
        self.stages.len()
    }

    /// Runs the network up to the deepest tap and returns the taps in the requested order.
    ///
    /// # Errors
    ///
    /// [`BackboneError::InvalidInput`] unless `x` is a (B, 3, H, W) f32 tensor with positive
    /// sizes, and [`BackboneError::Candle`] if a computation fails (for example an input too
    /// small for the stride-2 layers).
    pub fn forward_taps(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 3 || dims.contains(&0) || x.dtype() != DType::F32 {
            return Err(BackboneError::InvalidInput {
                shape: dims.to_vec(),
                dtype: x.dtype(),
            });
        }
        let batch = dims[0];
        let chunk = if x.device().is_cpu() {
            let per_image = self.peak_scratch_bytes(dims[2], dims[3]);
            (CPU_CHUNK_BYTES / per_image.max(1)).clamp(1, batch)
        } else {
            batch
        };
        if chunk >= batch {
            return self.forward_chunk(x);
        }
        // Run sub-batches and concatenate each tap along the batch dimension.
        let mut per_tap: Vec<Vec<Tensor>> = vec![Vec::new(); self.taps.len()];
        let mut start = 0;
        while start < batch {
            let len = chunk.min(batch - start);
            let outs = self.forward_chunk(&x.narrow(0, start, len)?)?;
            for (acc, t) in per_tap.iter_mut().zip(outs) {
                acc.push(t);
            }
            start += len;
        }
        per_tap
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect()
    }

    /// The largest unfolded (im2col) matrix of one image in bytes: the stem's or `layer1`'s 3 × 3
    /// convolution's, whichever is larger; deeper stages have fewer pixels per channel.
    fn peak_scratch_bytes(&self, h: usize, w: usize) -> usize {
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let (h4, w4) = (h2.div_ceil(2), w2.div_ceil(2));
        let width = self
            .config
            .stage_blocks(0)
            .first()
            .map(|b| b.width)
            .unwrap_or(64);
        4 * (3 * 7 * 7 * h2 * w2).max(width * 9 * h4 * w4)
    }

    /// Runs one (sub-)batch through the network.
    fn forward_chunk(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outputs: Vec<Option<Tensor>> = vec![None; self.tap_infos.len()];
        let mut h = self.stem.forward(x)?;
        h = max_pool_3x3_s2(&h)?;
        for (s, blocks) in self.stages.iter().enumerate() {
            for b in blocks {
                h = b.forward(&h)?;
            }
            for (slot, info) in outputs.iter_mut().zip(&self.tap_infos) {
                if info.stage == s {
                    *slot = Some(h.clone());
                }
            }
        }
        outputs
            .into_iter()
            .zip(&self.taps)
            .map(|(o, name)| {
                o.ok_or_else(|| {
                    BackboneError::Candle(candle_core::Error::Msg(format!(
                        "internal error: tap `{name}` was not computed"
                    )))
                })
            })
            .collect()
    }
}

/// On the CPU, a batch is split into sub-batches whose largest unfolded convolution input stays
/// below this many bytes. Larger buffers are served by the allocator as fresh pages from the
/// kernel, and the page faults on first touch then cost more than batching gains (the
/// convolutions already parallelise within one image).
const CPU_CHUNK_BYTES: usize = 16 << 20;

/// Max pooling with a 3 × 3 window, stride 2 and padding 1, as `nn.MaxPool2d(3, 2, 1)`.
///
/// PyTorch's padding never wins the maximum. Padding with a copy of the nearest border pixel
/// gives the same result: every window overlaps the image, and the copied pixel lies inside the
/// same window, so it adds no new value to any window.
fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    x.max_pool2d_with_stride(3, 2)
}

/// Validates the requested taps against a configuration.
fn resolve_taps(config: &ResNetConfig, taps: &[String]) -> Result<Vec<ResNetTap>> {
    if taps.is_empty() {
        return Err(BackboneError::NoTaps);
    }
    let mut infos: Vec<ResNetTap> = Vec::with_capacity(taps.len());
    for tap in taps {
        let info = config
            .tap_info(tap)
            .ok_or_else(|| BackboneError::UnknownTap {
                tap: tap.clone(),
                arch: config.arch,
                valid: config.tap_names(),
            })?;
        if infos.iter().any(|i| i.stage == info.stage) {
            return Err(BackboneError::DuplicateTap(tap.clone()));
        }
        infos.push(info);
    }
    Ok(infos)
}

impl FeatureExtractor for ResNet {
    fn arch(&self) -> Arch {
        self.config.arch
    }

    fn taps(&self) -> &[String] {
        &self.taps
    }

    fn tap_channels(&self) -> Vec<usize> {
        self.tap_infos.iter().map(|t| t.channels).collect()
    }

    fn tap_strides(&self) -> Vec<usize> {
        self.tap_infos.iter().map(|t| t.stride).collect()
    }

    fn extract(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_taps(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_resnet50_2_blocks_match_torchvision() {
        let cfg = ResNetConfig::for_arch(Arch::WideResNet50_2).unwrap();
        let l1 = cfg.stage_blocks(0);
        assert_eq!(l1.len(), 3);
        assert_eq!(
            (l1[0].in_channels, l1[0].width, l1[0].out_channels),
            (64, 128, 256)
        );
        assert!(l1[0].downsample && !l1[1].downsample);
        let l3 = cfg.stage_blocks(2);
        assert_eq!(l3.len(), 6);
        assert_eq!(
            (l3[0].in_channels, l3[0].width, l3[0].out_channels),
            (512, 512, 1024)
        );
        assert_eq!(l3[0].stride, 2);
        assert_eq!(
            cfg.tap_info("layer3").map(|t| (t.channels, t.stride)),
            Some((1024, 16))
        );
        assert_eq!(cfg.tap_info("layer5"), None);
        // Stem (5 tensors) + layer1 (3 blocks × 3 convs + 1 projection, 5 tensors each).
        assert_eq!(cfg.weight_shapes(1).len(), 5 + 10 * 5);
        // 68.9 M parameters in the full model, 2.05 M of them in fc.
        let params: usize = cfg
            .weight_shapes(4)
            .iter()
            .filter(|(k, _)| !k.contains("running"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 68_883_240 - 2048 * 1000 - 1000);
    }

    #[test]
    fn basic_blocks_match_torchvision() {
        let cfg = ResNetConfig::for_arch(Arch::ResNet18).unwrap();
        let l1 = cfg.stage_blocks(0);
        assert!(!l1[0].downsample);
        assert!(cfg.stage_blocks(1)[0].downsample);
        assert_eq!(cfg.stage_channels(3), 512);
        let params: usize = cfg
            .weight_shapes(4)
            .iter()
            .filter(|(k, _)| !k.contains("running"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // 11,689,512 parameters in torchvision's resnet18, 513,000 of them in fc.
        assert_eq!(params, 11_689_512 - 513_000);
        assert_eq!(ResNetConfig::for_arch(Arch::EfficientNetLite0), None);
    }
}
