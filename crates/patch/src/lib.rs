//! Patch embedding for PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
//! <https://arxiv.org/abs/2106.08265>).
//!
//! Each position of the first (shallowest) feature map becomes one patch embedding: the 3×3 neighbourhood of every
//! tapped layer is unfolded, deeper layers are aligned to the first layer's patch grid by bilinear interpolation,
//! each layer's unfolded values are pooled to the *pretrain dimension*, and the stacked layers are pooled once more
//! to the *target dimension*. Patch scores are folded back into per-image grids, and the image score is their
//! maximum.
//!
//! ## Design
//!
//! The crate works on plain [`ndarray`] arrays so that it knows nothing about the deep-learning framework that
//! produced the feature maps. Everything follows the original implementation (patchcore-inspection's
//! `PatchMaker`, `MeanMapper`, `Preprocessing` and `Aggregator`) numerically:
//!
//! * Unfolding equals `torch.nn.Unfold(kernel_size=p, stride=s, padding=(p-1)/2)`; a patch's values are ordered
//!   channel-major, then kernel row, then kernel column.
//! * Pooling equals `torch.nn.functional.adaptive_avg_pool1d`: bin `i` of `n` over `L` values spans
//!   `floor(i·L/n) .. ceil((i+1)·L/n)` and is summed in order, then divided by its length.
//! * Alignment equals `F.interpolate(mode="bilinear", align_corners=False)` on the unfolded patches. Pooling acts on
//!   the feature axis and interpolation on the spatial axes; both are linear, so they commute, and this crate pools
//!   each deeper layer *before* interpolating it. The result is the same up to float rounding (the parity tests
//!   hold it within 1e-4 of the original) while interpolating `pretrain_dim` instead of `C·p²` values per position.
//!
//! Rows are image-major, then row-major over the patch grid, as in the original.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

use ndarray::{Array2, Array3, ArrayView2, ArrayView4, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Errors of patch embedding and score folding.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// A configuration value is out of its valid range.
    #[error("invalid {parameter} = {value}: expected {expected}")]
    InvalidParameter {
        /// The parameter's name as it appears in the configuration.
        parameter: &'static str,
        /// The value that was given.
        value: String,
        /// What would have been valid.
        expected: &'static str,
    },
    /// No feature maps were given.
    #[error("no feature maps given: at least one tapped layer is needed")]
    NoLayers,
    /// Feature maps of one call disagree on the batch size.
    #[error("feature map {layer} has batch size {got}, but the first map has {expected}")]
    BatchMismatch {
        /// Index of the offending layer.
        layer: usize,
        /// Batch size of the first layer.
        expected: usize,
        /// Batch size of the offending layer.
        got: usize,
    },
    /// A feature map is empty (zero channels, height or width) or has a zero batch.
    #[error("feature map {layer} has an empty shape {shape:?}")]
    EmptyMap {
        /// Index of the offending layer.
        layer: usize,
        /// Its shape (B, C, H, W).
        shape: [usize; 4],
    },
    /// A score vector does not divide into whole images.
    #[error("{len} patch scores do not split into {batch} images")]
    ScoresDoNotSplit {
        /// Number of scores.
        len: usize,
        /// Requested number of images.
        batch: usize,
    },
}

/// The original's `PatchMaker`: square patches of `size`×`size` positions taken every `stride` positions, with
/// zero padding `(size - 1) / 2` on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchMaker {
    /// Side length of a patch in feature-map positions (the original's `patchsize`, default 3).
    pub size: usize,
    /// Step between patches (the original's `patchstride`, default 1).
    pub stride: usize,
}

impl PatchMaker {
    /// The original's defaults: 3×3 patches, stride 1.
    pub const fn inspection() -> Self {
        Self { size: 3, stride: 1 }
    }

    /// Zero padding on each side, `(size - 1) / 2` as the original computes it.
    pub fn padding(&self) -> usize {
        (self.size.saturating_sub(1)) / 2
    }

