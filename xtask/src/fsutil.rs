//! File-system helpers: scratch folders that clean up after themselves, and
//! linking or copying files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A folder for work in progress, named `.<label>.tmp-<pid>` inside a parent.
///
/// It is removed when dropped, unless it was renamed into place with
/// [`ScratchDir::persist_as`]. Since it lies next to its destination, that
/// rename stays on one file system and is atomic, so an interrupted run never
/// leaves a half-built destination behind.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh scratch folder in `parent`, first removing the scratch
    /// folders with the same label that runs which no longer exist left behind.
    pub fn new(parent: &Path, label: &str) -> Result<Self> {
        fs::create_dir_all(parent)
            .with_context(|| format!("could not create the folder {}", parent.display()))?;
        remove_stale(parent, label)?;
        let path = parent.join(format!(".{label}.tmp-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("could not remove {}", path.display()))?;
        }
        fs::create_dir(&path)
            .with_context(|| format!("could not create the folder {}", path.display()))?;
        Ok(Self { path })
    }

    /// Returns the scratch folder's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the scratch folder to `dest`, which must not exist yet.
    pub fn persist_as(self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).with_context(|| {
            format!(
                "could not rename {} to {}",
                self.path.display(),
                dest.display()
            )
        })
        // On success the drop below finds nothing left to remove.
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.path.exists() {
            // A failure here only leaves a scratch folder that the next run removes.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes the `.<label>.tmp-<pid>` folders in `parent` whose process is gone.
fn remove_stale(parent: &Path, label: &str) -> Result<()> {
    let prefix = format!(".{label}.tmp-");
    let entries =
        fs::read_dir(parent).with_context(|| format!("could not list {}", parent.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", parent.display()))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix(&prefix)) else {
            continue;
        };
        if !process_alive(pid) {
            let stale = entry.path();
            eprintln!(
                "xtask: removing {} left by an interrupted run",
                stale.display()
            );
            fs::remove_dir_all(&stale)
                .with_context(|| format!("could not remove {}", stale.display()))?;
        }
    }
    Ok(())
}

/// Tells whether the process `pid` may still be running.
///
/// This asks `/proc` where there is one. Elsewhere it answers no, so a
/// concurrent run on such a system may lose its scratch folder and fail.
fn process_alive(pid: &str) -> bool {
    let proc = Path::new("/proc");
    proc.join("self").exists() && proc.join(pid).exists()
}

/// Hard-links `from` to `to`, or copies it where a link cannot be made.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(_) => fs::copy(from, to)
            .map(drop)
            .with_context(|| format!("could not copy {} to {}", from.display(), to.display())),
    }
}

/// Counts the `.png` files directly inside `dir`; a missing folder counts zero.
pub fn count_pngs(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("could not list {}", dir.display())),
    };
    let mut count = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let is_png = Path::new(&entry.file_name())
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("png"));
        if is_png && entry.path().is_file() {
            count += 1;
        }
    }
    Ok(count)
}

/// Fails unless `path` is a file, naming `what` it should have been.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!(
            "expected {what} at {}, but there is no such file",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-fsutil-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn scratch_is_removed_on_drop_and_kept_when_persisted() {
        let root = test_root("scratch");
        let dropped = ScratchDir::new(&root, "a").unwrap();
        let dropped_path = dropped.path().to_path_buf();
        fs::write(dropped_path.join("f.png"), b"x").unwrap();
        drop(dropped);
        assert!(!dropped_path.exists());

        let kept = ScratchDir::new(&root, "a").unwrap();
        fs::write(kept.path().join("f.png"), b"x").unwrap();
        kept.persist_as(&root.join("done")).unwrap();
        assert_eq!(count_pngs(&root.join("done")).unwrap(), 1);
        assert_eq!(count_pngs(&root.join("missing")).unwrap(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn stale_scratch_of_a_dead_process_is_removed() {
        let root = test_root("stale");
        // Process ids never reach this value on Linux, so the owner counts as gone.
        let stale = root.join(".b.tmp-4294967295");
        fs::create_dir_all(&stale).unwrap();
        let fresh = ScratchDir::new(&root, "b").unwrap();
        assert!(!stale.exists());
        drop(fresh);
        fs::remove_dir_all(&root).unwrap();
    }
}
