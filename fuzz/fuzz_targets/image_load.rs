//! Any byte string given to the image-loading path (decode, EXIF orientation, RGB conversion, PIL-exact resize,
//! centre crop, normalisation) yields an input tensor or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = patchcore::decode_image(data, std::path::Path::new("fuzz.img")) {
        // Huge but valid images are legitimate; they are only skipped here to keep each run fast.
        if u64::from(image.width()) * u64::from(image.height()) <= 1 << 22 {
            let config = patchcore::PatchCoreConfig::lite0("unused.pth");
            let input = config.preprocess.apply(&image);
            assert_eq!(input.dim(), (3, 224, 224));
        }
    }
});
