//! Image loading and preprocessing: decode, convert to RGB, resize the shorter side, centre-crop, normalise.
//!
//! The original feeds `PIL.Image.open(path).convert("RGB")` through torchvision's `Resize(256)`,
//! `CenterCrop(224)`, `ToTensor()` and `Normalize(mean, std)`. PIL resizes 8-bit images with a separable,
//! antialiased filter in fixed-point arithmetic (22 fractional bits, one rounding to 8 bits after each pass). This
//! module ports that algorithm, so 8-bit inputs reproduce the original's tensors bit for bit. Images with more than 8
//! bits per sample (16-bit PNG, float formats) keep their precision: the same filter runs in f32 on values scaled
//! to 0..1 (16-bit samples divide by 65535), with no intermediate rounding.
//!
//! Alpha is dropped, as PIL's `convert("RGB")` does; grey is replicated to three channels; palette images are
//! expanded by the decoder.

use std::ops::Range;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader};
use ndarray::{Array2, Array3, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::{ConfigError, Error, Normalization};

/// How images are resampled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resample {
    /// PIL's antialiased bilinear filter (`Image.resize(..., BILINEAR)`), which torchvision uses on PIL images: the
    /// original's behaviour.
    #[default]
    PilBilinear,
}

/// Preprocessing settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// The shorter side is resized to this many pixels, keeping the aspect ratio (torchvision `Resize(int)`).
    pub resize: u32,
    /// Then a centred square of this side is cut out (torchvision `CenterCrop`); this is the model's input size.
    pub crop: u32,
    /// Per-channel normalisation applied to values in 0..1; it belongs to the backbone.
    pub normalization: Normalization,
    /// The resampling filter.
    pub resample: Resample,
}

impl PreprocessConfig {
    /// Checks that sizes are non-zero.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `resize`, `crop` or `normalization.std`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.resize == 0 {
            return Err(ConfigError::invalid("preprocess.resize", "0", "at least 1"));
        }
        if self.crop == 0 {
            return Err(ConfigError::invalid("preprocess.crop", "0", "at least 1"));
        }
        if self
            .normalization
            .std
            .iter()
            .any(|s| !s.is_finite() || *s == 0.0)
            || self.normalization.mean.iter().any(|m| !m.is_finite())
        {
            return Err(ConfigError::invalid(
                "preprocess.normalization",
                format!("{:?}", self.normalization),
                "finite means and finite non-zero standard deviations",
            ));
        }
        Ok(())
    }

    /// Turns a decoded image into the normalised (3, crop, crop) input tensor.
    pub fn apply(&self, image: &DynamicImage) -> Array3<f32> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (ow, oh) = resized_size(w, h, self.resize as usize);
        let crop = self.crop as usize;
        let normalise =
            |v: f32, c: usize| (v - self.normalization.mean[c]) / self.normalization.std[c];
        let mut out = Array3::<f32>::zeros((3, crop, crop));
        let window = CropWindow::new(ow, oh, crop);
        // Only the pixels inside the crop are resampled: each output pixel depends on its own filter taps alone,
        // so this equals cutting the crop out of the full resize (and keeps extreme aspect ratios cheap).
        let (cols, rows) = window.spans();
        let ncols = cols.len();
        let (x0, y0) = (cols.start, rows.start);
        if is_8bit(image) {
            let rgb = image.to_rgb8();
            let resized = resize_u8_window(rgb.as_raw(), (w, h), 3, (ow, oh), cols, rows);
            window.fill(&mut out, |y, x, c| {
                normalise(
                    resized[((y - y0) * ncols + x - x0) * 3 + c] as f32 / 255.0,
                    c,
                )
            });
        } else {
            let rgb = image.to_rgb32f();
            let resized = resize_f32_window(rgb.as_raw(), (w, h), 3, (ow, oh), cols, rows);
            window.fill(&mut out, |y, x, c| {
                normalise(resized[((y - y0) * ncols + x - x0) * 3 + c], c)
            });
        }
        out
    }
}

