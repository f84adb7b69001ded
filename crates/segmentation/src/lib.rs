//! Anomaly maps for PatchCore: the patch-score grid upsampled to the input size and smoothed with a Gaussian.
//!
//! ## Design
//!
//! The original implementation (patchcore-inspection's `RescaleSegmentor`) upsamples with
//! `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` and then calls
//! `scipy.ndimage.gaussian_filter(sigma=4)` on each float32 map. This crate reproduces both exactly:
//!
//! * [`Upsample::Bilinear`] follows PyTorch's CPU kernel: source coordinate `(dst + 0.5)·in/out − 0.5`, clamped at
//!   zero, the neighbour index clamped at the last row or column, weights computed in f32.
//! * [`GaussianBlur`] follows scipy: kernel radius `int(truncate·sigma + 0.5)`, weights `exp(−x²/(2σ²))`
//!   normalised to sum 1, one 1-D pass per axis (rows first, then columns), each pass accumulated in f64 and
//!   stored as f32 as scipy does for a float32 array, and the border rule of [`Border`].
//!
//! Other flavours (nearest-neighbour upsampling, PyTorch-style `reflect` or replicated borders) are named options,
//! never silent substitutions. The crate works on [`ndarray`] arrays and knows nothing of the backbone.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Errors of map construction.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SegmentationError {
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
    /// An input grid or requested output size is empty.
    #[error("empty {what}: shape {shape:?}")]
    Empty {
        /// Which array was empty.
        what: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// How the patch-score grid is brought to the output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Upsample {
    /// PyTorch `interpolate(mode="bilinear", align_corners=False)`: the original's choice.
    #[default]
    Bilinear,
    /// PyTorch `interpolate(mode="nearest")`: anomalib's choice.
    Nearest,
}

/// How the blur reads beyond the border.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Border {
    /// scipy.ndimage `mode="reflect"`: the edge sample is repeated, `d c b a | a b c d | d c b a`. The original's
    /// choice.
    #[default]
    ScipyReflect,
    /// PyTorch `padding_mode="reflect"` (scipy's `mirror`): the edge sample is not repeated, `d c b | a b c d | c b a`.
    TorchReflect,
    /// The edge sample repeated outwards, `a a a | a b c d | d d d`.
    Replicate,
}

impl Border {
    /// Maps any integer position onto `0..len` by this border rule.
    pub fn index(self, i: isize, len: usize) -> usize {
        let n = len as isize;
        if (0..n).contains(&i) {
            return i as usize;
        }
        match self {
            Border::Replicate => i.clamp(0, n - 1) as usize,
            Border::ScipyReflect => {
                let period = 2 * n;
                let m = i.rem_euclid(period);
                (if m >= n { period - 1 - m } else { m }) as usize
            }
            Border::TorchReflect => {
                if n == 1 {
                    return 0;
                }
                let period = 2 * (n - 1);
                let m = i.rem_euclid(period);
                (if m >= n { period - m } else { m }) as usize
            }
        }
    }
}

/// A separable Gaussian blur equal to `scipy.ndimage.gaussian_filter` on a float32 2-D array.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaussianBlur {
    /// Standard deviation in pixels (the original's `smoothing`, default 4). Zero disables the blur.
    pub sigma: f64,
    /// The kernel is cut at `truncate` standard deviations (scipy's default 4).
    pub truncate: f64,
    /// Border rule.
    pub border: Border,
}

impl GaussianBlur {
    /// The original's blur: σ = 4, truncate 4, scipy `reflect` borders.
    pub const fn inspection() -> Self {
        Self {
            sigma: 4.0,
            truncate: 4.0,
            border: Border::ScipyReflect,
        }
    }

