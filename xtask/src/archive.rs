//! Safe extraction of `.tar.xz` archives.
//!
//! Only plain files and folders are written, and only below the target
//! folder: an entry with an absolute path or a `..` component, a symbolic or
//! hard link, a device file or a FIFO makes the extraction fail. Since no
//! link is ever created, no later entry can be redirected outside the target
//! through one. File modes, owners and times from the archive are ignored.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use tar::EntryType;

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The number of files written.
    pub files: usize,
    /// The number of entries that the filter left out.
    pub skipped: usize,
}

/// Extracts the `.tar.xz` archive at `archive` into the existing folder `into`.
///
/// `keep` sees each entry's relative path (already checked to be safe) and
/// decides whether to extract it. Any unsafe entry fails the whole
/// extraction, as does a damaged xz stream (xz carries its own checksums).
pub fn extract_tar_xz(
    archive: &Path,
    into: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<Extracted> {
    let file =
        File::open(archive).with_context(|| format!("could not open {}", archive.display()))?;
    let xz = lzma_rust2::XzReader::new(BufReader::with_capacity(1 << 20, file), true);
    extract_tar(xz, into, keep).with_context(|| format!("could not extract {}", archive.display()))
}

/// Extracts a tar stream into the existing folder `into`; see [`extract_tar_xz`].
pub fn extract_tar(
    reader: impl io::Read,
    into: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> Result<Extracted> {
    let mut archive = tar::Archive::new(reader);
    let mut extracted = Extracted::default();
    let entries = archive.entries().context("could not read the tar stream")?;
    for entry in entries {
        let mut entry = entry.context("could not read a tar entry")?;
        let raw = entry
            .path()
            .context("a tar entry has an unreadable path")?
            .into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let relative = safe_relative(&raw)?;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|target| target.display().to_string())
                    .unwrap_or_default();
                bail!(
                    "the entry {} is a link (to `{target}`); links are refused",
                    raw.display()
                );
            }
            other => bail!(
                "the entry {} has the type {other:?}; only plain files and folders are accepted",
                raw.display()
            ),
        }
        let Some(relative) = relative else {
            // The archive's root folder itself (`.` or `./`).
            continue;
        };
        if !keep(&relative) {
            extracted.skipped += 1;
            continue;
        }
        let dest = into.join(&relative);
        if kind == EntryType::Directory {
            fs::create_dir_all(&dest)
                .with_context(|| format!("could not create the folder {}", dest.display()))?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("could not create the folder {}", parent.display()))?;
        }
        if dest.is_dir() {
            bail!(
                "the entry {} names a file where a folder was already extracted",
                raw.display()
            );
        }
        let out =
            File::create(&dest).with_context(|| format!("could not create {}", dest.display()))?;
        let mut writer = BufWriter::new(out);
        io::copy(&mut entry, &mut writer)
            .with_context(|| format!("could not extract the entry {}", raw.display()))?;
        writer
            .flush()
            .with_context(|| format!("could not write {}", dest.display()))?;
        extracted.files += 1;
    }
    Ok(extracted)
}