impl PreprocessConfig {
    /// Brings an anomaly map at the model's input size (crop × crop) back onto the original image's pixel grid
    /// (`width` × `height`, after EXIF orientation): the map is placed where the centre crop was taken from the
    /// resized image, the margins the crop cut away are filled with the nearest map value (they were never seen by
    /// the model), and the result is resized bilinearly to the original size. Width and height are never swapped.
    pub fn map_to_original(
        &self,
        map: ArrayView2<'_, f32>,
        width: u32,
        height: u32,
    ) -> Array2<f32> {
        let (w, h) = (width.max(1) as usize, height.max(1) as usize);
        let (rw, rh) = resized_size(w, h, self.resize as usize);
        let window = CropWindow::new(rw, rh, self.crop as usize);
        let (mh, mw) = map.dim();
        let on_resized = Array2::from_shape_fn((rh, rw), |(y, x)| {
            let cy = (y as isize - window.top).clamp(0, mh as isize - 1) as usize;
            let cx = (x as isize - window.left).clamp(0, mw as isize - 1) as usize;
            map[[cy, cx]]
        });
        patchcore_segmentation::upsample(
            on_resized.view(),
            h,
            w,
            patchcore_segmentation::Upsample::Bilinear,
        )
        .expect("sizes are non-zero")
    }
}

/// How ground-truth masks are brought to the model's input grid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskResample {
    /// The original's evaluation: the mask goes through the image's PIL bilinear resize and centre crop, and only
    /// pixels that stay exactly at full intensity count as anomalous (`astype(int)` of values in 0..1), which
    /// shrinks every region by its blurred border.
    #[default]
    OriginalBilinear,
    /// Nearest-neighbour resize, then any non-zero pixel is anomalous: region borders stay where they were drawn.
    Nearest,
}

impl PreprocessConfig {
    /// Brings a ground-truth mask (any image; non-zero grey means anomalous) onto the model's crop × crop input
    /// grid, with the same resize and centre crop as the images.
    pub fn mask(&self, mask: &DynamicImage, mode: MaskResample) -> Array2<bool> {
        let grey = mask.to_luma8();
        let (w, h) = (grey.width() as usize, grey.height() as usize);
        let (ow, oh) = resized_size(w, h, self.resize as usize);
        let crop = self.crop as usize;
        let window = CropWindow::new(ow, oh, crop);
        let (cols, rows) = window.spans();
        let ncols = cols.len();
        let (x0, y0) = (cols.start, rows.start);
        let resized: Vec<bool> = match mode {
            MaskResample::OriginalBilinear => resize_u8_window(
                grey.as_raw(),
                (w, h),
                1,
                (ow, oh),
                cols.clone(),
                rows.clone(),
            )
            .into_iter()
            .map(|v| v == 255)
            .collect(),
            MaskResample::Nearest => {
                let mut out = Vec::with_capacity(ncols * rows.len());
                for y in rows.clone() {
                    // PIL's NEAREST: the source pixel under the output pixel's centre.
                    let sy = (((y as f64 + 0.5) * h as f64 / oh as f64) as usize).min(h - 1);
                    for x in cols.clone() {
                        let sx = (((x as f64 + 0.5) * w as f64 / ow as f64) as usize).min(w - 1);
                        out.push(grey.as_raw()[sy * w + sx] != 0);
                    }
                }
                out
            }
        };
        let mut out = Array2::from_elem((crop, crop), false);
        for y in 0..crop {
            let sy = window.top + y as isize;
            for x in 0..crop {
                let sx = window.left + x as isize;
                if sy >= y0 as isize
                    && sx >= x0 as isize
                    && (sy as usize) < rows.end
                    && (sx as usize) < cols.end
                {
                    out[[y, x]] = resized[(sy as usize - y0) * ncols + sx as usize - x0];
                }
            }
        }
        out
    }
}

/// Whether the image's samples have at most 8 bits (the PIL-exact fixed-point path applies).
fn is_8bit(image: &DynamicImage) -> bool {
    matches!(
        image,
        DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageRgb8(_)
            | DynamicImage::ImageRgba8(_)
    )
}

/// Opens and decodes an image file, guessing the format from its content rather than trusting the suffix.
///
/// # Errors
/// [`Error::Image`] naming the file when it cannot be read or decoded (missing, truncated, not an image), and
/// [`Error::EmptyImage`] when it decodes to zero pixels.
pub fn load_image(path: &Path) -> Result<DynamicImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        source: image::ImageError::IoError(e),
    })?;
    decode_image(&bytes, path)
}

