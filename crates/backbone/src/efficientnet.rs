//! EfficientNet-Lite0 … Lite4 as a truncated, tapped feature extractor.
//!
//! The architecture follows the PyPI package `efficientnet-lite-pytorch` (itself derived from
//! `lukemelas/EfficientNet-PyTorch` and TensorFlow's `efficientnet_lite_builder.py`):
//!
//! * a stem: 3 × 3 convolution with stride 2 and 32 output channels (not scaled with the width,
//!   "fix_head_stem"), batch norm, ReLU6;
//! * seven stages of MBConv blocks without squeeze-excitation. A block expands with a 1 × 1
//!   convolution (when the expand ratio is not 1), runs a k × k depthwise convolution with the
//!   stage's stride on the first block of the stage, and projects with a 1 × 1 convolution
//!   without activation. Every convolution is followed by batch norm (epsilon 1e-3, inference
//!   mode with running statistics), the first two by ReLU6. Blocks with stride 1 and equal input
//!   and output channels add their input to their output;
//! * filters are scaled by [`round_filters`] and repeats by [`round_repeats`], except that the
//!   first and the last stage keep their repeat counts and the first stage's input stays at 32.
//!
//! All convolutions use TensorFlow's "same" padding. The reference computes that padding once,
//! statically, for the model's native image size (224 for Lite0); here it is computed from the
//! actual input size on every call ([`ops::Padding2d::same`]). The two agree at the native size and
//! the dynamic choice keeps outputs well defined at every other size.
//!
//! The head (`_conv_head`, `_bn1`, `_fc`) is not built: this is a feature extractor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};
use crate::ops;
use crate::weights::Weights;
use crate::{Arch, FeatureExtractor};

/// The block arguments of one stage, before width and depth scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageArgs {
    /// How many blocks the stage has (before depth scaling).
    pub num_repeat: usize,
    /// The depthwise kernel size.
    pub kernel_size: usize,
    /// The stride of the stage's first block.
    pub stride: usize,
    /// The expansion ratio of the inverted bottleneck.
    pub expand_ratio: usize,
    /// Input channels (before width scaling).
    pub input_filters: usize,
    /// Output channels (before width scaling).
    pub output_filters: usize,
}

/// The hyper-parameters of an EfficientNet-Lite model.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetLiteConfig {
    /// Which preset this is.
    pub arch: Arch,
    /// The channel multiplier.
    pub width_coefficient: f64,
    /// The depth (repeat) multiplier.
    pub depth_coefficient: f64,
    /// The native input resolution.
    pub image_size: usize,
    /// The batch-norm epsilon.
    pub batch_norm_epsilon: f64,
    /// Channel counts are rounded to multiples of this.
    pub depth_divisor: usize,
    /// The stem's output channels (fixed, not width-scaled, in the Lite models).
    pub stem_channels: usize,
    /// The seven stages, unscaled.
    pub stages: Vec<StageArgs>,
}

/// The concrete arguments of one MBConv block after scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockConfig {
    /// The stage the block belongs to (0 … 6).
    pub stage: usize,
    /// Input channels.
    pub input_filters: usize,
    /// Output channels.
    pub output_filters: usize,
    /// The expansion ratio; 1 means no expansion convolution.
    pub expand_ratio: usize,
    /// The depthwise kernel size.
    pub kernel_size: usize,
    /// The depthwise stride.
    pub stride: usize,
}

impl BlockConfig {
    /// The channel count inside the block, after expansion.
    pub fn expanded_filters(&self) -> usize {
        self.input_filters * self.expand_ratio
    }

    /// Whether the block adds its input to its output.
    pub fn has_skip(&self) -> bool {
        self.stride == 1 && self.input_filters == self.output_filters
    }
}

/// The Lite block table, from `efficientnet_lite_builder.py`: `r1_k3_s11_e1_i32_o16`, ….
const LITE_STAGES: [StageArgs; 7] = [
    stage(1, 3, 1, 1, 32, 16),
    stage(2, 3, 2, 6, 16, 24),
    stage(2, 5, 2, 6, 24, 40),
    stage(3, 3, 2, 6, 40, 80),
    stage(3, 5, 1, 6, 80, 112),
    stage(4, 5, 2, 6, 112, 192),
    stage(1, 3, 1, 6, 192, 320),
];

const fn stage(r: usize, k: usize, s: usize, e: usize, i: usize, o: usize) -> StageArgs {
    StageArgs {
        num_repeat: r,
        kernel_size: k,
        stride: s,
        expand_ratio: e,
        input_filters: i,
        output_filters: o,
    }
}