    /// Checks that sigma and truncate are finite and non-negative.
    ///
    /// # Errors
    /// [`SegmentationError::InvalidParameter`] naming `sigma` or `truncate`.
    pub fn validate(&self) -> Result<(), SegmentationError> {
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(SegmentationError::InvalidParameter {
                parameter: "sigma",
                value: self.sigma.to_string(),
                expected: "a finite number >= 0",
            });
        }
        if !(self.truncate.is_finite() && self.truncate >= 0.0) {
            return Err(SegmentationError::InvalidParameter {
                parameter: "truncate",
                value: self.truncate.to_string(),
                expected: "a finite number >= 0",
            });
        }
        Ok(())
    }

    /// The normalised 1-D kernel, `2·radius + 1` taps, as scipy's `_gaussian_kernel1d` computes it.
    pub fn kernel(&self) -> Vec<f64> {
        if self.sigma == 0.0 {
            return vec![1.0];
        }
        let radius = (self.truncate * self.sigma + 0.5) as isize;
        let s2 = self.sigma * self.sigma;
        let w: Vec<f64> = (-radius..=radius)
            .map(|x| (-0.5 / s2 * (x * x) as f64).exp())
            .collect();
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|v| v / sum).collect()
    }

    /// Blurs one map.
    ///
    /// # Errors
    /// Invalid parameters, or an empty map.
    pub fn apply(&self, map: ArrayView2<'_, f32>) -> Result<Array2<f32>, SegmentationError> {
        self.validate()?;
        let (h, w) = map.dim();
        if h == 0 || w == 0 {
            return Err(SegmentationError::Empty {
                what: "map",
                shape: vec![h, w],
            });
        }
        let k = self.kernel();
        // scipy filters axis 0 first, then axis 1, storing each pass in the input's dtype (float32).
        let cols = self.pass(map, &k, Axis(0));
        Ok(self.pass(cols.view(), &k, Axis(1)))
    }

    /// One 1-D pass along `axis`, accumulated in f64 and stored as f32.
    ///
    /// Every output is computed exactly as scipy's symmetric-kernel loop does (centre first, then the pairs from
    /// the inside out, each pair summed before it is weighted), so the result is bit-for-bit scipy's. The loops
    /// are arranged so that the innermost one runs over contiguous outputs of a row and vectorises: along axis 0
    /// whole rows are combined, and along axis 1 each row is first extended by its border samples.
    fn pass(&self, map: ArrayView2<'_, f32>, k: &[f64], axis: Axis) -> Array2<f32> {
        let (h, w) = map.dim();
        let r = k.len() / 2;
        let border = self.border;
        let mut out = Array2::<f32>::zeros((h, w));
        let mut acc = vec![0f64; w];
        if axis == Axis(0) {
            let rows: Vec<Vec<f64>> = map
                .axis_iter(Axis(0))
                .map(|row| row.iter().map(|&v| f64::from(v)).collect())
                .collect();
            for (y, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
                for (a, &v) in acc.iter_mut().zip(&rows[y]) {
                    *a = v * k[r];
                }
                for j in 1..=r {
                    let below = &rows[border.index(y as isize + j as isize, h)];
                    let above = &rows[border.index(y as isize - j as isize, h)];
                    let kj = k[r + j];
                    for ((a, &p), &m) in acc.iter_mut().zip(below).zip(above) {
                        *a += (p + m) * kj;
                    }
                }
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = a as f32;
                }
            }
        } else {
            let mut extended = vec![0f64; w + 2 * r];
            for (src, mut dst) in map.axis_iter(Axis(0)).zip(out.axis_iter_mut(Axis(0))) {
                for (t, e) in extended.iter_mut().enumerate() {
                    *e = f64::from(src[border.index(t as isize - r as isize, w)]);
                }
                for (a, &v) in acc.iter_mut().zip(&extended[r..r + w]) {
                    *a = v * k[r];
                }
                for j in 1..=r {
                    let right = &extended[r + j..r + j + w];
                    let left = &extended[r - j..r - j + w];
                    let kj = k[r + j];
                    for ((a, &p), &m) in acc.iter_mut().zip(right).zip(left) {
                        *a += (p + m) * kj;
                    }
                }
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = a as f32;
                }
            }
        }
        out
    }
}