/// Decodes an image held in memory; `path` only names it in errors. The format is guessed from the content, EXIF
/// orientation is applied, and the decoder's default memory limits bound what a hostile header can allocate.
///
/// # Errors
/// As [`load_image`].
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<DynamicImage, Error> {
    let image_err = |source| Error::Image {
        path: path.to_path_buf(),
        source,
    };
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err(image::ImageError::IoError(e)))?;
    let mut decoder = reader.into_decoder().map_err(image_err)?;
    // Reserve the decoded size against the default limits (512 MiB) before anything is allocated: a header may
    // claim any size.
    image::Limits::default()
        .reserve(decoder.total_bytes())
        .map_err(image_err)?;
    // EXIF orientation (JPEG, TIFF, WebP) is applied as image viewers do, so maps line up with what people see.
    let orientation = decoder.orientation().map_err(image_err)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(image_err)?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::EmptyImage {
            path: path.to_path_buf(),
        });
    }
    Ok(image)
}

/// torchvision `Resize(size)` with an int: the shorter side becomes `size`, the longer `int(size · long / short)`.
pub fn resized_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    if w <= h {
        let long = ((size as f64) * (h as f64) / (w as f64)) as usize;
        (size, long.max(1))
    } else {
        let long = ((size as f64) * (w as f64) / (h as f64)) as usize;
        (long.max(1), size)
    }
}

/// torchvision `CenterCrop`: pads with zeros when the image is smaller than the crop, then cuts at
/// `round((size − crop) / 2)` with Python's round-half-to-even.
struct CropWindow {
    width: usize,
    height: usize,
    crop: usize,
    // Offsets of the crop window in the (padded) image; negative values fall into the zero padding.
    top: isize,
    left: isize,
}

impl CropWindow {
    fn new(width: usize, height: usize, crop: usize) -> Self {
        let offset = |size: usize| -> isize {
            // Padding as torchvision computes it, then the centred offset within the padded image.
            let pad_before = if crop > size { (crop - size) / 2 } else { 0 };
            let pad_after = if crop > size {
                (crop - size).div_ceil(2)
            } else {
                0
            };
            let padded = size + pad_before + pad_after;
            let start = round_half_even((padded - crop) as f64 / 2.0) as isize;
            start - pad_before as isize
        };
        Self {
            width,
            height,
            crop,
            top: offset(height),
            left: offset(width),
        }
    }

    /// The columns and rows of the resized image that the crop covers.
    fn spans(&self) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let span = |offset: isize, size: usize| {
            let start = offset.clamp(0, size as isize) as usize;
            let end = (offset + self.crop as isize).clamp(0, size as isize) as usize;
            start..end.max(start)
        };
        (span(self.left, self.width), span(self.top, self.height))
    }

    fn fill(&self, out: &mut Array3<f32>, value: impl Fn(usize, usize, usize) -> f32) {
        for y in 0..self.crop {
            let sy = self.top + y as isize;
            if sy < 0 || sy >= self.height as isize {
                continue;
            }
            for x in 0..self.crop {
                let sx = self.left + x as isize;
                if sx < 0 || sx >= self.width as isize {
                    continue;
                }
                for c in 0..3 {
                    out[[c, y, x]] = value(sy as usize, sx as usize, c);
                }
            }
        }
    }
}

fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 {
        2.0 * (v / 2.0).round()
    } else {
        r
    }
}

/// The filter taps of one output position: first input index and the weights.
struct Taps {
    start: usize,
    weights: Vec<f64>,
}

