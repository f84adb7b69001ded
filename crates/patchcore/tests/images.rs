//! Every kind of image users feed: bit depths, alpha, palettes, EXIF orientation, odd sizes, wrong suffixes.
//!
//! Images are generated here, so the expected tensors are hand-checkable: a grey level `v` becomes
//! `(v/255 − 127/255)/(128/255)` on every channel with the Lite0 normalisation.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, RgbaImage};
use ndarray::Array3;
use patchcore::{load_image, Error, PatchCoreConfig};

fn config() -> PatchCoreConfig {
    PatchCoreConfig::lite0("unused.pth")
}

fn save(dir: &Path, name: &str, image: &DynamicImage) -> PathBuf {
    let p = dir.join(name);
    image.save(&p).unwrap();
    p
}

fn max_diff(a: &Array3<f32>, b: &Array3<f32>) -> f32 {
    (a - b).mapv(f32::abs).fold(0.0, |m, &v| m.max(v))
}

/// A grey gradient with some structure, 300 × 200.
fn grey(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]))
}

#[test]
fn grey_alpha_rgba_and_rgb_agree() {
    let dir = tempfile::tempdir().unwrap();
    let g = grey(300, 200);
    let rgb = DynamicImage::ImageLuma8(g.clone()).to_rgb8();
    let la = GrayAlphaImage::from_fn(300, 200, |x, y| {
        image::LumaA([g.get_pixel(x, y).0[0], (x % 256) as u8])
    });
    let rgba = RgbaImage::from_fn(300, 200, |x, y| {
        let v = g.get_pixel(x, y).0[0];
        image::Rgba([v, v, v, 255 - (y % 256) as u8])
    });
    let c = config();
    let want = c
        .preprocess
        .apply(&load_image(&save(dir.path(), "rgb.png", &DynamicImage::ImageRgb8(rgb))).unwrap());
    for (name, img) in [
        ("grey.png", DynamicImage::ImageLuma8(g)),
        ("grey_alpha.png", DynamicImage::ImageLumaA8(la)),
        ("rgba.png", DynamicImage::ImageRgba8(rgba)),
    ] {
        let got = c
            .preprocess
            .apply(&load_image(&save(dir.path(), name, &img)).unwrap());
        assert_eq!(
            max_diff(&got, &want),
            0.0,
            "{name}: alpha must be dropped and grey replicated"
        );
    }
}

#[test]
fn sixteen_bit_samples_scale_by_65535() {
    let dir = tempfile::tempdir().unwrap();
    // White in 16 bits is 65535: it must normalise like 8-bit white, not like 65535/255.
    let white16 = ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(64, 48, Luma([65535]));
    let img = load_image(&save(
        dir.path(),
        "white16.png",
        &DynamicImage::ImageLuma16(white16),
    ))
    .unwrap();
    let t = config().preprocess.apply(&img);
    let white = (1.0 - 127.0 / 255.0) / (128.0 / 255.0);
    assert!(
        t.iter().all(|v| (v - white).abs() < 1e-5),
        "{:?}",
        t[[0, 100, 100]]
    );
    // A 16-bit gradient equal to an 8-bit one (v · 257) gives the same tensor up to the 8-bit path's rounding.
    let g = grey(300, 200);
    let g16 = ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(300, 200, |x, y| {
        Luma([g.get_pixel(x, y).0[0] as u16 * 257])
    });
    let a = config()
        .preprocess
        .apply(&load_image(&save(dir.path(), "g8.png", &DynamicImage::ImageLuma8(g))).unwrap());
    let b = config().preprocess.apply(
        &load_image(&save(
            dir.path(),
            "g16.png",
            &DynamicImage::ImageLuma16(g16),
        ))
        .unwrap(),
    );
    // One 8-bit step is 1/128 after normalisation; PIL's fixed point rounds once per pass.
    assert!(
        max_diff(&a, &b) <= 2.0 / 128.0 + 1e-6,
        "{}",
        max_diff(&a, &b)
    );
}

#[test]
fn palette_png_expands_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let palette = [10u8, 20, 30, 200, 100, 50, 0, 255, 0];
    let (w, h) = (40u32, 30u32);
    let indices: Vec<u8> = (0..w * h).map(|i| (i % 3) as u8).collect();
    let path = dir.path().join("palette.png");
    {
        let file = std::fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette.to_vec());
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&indices).unwrap();
    }
    let rgb = RgbImage::from_fn(w, h, |x, y| {
        let i = indices[(y * w + x) as usize] as usize * 3;
        Rgb([palette[i], palette[i + 1], palette[i + 2]])
    });
    let want = config().preprocess.apply(&DynamicImage::ImageRgb8(rgb));
    let got = config().preprocess.apply(&load_image(&path).unwrap());
    assert_eq!(max_diff(&got, &want), 0.0);
}

/// Inserts an EXIF APP1 segment with the given orientation right after the JPEG's SOI marker.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2a\x00\x00\x00\x08"); // Big-endian TIFF header, IFD at offset 8.
    tiff.extend_from_slice(&1u16.to_be_bytes()); // One entry.
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation tag.
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT.
    tiff.extend_from_slice(&1u32.to_be_bytes()); // Count 1.
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // Padding of the 4-byte value field.
    tiff.extend_from_slice(&0u32.to_be_bytes()); // No next IFD.
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    // 60 wide, 20 tall; the left half dark, the right half bright.
    let img = RgbImage::from_fn(60, 20, |x, _| {
        if x < 30 {
            Rgb([20, 20, 20])
        } else {
            Rgb([230, 230, 230])
        }
    });
    let mut jpeg = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let plain = dir.path().join("plain.jpg");
    std::fs::write(&plain, &jpeg).unwrap();
    assert_eq!(load_image(&plain).unwrap().to_rgb8().dimensions(), (60, 20));
    // Orientation 6: the viewer rotates 90° clockwise, so the image stands 20 wide and 60 tall, dark on top.
    let rotated = dir.path().join("rotated.jpg");
    std::fs::File::create(&rotated)
        .unwrap()
        .write_all(&with_exif_orientation(&jpeg, 6))
        .unwrap();
    let r = load_image(&rotated).unwrap().to_rgb8();
    assert_eq!(r.dimensions(), (20, 60));
    assert!(r.get_pixel(10, 5).0[0] < 60 && r.get_pixel(10, 55).0[0] > 190);
}