    /// The patch grid of a `height`×`width` map: `(s + 2·pad − (size − 1) − 1) / stride + 1` per axis.
    ///
    /// # Errors
    /// When the map is smaller than a patch even with padding.
    pub fn grid(&self, height: usize, width: usize) -> Result<(usize, usize), PatchError> {
        self.validate()?;
        let pad = self.padding();
        let axis = |s: usize| -> Result<usize, PatchError> {
            let span = s + 2 * pad;
            if span < self.size {
                return Err(PatchError::InvalidParameter {
                    parameter: "patch size",
                    value: format!("{} for a map of {s} positions", self.size),
                    expected: "a patch no larger than the padded feature map",
                });
            }
            Ok((span - self.size) / self.stride + 1)
        };
        Ok((axis(height)?, axis(width)?))
    }

    /// Checks that size and stride are at least 1.
    ///
    /// # Errors
    /// [`PatchError::InvalidParameter`] naming `patch size` or `patch stride`.
    pub fn validate(&self) -> Result<(), PatchError> {
        if self.size == 0 {
            return Err(PatchError::InvalidParameter {
                parameter: "patch size",
                value: self.size.to_string(),
                expected: "at least 1",
            });
        }
        if self.stride == 0 {
            return Err(PatchError::InvalidParameter {
                parameter: "patch stride",
                value: self.stride.to_string(),
                expected: "at least 1",
            });
        }
        Ok(())
    }

