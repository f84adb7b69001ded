//! Locations of the workspace, the download cache and the demo output.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The environment variable that overrides the default cache folder.
pub const CACHE_ENV: &str = "PATCHCORE_CACHE";

/// Returns the workspace root, the parent of this crate's manifest folder.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Returns the cache folder: `--cache` if given, else `$PATCHCORE_CACHE` if set
/// and non-empty, else `<workspace root>/target/patchcore-cache`.
///
/// The result is absolute, so it stays valid for commands run from the
/// workspace root.
pub fn cache_dir(cli: Option<&str>) -> Result<PathBuf> {
    let chosen = resolve_cache(cli, std::env::var_os(CACHE_ENV), &workspace_root());
    absolute(&chosen)
}

/// Makes `path` absolute against the current folder, without touching the disk.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .with_context(|| format!("could not make the path {} absolute", path.display()))
}

/// Chooses the cache folder from the command line, the environment and the
/// workspace root, in that order of precedence.
fn resolve_cache(cli: Option<&str>, env: Option<OsString>, root: &Path) -> PathBuf {
    if let Some(dir) = cli {
        return PathBuf::from(dir);
    }
    match env {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root.join("target").join("patchcore-cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_precedence_is_cli_then_env_then_default() {
        let root = Path::new("/ws");
        let env = Some(OsString::from("/from-env"));
        assert_eq!(
            resolve_cache(Some("/cli"), env.clone(), root),
            PathBuf::from("/cli")
        );
        assert_eq!(resolve_cache(None, env, root), PathBuf::from("/from-env"));
        assert_eq!(
            resolve_cache(None, Some(OsString::new()), root),
            PathBuf::from("/ws/target/patchcore-cache")
        );
        assert_eq!(
            resolve_cache(None, None, root),
            PathBuf::from("/ws/target/patchcore-cache")
        );
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