/// Upsamples one grid to (`out_h`, `out_w`).
///
/// # Errors
/// An empty input or output size.
pub fn upsample(
    grid: ArrayView2<'_, f32>,
    out_h: usize,
    out_w: usize,
    mode: Upsample,
) -> Result<Array2<f32>, SegmentationError> {
    let (h, w) = grid.dim();
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(SegmentationError::Empty {
            what: "grid or output size",
            shape: vec![h, w, out_h, out_w],
        });
    }
    let mut out = Array2::<f32>::zeros((out_h, out_w));
    match mode {
        Upsample::Bilinear => {
            let xs: Vec<_> = (0..out_w).map(|x| bilinear_source(x, w, out_w)).collect();
            let grid = grid.as_standard_layout();
            let g = grid
                .as_slice()
                .expect("standard-layout arrays are contiguous");
            for (y, mut dst) in out.axis_iter_mut(Axis(0)).enumerate() {
                let (y0, y1, ly0, ly1) = bilinear_source(y, h, out_h);
                let (r0, r1) = (&g[y0 * w..(y0 + 1) * w], &g[y1 * w..(y1 + 1) * w]);
                for (d, &(x0, x1, lx0, lx1)) in dst.iter_mut().zip(&xs) {
                    *d = ly0 * (lx0 * r0[x0] + lx1 * r0[x1]) + ly1 * (lx0 * r1[x0] + lx1 * r1[x1]);
                }
            }
        }
        Upsample::Nearest => {
            // PyTorch's legacy `nearest`: src = floor(dst · in / out), computed in f32.
            let sy = h as f32 / out_h as f32;
            let sx = w as f32 / out_w as f32;
            for y in 0..out_h {
                let iy = ((y as f32 * sy) as usize).min(h - 1);
                for x in 0..out_w {
                    let ix = ((x as f32 * sx) as usize).min(w - 1);
                    out[[y, x]] = grid[[iy, ix]];
                }
            }
        }
    }
    Ok(out)
}

/// PyTorch's bilinear source indices and weights along one axis (align_corners=False).
fn bilinear_source(dst: usize, in_len: usize, out_len: usize) -> (usize, usize, f32, f32) {
    let scale = in_len as f32 / out_len as f32;
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(in_len - 1);
    let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
    let l1 = src - i0 as f32;
    (i0, i1, 1.0 - l1, l1)
}

/// Settings of the anomaly maps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationConfig {
    /// How the patch-score grid is upsampled.
    pub upsample: Upsample,
    /// The blur applied after upsampling.
    pub blur: GaussianBlur,
}

impl SegmentationConfig {
    /// The original's `RescaleSegmentor`: bilinear, then scipy's Gaussian with σ = 4.
    pub const fn inspection() -> Self {
        Self {
            upsample: Upsample::Bilinear,
            blur: GaussianBlur::inspection(),
        }
    }
}

/// Turns per-image patch-score grids into anomaly maps of a fixed output size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segmentor {
    config: SegmentationConfig,
    size: (usize, usize),
}

impl Segmentor {
    /// A segmentor producing (`height`, `width`) maps.
    ///
    /// # Errors
    /// Invalid blur parameters or an empty output size.
    pub fn new(
        config: SegmentationConfig,
        size: (usize, usize),
    ) -> Result<Self, SegmentationError> {
        config.blur.validate()?;
        if size.0 == 0 || size.1 == 0 {
            return Err(SegmentationError::Empty {
                what: "output size",
                shape: vec![size.0, size.1],
            });
        }
        Ok(Self { config, size })
    }

    /// Maps a batch of grids (B, h, w) to anomaly maps (B, H, W).
    ///
    /// # Errors
    /// An empty grid.
    pub fn segment(&self, grids: ArrayView3<'_, f32>) -> Result<Array3<f32>, SegmentationError> {
        let (b, _, _) = grids.dim();
        let (oh, ow) = self.size;
        let mut out = Array3::<f32>::zeros((b, oh, ow));
        // One map per work item: the maps are independent and each is small enough for one core.
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(grids.axis_iter(Axis(0)).into_par_iter())
            .try_for_each(|(mut dst, grid)| {
                let up = upsample(grid, oh, ow, self.config.upsample)?;
                let map = self.config.blur.apply(up.view())?;
                dst.assign(&map);
                Ok(())
            })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// The blur written the plain way: one output at a time, every tap through [`Border::index`].
    fn naive_blur(blur: &GaussianBlur, map: ArrayView2<'_, f32>) -> Array2<f32> {
        let k = blur.kernel();
        let r = (k.len() / 2) as isize;
        let pass = |m: ArrayView2<'_, f32>, axis: usize| {
            let (h, w) = m.dim();
            Array2::from_shape_fn((h, w), |(y, x)| {
                let at = |d: isize| -> f64 {
                    if axis == 0 {
                        f64::from(m[[blur.border.index(y as isize + d, h), x]])
                    } else {
                        f64::from(m[[y, blur.border.index(x as isize + d, w)]])
                    }
                };
                let mut acc = at(0) * k[r as usize];
                for j in 1..=r {
                    acc += (at(j) + at(-j)) * k[(r + j) as usize];
                }
                acc as f32
            })
        };
        let cols = pass(map, 0);
        pass(cols.view(), 1)
    }

