//! ImageNet checkpoints of the ResNet family, as torchvision publishes them.
//!
//! The file names are those of torchvision's `IMAGENET1K_V1` weights
//! (`torchvision/models/resnet.py`). Each name ends in the first hex digits
//! of the file's sha256, which the download is checked against.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::args::Options;
use crate::download::{Checksum, Downloader};
use crate::paths;
use crate::weights::hash_prefix_from_name;

/// Where torchvision publishes its checkpoints.
pub const URL_BASE: &str = "https://download.pytorch.org/models";

/// The environment variable that points the download at a mirror.
pub const URL_BASE_ENV: &str = "PATCHCORE_WEIGHTS_URL_BASE";

/// The supported models and the file names of their `IMAGENET1K_V1` checkpoints.
pub const MODELS: [(&str, &str); 7] = [
    ("resnet18", "resnet18-f37072fd.pth"),
    ("resnet34", "resnet34-b627a593.pth"),
    ("resnet50", "resnet50-0676ba61.pth"),
    ("resnet101", "resnet101-63fe2227.pth"),
    ("resnet152", "resnet152-394f9c45.pth"),
    ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
    ("wide_resnet101_2", "wide_resnet101_2-32ee1156.pth"),
];

/// Runs `cargo xtask fetch weights <model> [--cache DIR] [--url-base URL]`.
pub fn command(args: &[String]) -> Result<()> {
    let names: Vec<&str> = MODELS.iter().map(|(name, _)| *name).collect();
    let Some((model, rest)) = args.split_first() else {
        bail!("`fetch weights` needs a model: one of {}", names.join(", "));
    };
    let Some(&(_, file_name)) = MODELS.iter().find(|(name, _)| name == model) else {
        bail!(
            "unknown model `{model}` for `fetch weights`: expected one of {}",
            names.join(", ")
        );
    };
    let options = Options::parse(rest, &["--cache", "--url-base"], &[])?;
    let cache = paths::cache_dir(options.value("--cache"))?;
    let base = match options.value("--url-base") {
        Some(base) => base.to_owned(),
        None => std::env::var(URL_BASE_ENV)
            .ok()
            .filter(|base| !base.is_empty())
            .unwrap_or_else(|| URL_BASE.to_owned()),
    };
    let path = fetch(&cache, file_name, &base, &Downloader::default())?;
    println!("{}", path.display());
    Ok(())
}

/// Makes sure the checkpoint of `model` (a name in [`MODELS`]) is in the cache, downloading it
/// from torchvision (or the mirror in `PATCHCORE_WEIGHTS_URL_BASE`) if needed, and returns its
/// path.
pub fn fetch_model(cache: &Path, model: &str) -> Result<PathBuf> {
    let Some(&(_, file_name)) = MODELS.iter().find(|(name, _)| *name == model) else {
        bail!("no torchvision checkpoint is known for `{model}`");
    };
    let base = std::env::var(URL_BASE_ENV)
        .ok()
        .filter(|base| !base.is_empty())
        .unwrap_or_else(|| URL_BASE.to_owned());
    fetch(cache, file_name, &base, &Downloader::default())
}

/// Makes sure the checkpoint `file_name` is in `<cache>/weights/`, downloaded
/// from `<base>/<file_name>` and checked against the sha256 prefix its name
/// carries, and returns its path.
pub fn fetch(
    cache: &Path,
    file_name: &str,
    base: &str,
    downloader: &Downloader,
) -> Result<PathBuf> {
    let prefix = hash_prefix_from_name(file_name).with_context(|| {
        format!("the checkpoint name `{file_name}` carries no sha256 prefix (`<name>-<hex>.pth`)")
    })?;
    let dest = cache.join("weights").join(file_name);
    let url = format!("{}/{file_name}", base.trim_end_matches('/'));
    downloader.fetch(&url, &dest, &Checksum::Sha256Prefix(prefix.to_owned()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::{part_path, sha256_hex};
    use crate::testserver::{Behaviour, TestServer};
    use std::fs;
    use std::time::Duration;

    fn test_cache(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-tv-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn quiet() -> Downloader {
        Downloader {
            attempts: 3,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            retry_pause: Duration::from_millis(10),
            progress: false,
        }
    }

    /// A fake checkpoint and the torchvision-style name that matches its sha256.
    fn checkpoint() -> (Vec<u8>, String) {
        let body: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let name = format!("tiny-{}.pth", &sha256_hex(&body)[..8]);
        (body, name)
    }

    #[test]
    fn every_model_name_carries_a_hash_prefix() {
        for (model, file_name) in MODELS {
            let prefix = hash_prefix_from_name(file_name).unwrap();
            assert_eq!(prefix.len(), 8, "{model}");
            assert!(file_name.starts_with(&format!("{model}-")), "{model}");
        }
    }

    #[test]
    fn unknown_models_are_refused_by_name() {
        let err = command(&["resnet19".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("`resnet19`"), "{err}");
        assert!(err.to_string().contains("wide_resnet50_2"), "{err}");
    }

    #[test]
    fn full_download_lands_in_the_cache_and_is_not_repeated() {
        let cache = test_cache("full");
        let (body, name) = checkpoint();
        let server = TestServer::start();
        server.serve(&format!("/models/{name}"), body.clone(), Behaviour::Normal);
        let base = server.url("/models");
        let path = fetch(&cache, &name, &base, &quiet()).unwrap();
        assert_eq!(path, cache.join("weights").join(&name));
        assert_eq!(fs::read(&path).unwrap(), body);
        fetch(&cache, &name, &base, &quiet()).unwrap();
        assert_eq!(server.requests().len(), 1);
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn an_interrupted_download_resumes() {
        let cache = test_cache("resume");
        let (body, name) = checkpoint();
        let server = TestServer::start();
        server.serve(
            &format!("/models/{name}"),
            body.clone(),
            Behaviour::DropFirstAfter(60_000),
        );
        let path = fetch(&cache, &name, &server.url("/models"), &quiet()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
        let requests = server.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[1].range.as_deref(), Some("bytes=60000-"));
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn a_checkpoint_that_does_not_match_its_name_is_removed() {
        let cache = test_cache("mismatch");
        let (mut body, name) = checkpoint();
        body[1000] ^= 0x55;
        let server = TestServer::start();
        server.serve(&format!("/models/{name}"), body.clone(), Behaviour::Normal);
        let err = fetch(&cache, &name, &server.url("/models"), &quiet()).unwrap_err();
        let text = format!("{err:#}");
        let dest = cache.join("weights").join(&name);
        assert!(text.contains("checksum mismatch"), "{text}");
        assert!(text.contains(&dest.display().to_string()), "{text}");
        assert!(text.contains(&sha256_hex(&body)), "{text}");
        assert!(!dest.exists());
        assert!(!part_path(&dest).exists());
        fs::remove_dir_all(&cache).unwrap();
    }
}