    /// Unfolds one image's map (C, H, W) into rows of `C·size²` values, row-major over the patch grid, exactly as
    /// `torch.nn.Unfold` followed by the original's reshape and permute.
    ///
    /// # Errors
    /// When the map is smaller than a patch.
    pub fn unfold(&self, map: ndarray::ArrayView3<'_, f32>) -> Result<Array2<f32>, PatchError> {
        let (c, h, w) = map.dim();
        let (gh, gw) = self.grid(h, w)?;
        let p = self.size;
        let mut out = Array2::<f32>::zeros((gh * gw, c * p * p));
        for (row, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
            let (gy, gx) = (row / gw, row % gw);
            for ch in 0..c {
                for ky in 0..p {
                    for kx in 0..p {
                        if let Some((y, x)) = self.source(gy, gx, ky, kx, h, w) {
                            dst[ch * p * p + ky * p + kx] = map[[ch, y, x]];
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The map position that kernel offset (`ky`, `kx`) of patch (`gy`, `gx`) reads, or `None` in the padding.
    #[inline]
    fn source(
        &self,
        gy: usize,
        gx: usize,
        ky: usize,
        kx: usize,
        h: usize,
        w: usize,
    ) -> Option<(usize, usize)> {
        let pad = self.padding();
        let y = (gy * self.stride + ky).checked_sub(pad)?;
        let x = (gx * self.stride + kx).checked_sub(pad)?;
        (y < h && x < w).then_some((y, x))
    }
}

/// Bin boundaries of `torch.nn.functional.adaptive_avg_pool1d` from `len` inputs to `out` outputs: bin `i` spans
/// `floor(i·len/out) .. ceil((i+1)·len/out)`.
pub fn adaptive_pool_bins(len: usize, out: usize) -> Vec<(usize, usize)> {
    (0..out)
        .map(|i| {
            let start = (i * len) / out;
            let end = ((i + 1) * len).div_ceil(out);
            (start, end)
        })
        .collect()
}

/// `adaptive_avg_pool1d` of one vector: each bin summed in order in f32, then divided by its length.
pub fn adaptive_avg_pool1d(values: &[f32], bins: &[(usize, usize)], out: &mut [f32]) {
    for (o, &(start, end)) in out.iter_mut().zip(bins) {
        let mut sum = 0.0f32;
        for v in &values[start..end] {
            sum += v;
        }
        *o = sum / (end - start) as f32;
    }
}

/// Settings of the patch embedding: the original's `patchsize`, `patchstride`, `pretrain_embed_dimension` and
/// `target_embed_dimension`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    /// How patches are cut from every tapped layer.
    pub patch: PatchMaker,
    /// Per-layer pooled dimension (the original's `pretrain_embed_dimension`, default 1024).
    pub pretrain_dim: usize,
    /// Final embedding dimension (the original's `target_embed_dimension`, default 1024).
    pub target_dim: usize,
}

impl EmbedConfig {
    /// The original's defaults: 3×3 patches, stride 1, 1024 → 1024.
    pub const fn inspection() -> Self {
        Self {
            patch: PatchMaker::inspection(),
            pretrain_dim: 1024,
            target_dim: 1024,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`PatchError::InvalidParameter`] naming the first bad field.
    pub fn validate(&self) -> Result<(), PatchError> {
        self.patch.validate()?;
        if self.pretrain_dim == 0 {
            return Err(PatchError::InvalidParameter {
                parameter: "pretrain_dim",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        if self.target_dim == 0 {
            return Err(PatchError::InvalidParameter {
                parameter: "target_dim",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

/// Patch embeddings of a batch: one row per patch, image-major, row-major over the patch grid.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchEmbeddings {
    /// Shape (batch · grid.0 · grid.1, target_dim).
    pub rows: Array2<f32>,
    /// Number of images.
    pub batch: usize,
    /// Patch grid (height, width) of the first tapped layer, shared by all layers after alignment.
    pub grid: (usize, usize),
}

/// Turns the feature maps of tapped layers into patch embeddings (the original's `PatchCore._embed`).
#[derive(Clone, Debug)]
pub struct Embedder {
    config: EmbedConfig,
}

impl Embedder {
    /// Builds an embedder after validating the configuration.
    ///
    /// # Errors
    /// [`PatchError::InvalidParameter`] for a zero size, stride or dimension.
    pub fn new(config: EmbedConfig) -> Result<Self, PatchError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EmbedConfig {
        &self.config
    }

    /// Embeds a batch. `layers[i]` is layer `i`'s feature map (B, C_i, H_i, W_i); layer 0 sets the patch grid.
    ///
    /// # Errors
    /// No layers, inconsistent batch sizes, empty maps, or maps smaller than a patch.
    pub fn embed(&self, layers: &[ArrayView4<'_, f32>]) -> Result<PatchEmbeddings, PatchError> {
        let first = layers.first().ok_or(PatchError::NoLayers)?;
        let batch = first.dim().0;
        for (i, l) in layers.iter().enumerate() {
            let (b, c, h, w) = l.dim();
            if b != batch {
                return Err(PatchError::BatchMismatch {
                    layer: i,
                    expected: batch,
                    got: b,
                });
            }
            if b == 0 || c == 0 || h == 0 || w == 0 {
                return Err(PatchError::EmptyMap {
                    layer: i,
                    shape: [b, c, h, w],
                });
            }
        }
        let patch = self.config.patch;
        let pre = self.config.pretrain_dim;
        let (h0, w0) = patch.grid(first.dim().2, first.dim().3)?;
        let per_image = h0 * w0;

        // Pool every layer on its own patch grid: (B, gh, gw, pretrain_dim).
        // Layers on the first layer's grid are pooled straight into each row; deeper layers are pooled on their own
        // (coarser) grid first and then interpolated.
        let padded: Vec<PaddedLayer> = layers
            .iter()
            .map(|l| PaddedLayer::new(l, patch, pre))
            .collect::<Result<_, _>>()?;
        let pooled: Vec<Option<Array3<f32>>> = padded
            .iter()
            .map(|l| ((l.gh, l.gw) != (h0, w0)).then(|| l.pool_all()))
            .collect();

        let stacked_len = pre * layers.len();
        let agg = PoolPlan::new((0..stacked_len).collect(), self.config.target_dim);
        let mut rows = Array2::<f32>::zeros((batch * per_image, self.config.target_dim));
        rows.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each_init(
                || vec![0.0f32; stacked_len],
                |stacked, (row, mut dst)| {
                    let (b, pos) = (row / per_image, row % per_image);
                    let (y, x) = (pos / w0, pos % w0);
                    for (li, (layer, grid)) in padded.iter().zip(&pooled).enumerate() {
                        let out = &mut stacked[li * pre..(li + 1) * pre];
                        match grid {
                            None => layer.pool_at(b, y, x, out),
                            Some(grid) => {
                                let image = grid.index_axis(Axis(0), b);
                                let image = image.as_slice().expect("pooled grids are contiguous");
                                bilinear_sample(
                                    image,
                                    (layer.gh, layer.gw),
                                    pre,
                                    (h0, w0),
                                    (y, x),
                                    out,
                                );
                            }
                        }
                    }
                    let dst = dst.as_slice_mut().expect("embedding rows are contiguous");
                    agg.apply(stacked, dst);
                },
            );
        Ok(PatchEmbeddings {
            rows,
            batch,
            grid: (h0, w0),
        })
    }
}

/// `adaptive_avg_pool1d` over values gathered from a buffer, planned once and applied to many vectors.
///
/// Input value `u` of the pooled vector is read at `base + offsets[u]`. Bins of one or two values, the only
/// kinds that occur when the output is at least half as long as the input (every PatchCore default), are
/// evaluated without a loop; the arithmetic is that of [`adaptive_avg_pool1d`] to the bit: `0 + a` for one value
/// (division by 1 is exact), and `(0 + a) + b` halved for two (halving by multiplication is exact as well).
#[derive(Clone, Debug)]
struct PoolPlan {
    /// Per output: the offset of its first value, of its second value (equal to the first for a bin of one
    /// value), and the bin's length.
    bins: Vec<(usize, usize, usize)>,
    /// The offsets of every value of every bin, for bins longer than two (indexed by the bin's first value).
    offsets: Vec<usize>,
    /// The first value of each bin, for bins longer than two.
    starts: Vec<usize>,
    /// Whether every bin holds one or two values.
    short: bool,
}

impl PoolPlan {
    /// Plans pooling `offsets.len()` gathered values to `out` outputs.
    fn new(offsets: Vec<usize>, out: usize) -> Self {
        let ranges = adaptive_pool_bins(offsets.len(), out);
        let bins = ranges
            .iter()
            .map(|&(start, end)| {
                let second = if end - start >= 2 { start + 1 } else { start };
                (offsets[start], offsets[second], end - start)
            })
            .collect();
        let starts = ranges.iter().map(|&(start, _)| start).collect();
        let short = ranges.iter().all(|&(start, end)| end - start <= 2);
        Self {
            short,
            bins,
            offsets,
            starts,
        }
    }

    /// Pools the values at `src[offsets[u]]` into `dst`.
    #[inline]
    fn apply(&self, src: &[f32], dst: &mut [f32]) {
        if self.short {
            // Both candidate results are computed and one is selected, so that the irregular pattern of bin
            // lengths costs no mispredicted branches.
            for (o, &(a, b, len)) in dst.iter_mut().zip(&self.bins) {
                let one = 0.0 + src[a];
                let two = (one + src[b]) * 0.5;
                *o = if len == 2 { two } else { one };
            }
            return;
        }
        for (o, (&(a, b, len), &start)) in dst.iter_mut().zip(self.bins.iter().zip(&self.starts)) {
            *o = match len {
                1 => 0.0 + src[a],
                2 => ((0.0 + src[a]) + src[b]) * 0.5,
                _ => {
                    let mut sum = 0.0f32;
                    for &off in &self.offsets[start..start + len] {
                        sum += src[off];
                    }
                    sum / len as f32
                }
            };
        }
    }
}

/// One layer's maps copied into zero-padded planes, ready to be unfolded and pooled at any patch position.
///
/// Unfolding and pooling are fused: every pooled value is summed straight from the padded planes through a
/// [`PoolPlan`] of offsets, in the order in which the unfolded vector would be summed, so the result is bit-for-bit
/// that of unfolding first and pooling afterwards, without the unfolded vectors ever being stored.
struct PaddedLayer {
    /// (B, C, ph, pw), the map at (pad, pad) inside each plane, zeros around it.
    data: Vec<f32>,
    /// Values per padded image, C·ph·pw.
    per_image: usize,
    /// Padded plane width.
    pw: usize,
    /// Patch stride.
    stride: usize,
    /// Patch grid (height, width).
    gh: usize,
    gw: usize,
    /// Pooling from the unfolded patch to the pretrain dimension.
    plan: PoolPlan,
    /// Pretrain dimension.
    pre: usize,
}

impl PaddedLayer {
    fn new(layer: &ArrayView4<'_, f32>, patch: PatchMaker, pre: usize) -> Result<Self, PatchError> {
        let (b, c, h, w) = layer.dim();
        let (gh, gw) = patch.grid(h, w)?;
        let p = patch.size;
        let s = patch.stride;
        let pad = patch.padding();
        // The padded plane must hold every position a patch reads: the last patch starts at (g − 1)·s − pad and
        // is p positions wide, which may reach beyond the map's far border (always inside the padding).
        let ph = ((gh - 1) * s + p).max(h + pad);
        let pw = ((gw - 1) * s + p).max(w + pad);
        // Value `u` of a patch's unfolded vector (channel-major, then kernel row, then kernel column) lies at this
        // offset in the padded image, relative to the patch's top-left corner.
        let offsets: Vec<usize> = (0..c * p * p)
            .map(|u| {
                let (ch, ky, kx) = (u / (p * p), (u / p) % p, u % p);
                (ch * ph + ky) * pw + kx
            })
            .collect();
        let plan = PoolPlan::new(offsets, pre);
        let contiguous = layer.as_standard_layout();
        let src = contiguous
            .as_slice()
            .expect("standard-layout arrays are contiguous");
        let per_image = c * ph * pw;
        let mut data = vec![0f32; b * per_image];
        data.par_chunks_mut(per_image)
            .zip(src.par_chunks(c * h * w))
            .for_each(|(dst, image)| {
                for (ch, plane) in image.chunks_exact(h * w).enumerate() {
                    for (y, row) in plane.chunks_exact(w).enumerate() {
                        let at = (ch * ph + y + pad) * pw + pad;
                        dst[at..at + w].copy_from_slice(row);
                    }
                }
            });
        Ok(Self {
            data,
            per_image,
            pw,
            stride: s,
            gh,
            gw,
            plan,
            pre,
        })
    }

    /// The pooled patch of image `b` at grid position (`gy`, `gx`).
    #[inline]
    fn pool_at(&self, b: usize, gy: usize, gx: usize, out: &mut [f32]) {
        let image = &self.data[b * self.per_image..(b + 1) * self.per_image];
        self.plan
            .apply(&image[gy * self.stride * self.pw + gx * self.stride..], out);
    }

    /// Every pooled patch, (B, gh·gw, pretrain_dim).
    fn pool_all(&self) -> Array3<f32> {
        let b = self.data.len() / self.per_image.max(1);
        let per_image = self.gh * self.gw;
        let mut out = Array3::<f32>::zeros((b, per_image, self.pre));
        out.as_slice_mut()
            .expect("fresh arrays are contiguous")
            .par_chunks_mut(self.pre)
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, pos) = (row / per_image, row % per_image);
                self.pool_at(bi, pos / self.gw, pos % self.gw, dst);
            });
        out
    }
}

/// Source index and weights of PyTorch's `upsample_bilinear2d` (align_corners=False) along one axis.
#[inline]
pub fn bilinear_source(dst: usize, in_len: usize, out_len: usize) -> (usize, usize, f32, f32) {
    let scale = in_len as f32 / out_len as f32;
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(in_len - 1);
    let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    let l0 = 1.0 - l1;
    (i0, i1, l0, l1)
}

/// Bilinearly samples position (`y`, `x`) of an `out` grid from a (gh·gw, dim) grid of vectors.
fn bilinear_sample(
    grid: &[f32],
    (gh, gw): (usize, usize),
    dim: usize,
    (oh, ow): (usize, usize),
    (y, x): (usize, usize),
    out: &mut [f32],
) {
    let (y0, y1, ly0, ly1) = bilinear_source(y, gh, oh);
    let (x0, x1, lx0, lx1) = bilinear_source(x, gw, ow);
    let at = |yy: usize, xx: usize| &grid[(yy * gw + xx) * dim..(yy * gw + xx + 1) * dim];
    let (a, b, c, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
    for i in 0..dim {
        out[i] = ly0 * (lx0 * a[i] + lx1 * b[i]) + ly1 * (lx0 * c[i] + lx1 * d[i]);
    }
}

/// Folds a flat vector of per-patch scores (image-major) into a (batch, patches per image) array: the original's
/// `PatchMaker.unpatch_scores`.
///
/// # Errors
/// [`PatchError::ScoresDoNotSplit`] when the length is not a multiple of `batch`.
pub fn unpatch_scores(scores: &[f32], batch: usize) -> Result<Array2<f32>, PatchError> {
    if batch == 0 || scores.len() % batch != 0 {
        return Err(PatchError::ScoresDoNotSplit {
            len: scores.len(),
            batch,
        });
    }
    Array2::from_shape_vec((batch, scores.len() / batch), scores.to_vec()).map_err(|_| {
        PatchError::ScoresDoNotSplit {
            len: scores.len(),
            batch,
        }
    })
}

/// The image score of each row: the maximum over its patches (the original's `PatchMaker.score`). NaN scores are
/// never produced by this crate; a row containing NaN yields NaN.
pub fn image_scores(patch_scores: ArrayView2<'_, f32>) -> Vec<f32> {
    patch_scores
        .axis_iter(Axis(0))
        .map(|row| {
            row.iter().fold(f32::NEG_INFINITY, |m, &v| {
                if v.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(v)
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Array4};

    #[test]
    fn bins_match_pytorch_formula() {
        // adaptive_avg_pool1d(L=5, n=3): [0,2), [1,4), [3,5).
        assert_eq!(adaptive_pool_bins(5, 3), vec![(0, 2), (1, 4), (3, 5)]);
        // Upsampling 2 → 4 repeats each value twice.
        assert_eq!(
            adaptive_pool_bins(2, 4),
            vec![(0, 1), (0, 1), (1, 2), (1, 2)]
        );
        // 2048 → 1024 averages pairs.
        let b = adaptive_pool_bins(2048, 1024);
        assert_eq!(b[0], (0, 2));
        assert_eq!(b[1023], (2046, 2048));
    }

    #[test]
    fn unfold_hand_checked() {
        // One channel, 2×2 map [[1,2],[3,4]], 3×3 patches with zero padding 1.
        let map = Array::from_shape_vec((1, 2, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let rows = PatchMaker::inspection().unfold(map.view()).unwrap();
        assert_eq!(rows.dim(), (4, 9));
        assert_eq!(
            rows.row(0).to_vec(),
            vec![0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]
        );
        assert_eq!(
            rows.row(3).to_vec(),
            vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn embed_single_layer_is_pooled_unfold() {
        let map = Array4::from_shape_fn((1, 2, 3, 3), |(_, c, y, x)| (c * 9 + y * 3 + x) as f32);
        let cfg = EmbedConfig {
            patch: PatchMaker::inspection(),
            pretrain_dim: 6,
            target_dim: 3,
        };
        let emb = Embedder::new(cfg).unwrap().embed(&[map.view()]).unwrap();
        assert_eq!(emb.grid, (3, 3));
        let unfolded = cfg.patch.unfold(map.index_axis(Axis(0), 0)).unwrap();
        // 18 values → 6 bins of 3 → 3 bins of 2: each output is the mean of 6 consecutive values.
        for (r, row) in unfolded.axis_iter(Axis(0)).enumerate() {
            for j in 0..3 {
                let want: f32 = row.iter().skip(6 * j).take(6).sum::<f32>() / 6.0;
                assert!((emb.rows[[r, j]] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn fused_pooling_is_bitwise_unfold_then_pool() {
        // Values with awkward bits, negative zeros among them, and every kind of bin: pooling down (long bins),
        // to the same length, and up (bins of one and two values).
        let map = Array4::from_shape_fn((2, 3, 5, 6), |(b, c, y, x)| {
            let i = ((b * 3 + c) * 5 + y) * 6 + x;
            if i % 7 == 0 {
                -0.0
            } else {
                ((i as f32) * 0.7311).sin() * 3.3
            }
        });
        for patch in [PatchMaker::inspection(), PatchMaker { size: 2, stride: 2 }] {
            for (pre, target) in [(4, 3), (7, 7), (27, 40), (54, 20), (100, 100), (100, 250)] {
                let cfg = EmbedConfig {
                    patch,
                    pretrain_dim: pre,
                    target_dim: target,
                };
                let emb = Embedder::new(cfg).unwrap().embed(&[map.view()]).unwrap();
                let mut row = 0;
                for b in 0..2 {
                    let unfolded = patch.unfold(map.index_axis(Axis(0), b)).unwrap();
                    let pre_bins = adaptive_pool_bins(unfolded.dim().1, pre);
                    let agg_bins = adaptive_pool_bins(pre, target);
                    for u in unfolded.axis_iter(Axis(0)) {
                        let mut pooled = vec![0.0; pre];
                        adaptive_avg_pool1d(u.as_slice().unwrap(), &pre_bins, &mut pooled);
                        let mut want = vec![0.0; target];
                        adaptive_avg_pool1d(&pooled, &agg_bins, &mut want);
                        let got: Vec<u32> = emb.rows.row(row).iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{patch:?}, {pre} → {target}, row {row}");
                        row += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn bilinear_identity_and_upsampling() {
        // Same size is the identity.
        for d in 0..5 {
            let (i0, _, l0, l1) = bilinear_source(d, 5, 5);
            assert_eq!((i0, l0, l1), (d, 1.0, 0.0));
        }
        // 2 → 4 (align_corners=False): positions -0.25 (clamped to 0), 0.25, 0.75, 1.25.
        assert_eq!(bilinear_source(0, 2, 4), (0, 1, 1.0, 0.0));
        assert_eq!(bilinear_source(1, 2, 4), (0, 1, 0.75, 0.25));
        assert_eq!(bilinear_source(3, 2, 4), (1, 1, 0.75, 0.25));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            Embedder::new(EmbedConfig {
                pretrain_dim: 0,
                ..EmbedConfig::inspection()
            })
            .unwrap_err(),
            PatchError::InvalidParameter {
                parameter: "pretrain_dim",
                value: "0".into(),
                expected: "at least 1"
            }
        );
        let e = Embedder::new(EmbedConfig::inspection()).unwrap();
        assert_eq!(e.embed(&[]).unwrap_err(), PatchError::NoLayers);
        let a = Array4::<f32>::zeros((2, 1, 4, 4));
        let b = Array4::<f32>::zeros((1, 1, 2, 2));
        assert!(matches!(
            e.embed(&[a.view(), b.view()]),
            Err(PatchError::BatchMismatch {
                layer: 1,
                expected: 2,
                got: 1
            })
        ));
        assert!(unpatch_scores(&[1.0, 2.0, 3.0], 2).is_err());
        assert_eq!(
            image_scores(unpatch_scores(&[1.0, 5.0, 3.0, 2.0], 2).unwrap().view()),
            vec![5.0, 3.0]
        );
    }
}