/// Checks that an entry path stays below the target folder, and returns it
/// without `.` components (`None` for the root folder itself).
fn safe_relative(path: &Path) -> Result<Option<PathBuf>> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => bail!(
                "the entry {} contains a `..` component; refusing to extract outside the target folder",
                path.display()
            ),
            Component::RootDir | Component::Prefix(_) => bail!(
                "the entry {} has an absolute path; refusing to extract outside the target folder",
                path.display()
            ),
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// One entry of a test archive.
    #[derive(Debug, Clone)]
    pub enum TestEntry {
        /// A file with contents.
        File(String, Vec<u8>),
        /// A folder.
        Dir(String),
        /// A symbolic link to a target.
        Symlink(String, String),
        /// A hard link to a target.
        HardLink(String, String),
        /// A character device.
        CharDevice(String),
    }

    /// Builds an uncompressed tar archive, writing names into the raw header
    /// so that unsafe names (`..`, absolute) are kept as they are.
    pub fn tar_bytes(entries: &[TestEntry]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            let (name, kind, data, link): (&str, EntryType, &[u8], Option<&str>) = match entry {
                TestEntry::File(name, data) => (name, EntryType::Regular, data, None),
                TestEntry::Dir(name) => (name, EntryType::Directory, &[], None),
                TestEntry::Symlink(name, target) => (name, EntryType::Symlink, &[], Some(target)),
                TestEntry::HardLink(name, target) => (name, EntryType::Link, &[], Some(target)),
                TestEntry::CharDevice(name) => (name, EntryType::Char, &[], None),
            };
            let raw = &mut header.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                let raw = &mut header.as_old_mut().linkname;
                raw[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// Compresses bytes as xz.
    pub fn xz(bytes: &[u8]) -> Vec<u8> {
        let options = lzma_rust2::XzOptions::with_preset(1);
        let mut writer = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
        writer.write_all(bytes).unwrap();
        writer.finish().unwrap()
    }

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-archive-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Lists every path below `dir`, relative to it, sorted.
    pub fn tree(dir: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
                if path.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    #[test]
    fn extracts_files_and_folders_from_tar_xz() {
        let dir = test_dir("ok");
        let archive = dir.join("a.tar.xz");
        let tar = tar_bytes(&[
            TestEntry::Dir("./".into()),
            TestEntry::Dir("bottle/".into()),
            TestEntry::File("bottle/train/good/000.png".into(), b"png".to_vec()),
            TestEntry::File("./readme.txt".into(), b"hi".to_vec()),
        ]);
        fs::write(&archive, xz(&tar)).unwrap();
        let out = dir.join("out");
        fs::create_dir(&out).unwrap();
        let done = extract_tar_xz(&archive, &out, &|path| path.starts_with("bottle")).unwrap();
        assert_eq!(
            done,
            Extracted {
                files: 1,
                skipped: 1
            }
        );
        assert_eq!(
            tree(&out),
            [
                "bottle",
                "bottle/train",
                "bottle/train/good",
                "bottle/train/good/000.png"
            ]
        );
        assert_eq!(
            fs::read(out.join("bottle/train/good/000.png")).unwrap(),
            b"png"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_unsafe_entries_and_writes_nothing_outside() {
        let cases = [
            (
                TestEntry::File("../escape.txt".into(), b"x".to_vec()),
                "`..`",
            ),
            (
                TestEntry::File("a/../../escape.txt".into(), b"x".to_vec()),
                "`..`",
            ),
            (
                TestEntry::File("/tmp/xtask-absolute-escape.txt".into(), b"x".to_vec()),
                "absolute",
            ),
            (TestEntry::Symlink("a/link".into(), "/etc".into()), "link"),
            (
                TestEntry::HardLink("a/hard".into(), "../../outside".into()),
                "link",
            ),
            (TestEntry::CharDevice("a/dev".into()), "only plain files"),
        ];
        for (index, (entry, expected)) in cases.into_iter().enumerate() {
            let dir = test_dir(&format!("unsafe-{index}"));
            let out = dir.join("out");
            fs::create_dir(&out).unwrap();
            let tar = tar_bytes(&[entry]);
            let err = extract_tar(&tar[..], &out, &|_| true).unwrap_err();
            assert!(
                format!("{err:#}").contains(expected),
                "case {index}: {err:#}"
            );
            assert_eq!(tree(&dir), ["out"], "case {index}");
            fs::remove_dir_all(&dir).unwrap();
        }
        assert!(!Path::new("/tmp/xtask-absolute-escape.txt").exists());
    }

    #[test]
    fn a_damaged_xz_stream_is_an_error() {
        let dir = test_dir("damaged");
        let tar = tar_bytes(&[TestEntry::File(
            "a.bin".into(),
            (0..100_000u32).map(|i| (i % 7) as u8).collect(),
        )]);
        let mut bytes = xz(&tar);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xFF;
        let archive = dir.join("a.tar.xz");
        fs::write(&archive, bytes).unwrap();
        let out = dir.join("out");
        fs::create_dir(&out).unwrap();
        let err = extract_tar_xz(&archive, &out, &|_| true).unwrap_err();
        assert!(format!("{err:#}").contains("could not extract"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
