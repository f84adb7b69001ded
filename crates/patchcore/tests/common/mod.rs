//! Helpers shared by the integration tests that use the real ELPV images and Lite0 weights.

use std::path::{Path, PathBuf};

/// The training cells of the reference goldens.
pub const TRAIN: [&str; 3] = ["cell0004.png", "cell0009.png", "cell0060.png"];
/// The test cells of the reference goldens: one good, one defective.
pub const TEST: [&str; 2] = ["cell0011.png", "cell0001.png"];

/// A file in `tests/data/`.
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The real Lite0 weights from `PATCHCORE_LITE0_WEIGHTS` (`cargo xtask test` sets it). Without it a test prints a
/// notice and returns early, unless `PATCHCORE_REQUIRE_WEIGHTS=1`, which turns the absence into a failure.
pub fn weights() -> Option<PathBuf> {
    match std::env::var_os("PATCHCORE_LITE0_WEIGHTS") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var("PATCHCORE_REQUIRE_WEIGHTS").as_deref() != Ok("1"),
                "PATCHCORE_REQUIRE_WEIGHTS=1 but PATCHCORE_LITE0_WEIGHTS is not set; run `cargo xtask test`"
            );
            eprintln!("notice: PATCHCORE_LITE0_WEIGHTS is not set; skipping this test (run `cargo xtask test`)");
            None
        }
    }
}
