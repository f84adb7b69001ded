//! Heatmap overlays: the model's input crop blended with a colour-mapped anomaly map.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use ndarray::{Array2, ArrayView2};
use patchcore::{DynamicImage, PatchCoreConfig};

/// Writes `bytes` to `path` atomically (see [`patchcore::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(patchcore::write_atomic(path, bytes)?)
}

/// Where overlays are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapSize {
    /// On the model's input: the resized, centre-cropped image.
    Input,
    /// On the original image, with the map brought back to its size and orientation.
    Original,
}

/// Keeps the input crops and maps of up to `limit` images, so that all overlays share one colour scale.
pub struct Collector {
    limit: usize,
    size: MapSize,
    items: Vec<(PathBuf, RgbImage, Array2<f32>)>,
}

impl Collector {
    pub fn new(limit: usize, size: MapSize) -> Self {
        Self {
            limit,
            size,
            items: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        path: &Path,
        image: &DynamicImage,
        config: &PatchCoreConfig,
        map: ArrayView2<'_, f32>,
    ) {
        if self.items.len() >= self.limit {
            return;
        }
        if self.size == MapSize::Original {
            let base = image.to_rgb8();
            let map = config
                .preprocess
                .map_to_original(map, base.width(), base.height());
            self.items.push((path.to_path_buf(), base, map));
            return;
        }
        let input = config.preprocess.apply(image);
        let (_, h, w) = input.dim();
        let n = config.preprocess.normalization;
        let crop = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let px = |c: usize| {
                let v = input[[c, y as usize, x as usize]] * n.std[c] + n.mean[c];
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            };
            Rgb([px(0), px(1), px(2)])
        });
        self.items.push((path.to_path_buf(), crop, map.to_owned()));
    }

    /// Writes one PNG per collected image into `dir`, named after its path relative to `base` with separators
    /// replaced by `_`. Returns the number written.
    pub fn write(&self, dir: &Path, base: &Path) -> Result<usize> {
        if self.items.is_empty() {
            return Ok(0);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (lo, hi) = self
            .items
            .iter()
            .flat_map(|(_, _, m)| m.iter())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let mut used = std::collections::HashSet::new();
        for (path, crop, map) in &self.items {
            let mut out = crop.clone();
            for (x, y, px) in out.enumerate_pixels_mut() {
                let t = (map[[y as usize, x as usize]] - lo) / span;
                let heat = jet(t);
                for (v, h) in px.0.iter_mut().zip(heat) {
                    *v = (0.5 * *v as f32 + 0.5 * h as f32).round() as u8;
                }
            }
            let name = if base == Path::new("/") {
                path.file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            } else {
                let rel = path.strip_prefix(base).unwrap_or(path);
                let rel = rel.strip_prefix("test").unwrap_or(rel);
                rel.with_extension("")
                    .to_string_lossy()
                    .trim_start_matches('/')
                    .replace(['/', '\\'], "_")
            };
            // Two inputs with the same name get numbered overlays instead of overwriting each other.
            let mut unique = name.clone();
            let mut n = 1;
            while !used.insert(unique.clone()) {
                n += 1;
                unique = format!("{name}-{n}");
            }
            let name = unique;
            let mut png = Vec::new();
            out.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .context("cannot encode an overlay PNG")?;
            write_atomic(&dir.join(format!("{name}.png")), &png)?;
        }
        Ok(self.items.len())
    }
}

/// The "jet" colour map: blue (0) → cyan → yellow → red (1).
fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let channel = |offset: f32| ((1.5 - (4.0 * t - offset).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

#[cfg(test)]
mod tests {
    use super::jet;

    #[test]
    fn jet_ends() {
        assert_eq!(jet(0.0), [0, 0, 127]);
        assert_eq!(jet(1.0), [127, 0, 0]);
        assert_eq!(jet(0.5), [127, 255, 127]);
    }
}