    #[test]
    fn blur_is_bitwise_the_plain_loop() {
        for border in [
            Border::ScipyReflect,
            Border::TorchReflect,
            Border::Replicate,
        ] {
            for (h, w, sigma) in [(224, 224, 4.0), (7, 30, 4.0), (1, 5, 1.5), (13, 2, 0.0)] {
                let blur = GaussianBlur {
                    sigma,
                    truncate: 4.0,
                    border,
                };
                let map = Array2::from_shape_fn((h, w), |(y, x)| {
                    ((y * 31 + x * 17) as f32 * 0.37).sin() * 1e3 + (x as f32) * 1e-3
                });
                let got = blur.apply(map.view()).unwrap();
                let want = naive_blur(&blur, map.view());
                let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{border:?} {h}x{w} sigma {sigma}");
            }
        }
    }

    #[test]
    fn border_rules_hand_checked() {
        // len 4, positions -3..7.
        let scipy: Vec<_> = (-3..7).map(|i| Border::ScipyReflect.index(i, 4)).collect();
        assert_eq!(scipy, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
        let torch: Vec<_> = (-3..7).map(|i| Border::TorchReflect.index(i, 4)).collect();
        assert_eq!(torch, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        let rep: Vec<_> = (-3..7).map(|i| Border::Replicate.index(i, 4)).collect();
        assert_eq!(rep, vec![0, 0, 0, 0, 1, 2, 3, 3, 3, 3]);
        // Reflection that wraps more than once, as scipy does for kernels wider than the map.
        assert_eq!(Border::ScipyReflect.index(-9, 4), 0);
        assert_eq!(Border::ScipyReflect.index(5, 1), 0);
    }

    #[test]
    fn kernel_matches_scipy() {
        // scipy.ndimage._filters._gaussian_kernel1d(1.0, 0, 4) = [1.338e-4, 4.432e-3, 5.399e-2, 2.420e-1, 3.989e-1, ...]
        let k = GaussianBlur {
            sigma: 1.0,
            truncate: 4.0,
            border: Border::ScipyReflect,
        }
        .kernel();
        assert_eq!(k.len(), 9);
        let want = [
            1.33830625e-04,
            4.43186162e-03,
            5.39911274e-02,
            2.41971446e-01,
            3.98943469e-01,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!((k[i] - w).abs() < 1e-9 && (k[8 - i] - w).abs() < 1e-9);
        }
        assert_eq!(GaussianBlur::inspection().kernel().len(), 33);
    }

    #[test]
    fn blur_of_constant_is_constant_and_sigma_zero_is_identity() {
        let m = Array2::<f32>::from_elem((5, 7), 3.5);
        let b = GaussianBlur::inspection().apply(m.view()).unwrap();
        assert!(b.iter().all(|v| (v - 3.5).abs() < 1e-6));
        let m = array![[1.0f32, 2.0], [3.0, 4.0]];
        let off = GaussianBlur {
            sigma: 0.0,
            ..GaussianBlur::inspection()
        };
        assert_eq!(off.apply(m.view()).unwrap(), m);
    }

    #[test]
    fn upsample_hand_checked() {
        // PyTorch: F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear")
        // → rows [0, .25, .75, 1], [.5, .75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2, 2.25, 2.75, 3].
        let g = array![[0.0f32, 1.0], [2.0, 3.0]];
        let up = upsample(g.view(), 4, 4, Upsample::Bilinear).unwrap();
        let want = array![
            [0.0f32, 0.25, 0.75, 1.0],
            [0.5, 0.75, 1.25, 1.5],
            [1.5, 1.75, 2.25, 2.5],
            [2.0, 2.25, 2.75, 3.0]
        ];
        assert_eq!(up, want);
        let nn = upsample(g.view(), 4, 4, Upsample::Nearest).unwrap();
        assert_eq!(nn.row(1).to_vec(), vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn bad_parameters_are_named() {
        let bad = GaussianBlur {
            sigma: -1.0,
            ..GaussianBlur::inspection()
        };
        assert!(matches!(
            bad.validate(),
            Err(SegmentationError::InvalidParameter {
                parameter: "sigma",
                ..
            })
        ));
        assert!(Segmentor::new(SegmentationConfig::inspection(), (0, 3)).is_err());
    }
}