/// PIL's `precompute_coeffs` for the bilinear (triangle) filter, support 1, scaled by the downscaling factor.
fn pil_coefficients(in_size: usize, out_size: usize, positions: Range<usize>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    positions
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // PIL truncates `center ± support + 0.5` towards zero with a C cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = weights.iter().sum();
            if sum != 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `normalize_coeffs_8bpc`: weights to fixed point with 22 fractional bits, rounded half away from zero.
fn fixed_point(taps: &[Taps]) -> Vec<(usize, Vec<i32>)> {
    taps.iter()
        .map(|t| {
            let k = t
                .weights
                .iter()
                .map(|&w| {
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (t.start, k)
        })
        .collect()
}

/// PIL's `clip8`: the fixed-point accumulator (which starts at one half) to a byte.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's 8-bit resample of an interleaved image: a horizontal pass, then a vertical pass, each skipped when that
/// side keeps its size.
pub fn resize_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    resize_u8_window(src, (w, h), channels, (out_w, out_h), 0..out_w, 0..out_h)
}

/// Columns `cols` and rows `rows` of [`resize_u8`]'s result, computed without the rest: identical to cutting
/// them out of the full resize. The result is `rows.len() × cols.len() × channels`, interleaved.
pub fn resize_u8_window(
    src: &[u8],
    size: (usize, usize),
    channels: usize,
    out_size: (usize, usize),
    cols: Range<usize>,
    rows: Range<usize>,
) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let taps = |input, output, positions| -> Vec<(usize, Vec<i64>)> {
        fixed_point(&pil_coefficients(input, output, positions))
            .into_iter()
            .map(|(start, k)| (start, k.into_iter().map(i64::from).collect()))
            .collect()
    };
    separable(
        src,
        size,
        channels,
        out_size,
        cols,
        rows,
        &taps,
        |values, k| {
            let acc = values
                .iter()
                .zip(k)
                .fold(half, |acc, (&v, &kk)| acc + i64::from(v) * kk);
            clip8(acc)
        },
    )
}

/// The same filter as [`resize_u8`] in floating point, for samples deeper than 8 bits (no intermediate rounding).
pub fn resize_f32(
    src: &[f32],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<f32> {
    resize_f32_window(src, (w, h), channels, (out_w, out_h), 0..out_w, 0..out_h)
}

/// Columns `cols` and rows `rows` of [`resize_f32`]'s result, computed without the rest.
pub fn resize_f32_window(
    src: &[f32],
    size: (usize, usize),
    channels: usize,
    out_size: (usize, usize),
    cols: Range<usize>,
    rows: Range<usize>,
) -> Vec<f32> {
    let taps = |input, output, positions| -> Vec<(usize, Vec<f64>)> {
        pil_coefficients(input, output, positions)
            .into_iter()
            .map(|t| (t.start, t.weights))
            .collect()
    };
    separable(
        src,
        size,
        channels,
        out_size,
        cols,
        rows,
        &taps,
        |values, k| {
            values
                .iter()
                .zip(k)
                .map(|(&v, &kk)| f64::from(v) * kk)
                .sum::<f64>() as f32
        },
    )
}

/// Filter taps for `(input size, output size, output positions)`: each position's first input index and weights.
type TapsFn<'a, K> = dyn Fn(usize, usize, Range<usize>) -> Vec<(usize, Vec<K>)> + 'a;

/// A separable resample restricted to a window of the output: a horizontal pass over the input rows that the
/// vertical pass reads (as PIL's `ybox`), for the window's columns only, then the vertical pass for the window's
/// rows. A pass is skipped when its side keeps its size, as in PIL. `taps(input, output, positions)` gives the
/// listed output positions' first input index and weights; `dot` applies them.
#[allow(clippy::too_many_arguments)]
fn separable<T: Copy + Default, K>(
    src: &[T],
    (w, h): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
    cols: Range<usize>,
    rows: Range<usize>,
    taps: &TapsFn<'_, K>,
    dot: impl Fn(&[T], &[K]) -> T,
) -> Vec<T> {
    let ncols = cols.len();
    let mut values: Vec<T> = Vec::new();
    let vertical = (out_h != h).then(|| taps(h, out_h, rows.clone()));
    let needed = match &vertical {
        Some(v) => {
            let (lo, hi) = v.iter().fold((usize::MAX, 0), |(lo, hi), (s, k)| {
                (lo.min(*s), hi.max(s + k.len()))
            });
            if lo > hi {
                0..0
            } else {
                lo..hi
            }
        }
        None => rows.clone(),
    };
    let mut horizontal = vec![T::default(); ncols * needed.len() * channels];
    if out_w != w {
        let coeffs = taps(w, out_w, cols.clone());
        for (yy, y) in needed.clone().enumerate() {
            for (i, (start, k)) in coeffs.iter().enumerate() {
                for c in 0..channels {
                    values.clear();
                    values.extend((0..k.len()).map(|j| src[(y * w + start + j) * channels + c]));
                    horizontal[(yy * ncols + i) * channels + c] = dot(&values, k);
                }
            }
        }
    } else {
        for (yy, y) in needed.clone().enumerate() {
            let row = &src[(y * w + cols.start) * channels..(y * w + cols.end) * channels];
            horizontal[yy * ncols * channels..(yy + 1) * ncols * channels].copy_from_slice(row);
        }
    }
    let Some(coeffs) = vertical else {
        return horizontal;
    };
    let mut out = vec![T::default(); ncols * rows.len() * channels];
    for (r, (start, k)) in coeffs.iter().enumerate() {
        let start = start - needed.start;
        for x in 0..ncols {
            for c in 0..channels {
                values.clear();
                values.extend(
                    (0..k.len()).map(|j| horizontal[((start + j) * ncols + x) * channels + c]),
                );
                out[(r * ncols + x) * channels + c] = dot(&values, k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_follows_torchvision() {
        assert_eq!(resized_size(300, 300, 256), (256, 256));
        // int(256 * 400 / 300) = 341.
        assert_eq!(resized_size(300, 400, 256), (256, 341));
        assert_eq!(resized_size(640, 480, 256), (341, 256));
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        // (256 - 224) / 2 = 16; (257 - 224) / 2 = 16.5 → 16; (259 - 224) / 2 = 17.5 → 18.
        assert_eq!(CropWindow::new(256, 257, 224).top, 16);
        assert_eq!(CropWindow::new(259, 256, 224).left, 18);
        // Smaller than the crop: 100 wide in a 224 crop pads 62 before, so the image starts at column 62.
        assert_eq!(CropWindow::new(100, 300, 224).left, -62);
    }

    #[test]
    fn windows_equal_cuts_of_the_full_resize() {
        let (w, h) = (37usize, 23usize);
        let src: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
        let srcf: Vec<f32> = src.iter().map(|&v| v as f32 / 255.0).collect();
        for (ow, oh) in [(37, 11), (16, 23), (50, 40), (9, 9)] {
            let full = resize_u8(&src, w, h, 3, ow, oh);
            let fullf = resize_f32(&srcf, w, h, 3, ow, oh);
            let (cols, rows) = (ow / 3..ow - ow / 4, oh / 5..oh);
            let win = resize_u8_window(&src, (w, h), 3, (ow, oh), cols.clone(), rows.clone());
            let winf = resize_f32_window(&srcf, (w, h), 3, (ow, oh), cols.clone(), rows.clone());
            for (r, y) in rows.clone().enumerate() {
                for (i, x) in cols.clone().enumerate() {
                    for c in 0..3 {
                        let at = (r * cols.len() + i) * 3 + c;
                        assert_eq!(win[at], full[(y * ow + x) * 3 + c]);
                        assert_eq!(winf[at], fullf[(y * ow + x) * 3 + c]);
                    }
                }
            }
        }
    }

    #[test]
    fn masks_follow_the_image_geometry() {
        use image::{GrayImage, Luma};
        let config = PreprocessConfig {
            resize: 256,
            crop: 224,
            normalization: Normalization {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            resample: Resample::PilBilinear,
        };
        // A 300 × 300 mask with the square 120..180 marked: × 256/300 → 102.4..153.6, minus the crop offset 16.
        let mask = GrayImage::from_fn(300, 300, |x, y| {
            Luma([if (120..180).contains(&x) && (120..180).contains(&y) {
                255
            } else {
                0
            }])
        });
        let m = DynamicImage::ImageLuma8(mask);
        let original = config.mask(&m, MaskResample::OriginalBilinear);
        let nearest = config.mask(&m, MaskResample::Nearest);
        let count = |a: &Array2<bool>| a.iter().filter(|&&v| v).count();
        // Nearest keeps the drawn square: output pixels y with (y + 0.5) · 300/256 in 120..180, i.e. y in
        // 101.9..153.1, so 102..=153: 52 × 52.
        assert_eq!(count(&nearest), 52 * 52);
        assert!(nearest[[128 - 16, 128 - 16]] && !nearest[[0, 0]]);
        // The original's rule loses the blurred border: strictly fewer pixels, all inside the nearest square.
        assert!(count(&original) < count(&nearest) && count(&original) > 40 * 40);
        assert!(original.iter().zip(nearest.iter()).all(|(o, n)| !o || *n));
    }

    #[test]
    fn resize_identity_and_constant() {
        let src: Vec<u8> = (0..12).collect();
        assert_eq!(resize_u8(&src, 4, 3, 1, 4, 3), src);
        let flat = vec![77u8; 30 * 20 * 3];
        assert!(resize_u8(&flat, 30, 20, 3, 7, 11).iter().all(|&v| v == 77));
        let flat = vec![0.25f32; 30 * 20];
        assert!(resize_f32(&flat, 30, 20, 1, 7, 11)
            .iter()
            .all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn pil_downscale_by_two_averages_pairs_with_triangle_weights() {
        // 4 → 2: output 0 has centre 1.0 and support 2, so it reads inputs 0..3 with triangle weights 0.75, 0.75, 0.25,
        // normalised to sum 1.
        let taps = pil_coefficients(4, 2, 0..2);
        assert_eq!(taps[0].start, 0);
        let w: Vec<f64> = taps[0]
            .weights
            .iter()
            .map(|w| (w * 1e6).round() / 1e6)
            .collect();
        assert_eq!(w, vec![0.428571, 0.428571, 0.142857]);
    }
}
