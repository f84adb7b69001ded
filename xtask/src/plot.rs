//! Curve plots as PNG files: axes with ticks every tenth of their range, an optional chance diagonal, and one curve.
//!
//! There is no text in the image (no font library is needed); the report's markdown says what the axes are.

use anyhow::{Context, Result};

/// The side of a plot image in pixels.
const SIZE: u32 = 480;
/// The blank border around the plotting area in pixels.
const MARGIN: u32 = 40;

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [225, 225, 225];
const DIAGONAL: [u8; 3] = [150, 150, 150];

/// What a plot shows and how its axes run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlotSpec {
    /// The largest x value (the x axis runs from 0).
    pub x_max: f64,
    /// The largest y value (the y axis runs from 0).
    pub y_max: f64,
    /// Whether to draw the dashed chance line from (0, 0) to (x_max, y_max).
    pub diagonal: bool,
    /// The curve's colour.
    pub colour: [u8; 3],
}

impl PlotSpec {
    /// An ROC curve: FPR and TPR from 0 to 1, with the chance diagonal, in blue.
    pub const ROC: Self = Self {
        x_max: 1.0,
        y_max: 1.0,
        diagonal: true,
        colour: [31, 119, 180],
    };
    /// A PRO curve: FPR from 0 to 0.3, PRO from 0 to 1, in red.
    pub const PRO: Self = Self {
        x_max: 0.3,
        y_max: 1.0,
        diagonal: false,
        colour: [214, 39, 40],
    };
}

/// An RGB raster.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: WHITE.repeat((SIZE * SIZE) as usize),
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        if (0..SIZE as i64).contains(&x) && (0..SIZE as i64).contains(&y) {
            let at = 3 * (y as usize * SIZE as usize + x as usize);
            self.pixels[at..at + 3].copy_from_slice(&colour);
        }
    }

    /// A line between two pixel positions, `width` pixels wide; with `dash`, only every other 6-pixel stretch.
    fn line(&mut self, from: (f64, f64), to: (f64, f64), width: i64, dash: bool, colour: [u8; 3]) {
        let length = ((to.0 - from.0).powi(2) + (to.1 - from.1).powi(2)).sqrt();
        let steps = (length * 2.0).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            if dash && ((t * length / 6.0) as usize) % 2 == 1 {
                continue;
            }
            let x = (from.0 + t * (to.0 - from.0)).round() as i64;
            let y = (from.1 + t * (to.1 - from.1)).round() as i64;
            for dy in 0..width {
                for dx in 0..width {
                    self.set(x + dx - width / 2, y + dy - width / 2, colour);
                }
            }
        }
    }
}

/// The pixel position of a data point: x to the right from the left margin, y up from the bottom margin.
pub fn to_pixel(spec: &PlotSpec, point: (f64, f64)) -> (f64, f64) {
    let span = (SIZE - 2 * MARGIN) as f64;
    let x = MARGIN as f64 + point.0.clamp(0.0, spec.x_max) / spec.x_max * span;
    let y = (SIZE - MARGIN) as f64 - point.1.clamp(0.0, spec.y_max) / spec.y_max * span;
    (x, y)
}

/// Draws `points` (joined in order) on axes per `spec` and returns the PNG file's bytes.
pub fn plot_png(spec: &PlotSpec, points: &[(f64, f64)]) -> Result<Vec<u8>> {
    let mut canvas = Canvas::new();
    let origin = to_pixel(spec, (0.0, 0.0));
    let corner = to_pixel(spec, (spec.x_max, spec.y_max));
    // A light grid and ticks every tenth of each axis.
    for i in 0..=10 {
        let x = to_pixel(spec, (spec.x_max * i as f64 / 10.0, 0.0)).0;
        let y = to_pixel(spec, (0.0, spec.y_max * i as f64 / 10.0)).1;
        canvas.line((x, origin.1), (x, corner.1), 1, false, GRID);
        canvas.line((origin.0, y), (corner.0, y), 1, false, GRID);
        canvas.line((x, origin.1), (x, origin.1 + 6.0), 1, false, BLACK);
        canvas.line((origin.0 - 6.0, y), (origin.0, y), 1, false, BLACK);
    }
    if spec.diagonal {
        canvas.line(origin, corner, 1, true, DIAGONAL);
    }
    canvas.line(origin, (corner.0, origin.1), 1, false, BLACK);
    canvas.line(origin, (origin.0, corner.1), 1, false, BLACK);
    for pair in points.windows(2) {
        canvas.line(
            to_pixel(spec, pair[0]),
            to_pixel(spec, pair[1]),
            2,
            false,
            spec.colour,
        );
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, SIZE, SIZE);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .context("could not start the PNG plot")?;
    writer
        .write_image_data(&canvas.pixels)
        .context("could not encode the PNG plot")?;
    writer.finish().context("could not finish the PNG plot")?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixel(image: &[u8], (x, y): (f64, f64)) -> [u8; 3] {
        let at = 3 * (y.round() as usize * SIZE as usize + x.round() as usize);
        [image[at], image[at + 1], image[at + 2]]
    }

    #[test]
    fn roc_plot_has_axes_diagonal_and_curve() {
        // A curve that goes straight up, then right: it runs along the left axis and the top edge.
        let curve = [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)];
        let (w, h, image) = decode(&plot_png(&PlotSpec::ROC, &curve).unwrap());
        assert_eq!((w, h), (SIZE, SIZE));
        // The horizontal segment at TPR 0.5 is drawn in the curve's colour.
        assert_eq!(
            pixel(&image, to_pixel(&PlotSpec::ROC, (0.25, 0.5))),
            PlotSpec::ROC.colour
        );
        // The chance diagonal passes through (0.1, 0.1), in a drawn stretch of its dashes or a gap.
        let on_diagonal = pixel(&image, to_pixel(&PlotSpec::ROC, (0.1, 0.1)));
        assert!(on_diagonal == DIAGONAL || on_diagonal == WHITE || on_diagonal == GRID);
        let diagonal_pixels = (0..100)
            .map(|i| {
                pixel(
                    &image,
                    to_pixel(&PlotSpec::ROC, (i as f64 / 100.0, i as f64 / 100.0)),
                )
            })
            .filter(|p| *p == DIAGONAL)
            .count();
        assert!(diagonal_pixels > 20, "{diagonal_pixels}");
        // The bottom axis is black; the area far from everything is white or grid.
        assert_eq!(pixel(&image, to_pixel(&PlotSpec::ROC, (0.55, 0.0))), BLACK);
        assert_eq!(pixel(&image, (5.0, 5.0)), WHITE);
    }

    #[test]
    fn pro_plot_scales_the_x_axis_to_its_limit() {
        let spec = PlotSpec::PRO;
        // FPR 0.3 maps to the right end of the axis, as FPR 1 does for ROC.
        assert_eq!(
            to_pixel(&spec, (0.3, 1.0)),
            to_pixel(&PlotSpec::ROC, (1.0, 1.0))
        );
        let (_, _, image) =
            decode(&plot_png(&spec, &[(0.0, 0.0), (0.0, 0.8), (0.3, 0.8)]).unwrap());
        assert_eq!(pixel(&image, to_pixel(&spec, (0.15, 0.8))), spec.colour);
        // Out-of-range points are clamped onto the axes instead of panicking.
        assert!(plot_png(&spec, &[(-1.0, 2.0), (5.0, -3.0)]).is_ok());
    }
}