/// Scales a channel count by the width multiplier and rounds it to a multiple of `divisor`,
/// never rounding down by more than 10 % (`round_filters` of the reference).
pub fn round_filters(filters: usize, width: f64, divisor: usize) -> usize {
    let scaled = filters as f64 * width;
    let d = divisor as f64;
    // `int(filters + divisor / 2) // divisor * divisor` in the reference.
    let mut new = (((scaled + d / 2.0).floor() as usize) / divisor * divisor).max(divisor);
    if (new as f64) < 0.9 * scaled {
        new += divisor;
    }
    new
}

/// Scales a repeat count by the depth multiplier, rounding up (`round_repeats` of the reference).
pub fn round_repeats(repeats: usize, depth: f64) -> usize {
    (depth * repeats as f64).ceil() as usize
}

impl EfficientNetLiteConfig {
    fn lite(arch: Arch, width: f64, depth: f64, image_size: usize) -> Self {
        Self {
            arch,
            width_coefficient: width,
            depth_coefficient: depth,
            image_size,
            batch_norm_epsilon: 1e-3,
            depth_divisor: 8,
            stem_channels: 32,
            stages: LITE_STAGES.to_vec(),
        }
    }

    /// EfficientNet-Lite0: width 1.0, depth 1.0, 224 px.
    pub fn lite0() -> Self {
        Self::lite(Arch::EfficientNetLite0, 1.0, 1.0, 224)
    }

    /// EfficientNet-Lite1: width 1.0, depth 1.1, 240 px.
    pub fn lite1() -> Self {
        Self::lite(Arch::EfficientNetLite1, 1.0, 1.1, 240)
    }

    /// EfficientNet-Lite2: width 1.1, depth 1.2, 260 px.
    pub fn lite2() -> Self {
        Self::lite(Arch::EfficientNetLite2, 1.1, 1.2, 260)
    }

    /// EfficientNet-Lite3: width 1.2, depth 1.4, 280 px.
    pub fn lite3() -> Self {
        Self::lite(Arch::EfficientNetLite3, 1.2, 1.4, 280)
    }

    /// EfficientNet-Lite4: width 1.4, depth 1.8, 300 px.
    pub fn lite4() -> Self {
        Self::lite(Arch::EfficientNetLite4, 1.4, 1.8, 300)
    }

    /// The preset of an architecture, or `None` when it is not an EfficientNet-Lite.
    pub fn for_arch(arch: Arch) -> Option<Self> {
        Some(match arch {
            Arch::EfficientNetLite0 => Self::lite0(),
            Arch::EfficientNetLite1 => Self::lite1(),
            Arch::EfficientNetLite2 => Self::lite2(),
            Arch::EfficientNetLite3 => Self::lite3(),
            Arch::EfficientNetLite4 => Self::lite4(),
            Arch::ResNet18
            | Arch::ResNet34
            | Arch::ResNet50
            | Arch::ResNet101
            | Arch::ResNet152
            | Arch::WideResNet50_2
            | Arch::WideResNet101_2 => return None,
        })
    }

    /// Every MBConv block in order, with scaled channels and repeats, as the reference builds
    /// them: `_blocks.0`, `_blocks.1`, ….
    pub fn blocks(&self) -> Vec<BlockConfig> {
        let last = self.stages.len().saturating_sub(1);
        let mut blocks = Vec::new();
        for (i, st) in self.stages.iter().enumerate() {
            let mut input =
                round_filters(st.input_filters, self.width_coefficient, self.depth_divisor);
            let output = round_filters(
                st.output_filters,
                self.width_coefficient,
                self.depth_divisor,
            );
            // With fix_head_stem, the first and last stages keep their repeats, and the first
            // stage's input is the unscaled stem.
            let repeats = if i == 0 || i == last {
                st.num_repeat
            } else {
                round_repeats(st.num_repeat, self.depth_coefficient)
            };
            if i == 0 {
                input = self.stem_channels;
            }
            for r in 0..repeats {
                blocks.push(BlockConfig {
                    stage: i,
                    input_filters: if r == 0 { input } else { output },
                    output_filters: output,
                    expand_ratio: st.expand_ratio,
                    kernel_size: st.kernel_size,
                    stride: if r == 0 { st.stride } else { 1 },
                });
            }
        }
        blocks
    }

    /// Every valid tap: `_bn0` (the stem's output after its activation; `stem` is accepted as an
    /// alias) and `_blocks.N`.
    pub fn tap_names(&self) -> Vec<String> {
        std::iter::once("_bn0".to_string())
            .chain((0..self.blocks().len()).map(|i| format!("_blocks.{i}")))
            .collect()
    }