#[test]
fn any_size_and_aspect_works_and_maps_keep_orientation() {
    let dir = tempfile::tempdir().unwrap();
    let c = config();
    for (w, h) in [(1, 1), (10, 7), (7, 10), (224, 224), (640, 120), (120, 640)] {
        let img = load_image(&save(
            dir.path(),
            &format!("{w}x{h}.png"),
            &DynamicImage::ImageLuma8(grey(w, h)),
        ))
        .unwrap();
        let t = c.preprocess.apply(&img);
        assert_eq!(t.dim(), (3, 224, 224));
        assert!(t.iter().all(|v| v.is_finite()));
        let map = ndarray::Array2::from_shape_fn((224, 224), |(y, x)| (y * 1000 + x) as f32);
        let back = c.preprocess.map_to_original(map.view(), w, h);
        assert_eq!(
            back.dim(),
            (h as usize, w as usize),
            "width and height must not swap for {w}×{h}"
        );
    }
    // A 448 × 448 image is resized to 256 and cropped at 16: its map centre comes back at the image centre.
    let map = ndarray::Array2::from_shape_fn((224, 224), |(y, x)| {
        if (100..124).contains(&y) && (100..124).contains(&x) {
            1.0
        } else {
            0.0
        }
    });
    let back = c.preprocess.map_to_original(map.view(), 448, 448);
    assert!(back[[224, 224]] > 0.5 && back[[20, 20]] == 0.0);
}

#[test]
fn wrong_suffix_is_decoded_by_content_and_garbage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let png = save(
        dir.path(),
        "real.png",
        &DynamicImage::ImageLuma8(grey(32, 32)),
    );
    let disguised = dir.path().join("actually_png.jpg");
    std::fs::copy(&png, &disguised).unwrap();
    assert_eq!(load_image(&disguised).unwrap().width(), 32);
    let garbage = dir.path().join("garbage.jpg");
    std::fs::write(&garbage, [0xFFu8, 0xD8, 0xFF, 0x00, 0x13, 0x37]).unwrap();
    let e = load_image(&garbage).unwrap_err();
    assert!(
        matches!(e, Error::Image { .. }) && e.to_string().contains("garbage.jpg"),
        "{e}"
    );
}

/// Found by the `image_load` fuzz target: a PNG header claiming 7.4 million × 1.7 billion pixels must be refused
/// before anything is allocated.
#[test]
fn huge_claimed_dimensions_are_refused_without_allocating() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-huge-png-header.png");
    let e = load_image(&path).unwrap_err();
    assert!(matches!(e, Error::Image { .. }), "{e}");
    assert!(e.to_string().contains("fuzz-huge-png-header.png"), "{e}");
}

/// Found by the `image_load` fuzz target: a 9 × 35,340 JPEG (after EXIF rotation) resizes to 256 × 1,005,226
/// under torchvision's rule. Only the centre crop is resampled, so it is processed like any other image.
#[test]
fn extreme_aspect_ratios_are_preprocessed() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-extreme-aspect.jpg");
    let image = load_image(&path).unwrap();
    assert_eq!((image.width(), image.height()), (9, 35340));
    let t = config().preprocess.apply(&image);
    assert_eq!(t.dim(), (3, 224, 224));
    assert!(t.iter().all(|v| v.is_finite()));
}

/// The other formats the `image` crate decodes: each round-trips through its encoder and preprocesses like the
/// same pixels in PNG (float formats keep their precision, so they agree to rounding).
#[test]
fn other_formats_decode_like_png() {
    let dir = tempfile::tempdir().unwrap();
    let g = grey(64, 48);
    let rgb = DynamicImage::ImageLuma8(g).to_rgb8();
    let c = config();
    let want = c.preprocess.apply(&DynamicImage::ImageRgb8(rgb.clone()));
    let float = DynamicImage::ImageRgb8(rgb.clone()).to_rgb32f();
    let cases: Vec<(&str, DynamicImage, image::ImageFormat, f32)> = vec![
        (
            "a.qoi",
            DynamicImage::ImageRgb8(rgb.clone()),
            image::ImageFormat::Qoi,
            0.0,
        ),
        (
            "a.ico",
            DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).to_rgba8()),
            image::ImageFormat::Ico,
            0.0,
        ),
        (
            "a.ff",
            DynamicImage::ImageRgba16(DynamicImage::ImageRgb8(rgb.clone()).to_rgba16()),
            image::ImageFormat::Farbfeld,
            2.0 / 128.0,
        ),
        (
            "a.hdr",
            DynamicImage::ImageRgb32F(float.clone()),
            image::ImageFormat::Hdr,
            0.02,
        ),
        (
            "a.exr",
            DynamicImage::ImageRgb32F(float),
            image::ImageFormat::OpenExr,
            2.0 / 128.0,
        ),
    ];
    for (name, img, format, tolerance) in cases {
        let path = dir.path().join(name);
        img.save_with_format(&path, format).unwrap();
        let got = c.preprocess.apply(&load_image(&path).unwrap());
        let err = max_diff(&got, &want);
        assert!(err <= tolerance + 1e-6, "{name}: max difference {err}");
    }
}