    /// The output channels and total stride of a tap, or `None` for an unknown name.
    pub fn tap_info(&self, tap: &str) -> Option<TapInfo> {
        let position = parse_tap(tap)?;
        let blocks = self.blocks();
        match position {
            TapPosition::Stem => Some(TapInfo {
                position,
                channels: self.stem_channels,
                stride: 2,
            }),
            TapPosition::Block(i) => {
                let b = blocks.get(i)?;
                let stride = 2 * blocks[..=i].iter().map(|b| b.stride).product::<usize>();
                Some(TapInfo {
                    position,
                    channels: b.output_filters,
                    stride,
                })
            }
        }
    }

    /// The last block of the stage at stride 8 (stage 2) and of the stage at stride 16 before the
    /// final downsampling (stage 4): `_blocks.4` and `_blocks.10` for Lite0.
    pub fn default_taps(&self) -> Vec<String> {
        let blocks = self.blocks();
        [2usize, 4]
            .iter()
            .filter_map(|&s| blocks.iter().rposition(|b| b.stage == s))
            .map(|i| format!("_blocks.{i}"))
            .collect()
    }
}

/// Where a tap sits in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TapPosition {
    /// After the stem (`_conv_stem`, `_bn0`, ReLU6).
    Stem,
    /// After the block with this index.
    Block(usize),
}

/// What a tap yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapInfo {
    /// Where the tap is.
    pub position: TapPosition,
    /// Its channel count.
    pub channels: usize,
    /// Its total stride relative to the input.
    pub stride: usize,
}

/// Parses `_bn0` (alias `stem`) or `_blocks.N`, without checking N against a model.
fn parse_tap(tap: &str) -> Option<TapPosition> {
    match tap {
        "_bn0" | "stem" => Some(TapPosition::Stem),
        _ => {
            let n = tap.strip_prefix("_blocks.")?;
            if n.is_empty()
                || !n.bytes().all(|c| c.is_ascii_digit())
                || (n.len() > 1 && n.starts_with('0'))
            {
                return None;
            }
            n.parse().ok().map(TapPosition::Block)
        }
    }
}

/// A convolution with its batch norm folded in: `y = act(conv(x, W') + b')` where
/// `W' = W · γ / √(σ² + ε)` and `b' = β − μ · γ / √(σ² + ε)` per output channel.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    kind: ConvKind,
    stride: usize,
    relu6: bool,
}

/// The flavour of a [`ConvBn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// A dense k × k convolution.
    Dense,
    /// A 1 × 1 convolution.
    Pointwise,
    /// A depthwise k × k convolution.
    Depthwise,
}

impl ConvBn {
    /// Loads `{conv}.weight` and the batch norm `{bn}.*` and folds them.
    #[allow(clippy::too_many_arguments)]
    fn load(
        w: &mut Weights<'_>,
        conv: &str,
        bn: &str,
        kind: ConvKind,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        relu6: bool,
        eps: f64,
    ) -> Result<Self> {
        let per_group_in = if kind == ConvKind::Depthwise { 1 } else { c_in };
        let (weight, bias) = w.conv_bn(conv, bn, &[c_out, per_group_in, k, k], eps)?;
        let weight = match kind {
            ConvKind::Pointwise => weight.reshape((c_out, c_in))?,
            _ => weight,
        };
        Ok(Self {
            weight,
            bias,
            kind,
            stride,
            relu6,
        })
    }

    /// Runs the convolution, folded batch norm and optional ReLU6.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.kind {
            ConvKind::Dense => {
                ops::conv2d_same(x, &self.weight, &self.bias, self.stride, self.relu6)
            }
            ConvKind::Pointwise => ops::pointwise_conv2d(x, &self.weight, &self.bias, self.relu6),
            ConvKind::Depthwise => {
                ops::depthwise_conv2d(x, &self.weight, &self.bias, self.stride, self.relu6)
            }
        }
    }
}

impl candle_nn::Module for ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ConvBn::forward(self, x)
    }
}

/// One MBConv block (inverted residual without squeeze-excitation).
#[derive(Debug, Clone)]
pub struct MBConvBlock {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

impl MBConvBlock {
    fn load(w: &mut Weights<'_>, index: usize, cfg: &BlockConfig, eps: f64) -> Result<Self> {
        let p = format!("_blocks.{index}");
        let mid = cfg.expanded_filters();
        let expand = if cfg.expand_ratio != 1 {
            Some(ConvBn::load(
                w,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                ConvKind::Pointwise,
                cfg.input_filters,
                mid,
                1,
                1,
                true,
                eps,
            )?)
        } else {
            None
        };
        let depthwise = ConvBn::load(
            w,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            ConvKind::Depthwise,
            mid,
            mid,
            cfg.kernel_size,
            cfg.stride,
            true,
            eps,
        )?;
        let project = ConvBn::load(
            w,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            ConvKind::Pointwise,
            mid,
            cfg.output_filters,
            1,
            1,
            false,
            eps,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            skip: cfg.has_skip(),
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        let h = self.depthwise.forward(&h)?;
        let h = self.project.forward(&h)?;
        if self.skip {
            h + x
        } else {
            Ok(h)
        }
    }
}

impl candle_nn::Module for MBConvBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        MBConvBlock::forward(self, x)
    }
}

/// EfficientNet-Lite truncated after its deepest requested tap.
///
/// Only the stem and the blocks up to the deepest tap are built, and only their weights are
/// required from the checkpoint.
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    config: EfficientNetLiteConfig,
    stem: ConvBn,
    blocks: Vec<MBConvBlock>,
    taps: Vec<String>,
    tap_infos: Vec<TapInfo>,
}

impl EfficientNetLite {
    /// Builds the model from a state dict (`key → tensor`, keys as in the PyTorch model).
    ///
    /// `path` only names the checkpoint in errors. The weights end up on `device`.
    ///
    /// # Errors
    ///
    /// [`BackboneError::NoTaps`], [`BackboneError::DuplicateTap`] and
    /// [`BackboneError::UnknownTap`] for bad taps; [`BackboneError::MissingWeight`] and
    /// [`BackboneError::ShapeMismatch`] for weights that do not fit the architecture.
    pub fn from_state_dict(
        config: EfficientNetLiteConfig,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        taps: &[String],
        device: &Device,
    ) -> Result<Self> {
        let tap_infos = resolve_taps(&config, taps)?;
        let deepest = tap_infos
            .iter()
            .map(|t| t.position)
            .max()
            .ok_or(BackboneError::NoTaps)?;
        let eps = config.batch_norm_epsilon;
        let mut w = Weights {
            path,
            tensors,
            device,
        };
        let stem = ConvBn::load(
            &mut w,
            "_conv_stem",
            "_bn0",
            ConvKind::Dense,
            3,
            config.stem_channels,
            3,
            2,
            true,
            eps,
        )?;
        let n_blocks = match deepest {
            TapPosition::Stem => 0,
            TapPosition::Block(i) => i + 1,
        };
        let blocks = config
            .blocks()
            .iter()
            .take(n_blocks)
            .enumerate()
            .map(|(i, b)| MBConvBlock::load(&mut w, i, b, eps))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            stem,
            blocks,
            taps: taps.to_vec(),
            tap_infos,
        })
    }

    /// Reads a checkpoint with [`crate::pth::read_state_dict`] and builds the model from it.
    ///
    /// # Errors
    ///
    /// Any error of [`crate::pth::read_state_dict`] or [`EfficientNetLite::from_state_dict`].
    pub fn load(arch: Arch, weights: &Path, taps: &[String], device: &Device) -> Result<Self> {
        // Tap errors are reported before the (slower) checkpoint read.
        let config =
            EfficientNetLiteConfig::for_arch(arch).ok_or_else(|| BackboneError::UnknownArch {
                name: arch.to_string(),
                valid: Arch::EFFICIENTNET_LITE
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
            })?;
        resolve_taps(&config, taps)?;
        let tensors = crate::pth::read_state_dict(weights, &Device::Cpu)?
            .into_iter()
            .collect();
        Self::from_state_dict(config, tensors, weights, taps, device)
    }

    /// The configuration.
    pub fn config(&self) -> &EfficientNetLiteConfig {
        &self.config
    }

    /// How many MBConv blocks were built (the index of the deepest tapped block plus one).
    pub fn num_blocks_built(&self) -> usize {
        self.blocks.len()
    }

    /// Runs the network up to the deepest tap and returns the taps in the requested order.
    ///
    /// # Errors
    ///
    /// [`BackboneError::InvalidInput`] unless `x` is a (B, 3, H, W) f32 tensor with positive
    /// sizes, and [`BackboneError::Candle`] if a computation fails.
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
            let per_image = self.peak_activation_elems(dims[2], dims[3]) * 4;
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

    /// The largest activation of one image (in elements) among the layers that are run.
    fn peak_activation_elems(&self, h: usize, w: usize) -> usize {
        let (mut h, mut w) = (h.div_ceil(2), w.div_ceil(2));
        let mut peak = self.config.stem_channels * h * w;
        for b in self.config.blocks().iter().take(self.blocks.len()) {
            peak = peak.max(b.expanded_filters() * h * w);
            h = h.div_ceil(b.stride);
            w = w.div_ceil(b.stride);
            peak = peak.max(b.expanded_filters().max(b.output_filters) * h * w);
        }
        peak
    }

    /// Runs one (sub-)batch through the network.
    fn forward_chunk(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outputs: Vec<Option<Tensor>> = vec![None; self.tap_infos.len()];
        let mut store = |pos: TapPosition, t: &Tensor| {
            for (slot, info) in outputs.iter_mut().zip(&self.tap_infos) {
                if info.position == pos {
                    *slot = Some(t.clone());
                }
            }
        };
        let mut h = self.stem.forward(x)?;
        store(TapPosition::Stem, &h);
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            store(TapPosition::Block(i), &h);
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

/// On the CPU, a batch is split into sub-batches whose largest activation stays below this many
/// bytes. Larger buffers are served by the allocator as fresh pages from the kernel, and the
/// page faults on first touch then cost more than batching gains (the convolutions already
/// parallelise within one image).
const CPU_CHUNK_BYTES: usize = 16 << 20;

/// Validates the requested taps against a configuration.
fn resolve_taps(config: &EfficientNetLiteConfig, taps: &[String]) -> Result<Vec<TapInfo>> {
    if taps.is_empty() {
        return Err(BackboneError::NoTaps);
    }
    let mut infos: Vec<TapInfo> = Vec::with_capacity(taps.len());
    for tap in taps {
        let info = config
            .tap_info(tap)
            .ok_or_else(|| BackboneError::UnknownTap {
                tap: tap.clone(),
                arch: config.arch,
                valid: config.tap_names(),
            })?;
        if infos.iter().any(|i| i.position == info.position) {
            return Err(BackboneError::DuplicateTap(tap.clone()));
        }
        infos.push(info);
    }
    Ok(infos)
}

impl FeatureExtractor for EfficientNetLite {
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
    fn lite0_blocks_match_the_reference() {
        let cfg = EfficientNetLiteConfig::lite0();
        let blocks = cfg.blocks();
        assert_eq!(blocks.len(), 16);
        assert_eq!(blocks[0].input_filters, 32);
        assert_eq!(blocks[0].output_filters, 16);
        assert_eq!(blocks[0].expand_ratio, 1);
        assert_eq!(blocks[4].output_filters, 40);
        assert_eq!(blocks[10].output_filters, 112);
        assert_eq!(blocks[15].output_filters, 320);
        assert_eq!(cfg.tap_info("_blocks.4").map(|t| t.stride), Some(8));
        assert_eq!(cfg.tap_info("_blocks.10").map(|t| t.stride), Some(16));
        assert_eq!(cfg.tap_info("_blocks.15").map(|t| t.stride), Some(32));
        assert_eq!(
            cfg.tap_info("_bn0").map(|t| (t.channels, t.stride)),
            Some((32, 2))
        );
        assert_eq!(cfg.tap_info("_blocks.16"), None);
        assert_eq!(cfg.tap_info("_blocks.04"), None);
        assert_eq!(cfg.default_taps(), vec!["_blocks.4", "_blocks.10"]);
    }

    #[test]
    fn scaled_presets_follow_round_filters_and_round_repeats() {
        // Lite4: width 1.4, depth 1.8; stage repeats 1, 4, 4, 6, 6, 8, 1.
        let cfg = EfficientNetLiteConfig::lite4();
        let blocks = cfg.blocks();
        assert_eq!(blocks.len(), 1 + 4 + 4 + 6 + 6 + 8 + 1);
        assert_eq!(blocks[0].input_filters, 32);
        assert_eq!(blocks[0].output_filters, 24);
        assert_eq!(blocks.last().map(|b| b.output_filters), Some(448));
        assert_eq!(round_filters(40, 1.4, 8), 56);
        assert_eq!(round_filters(112, 1.1, 8), 120);
        assert_eq!(round_filters(16, 1.1, 8), 16);
        assert_eq!(round_repeats(3, 1.1), 4);
        // Lite2: width 1.1, depth 1.2.
        let lite2 = EfficientNetLiteConfig::lite2().blocks();
        assert_eq!(lite2.len(), 1 + 3 + 3 + 4 + 4 + 5 + 1);
    }
}
