//! The MVTec AD data set, downloaded from its publisher and extracted safely.
//!
//! MVTec publishes the whole set as one `.tar.xz` archive (about 4.9 GB) and
//! each of the 15 categories as its own archive, on a `mydrive.ch` share. The
//! publisher states no checksums. For the whole-set archive this module checks
//! the sha256 that anomalib records for it
//! (`src/anomalib/data/datamodules/image/mvtecad.py`, `DOWNLOAD_INFO.hashsum`,
//! checked with sha256 by `anomalib.data.utils.download.check_hash`). No
//! checksum is documented for the per-category archives, so for them the
//! transfer is checked to be complete, xz's own block checksums are checked
//! while extracting, and the extracted tree must have the MVTec layout.
//!
//! Each category lands in `<cache>/data/mvtec/<category>/` with `train/good/`,
//! `test/<kind>/` and `ground_truth/<defect>/<name>_mask.png`. It is extracted
//! into a scratch folder next to it and renamed into place only once its
//! layout checks out, so an existing category folder is complete and is not
//! fetched again. An archive is removed once its categories are in place, and
//! also when it turns out corrupt.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::archive;
use crate::args::Options;
use crate::download::{Checksum, Downloader};
use crate::fsutil::{count_pngs, ScratchDir};
use crate::paths;

/// The environment variable that points the download at a mirror.
pub const URL_BASE_ENV: &str = "PATCHCORE_MVTEC_URL_BASE";

/// The publisher's download share; every archive URL starts with it.
const SHARE: &str = "https://www.mydrive.ch/shares/";

/// The whole-set archive: its path below [`SHARE`] and its file name.
const WHOLE: (&str, &str) = (
    "38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094",
    "mvtec_anomaly_detection.tar.xz",
);

/// The sha256 of the whole-set archive, as anomalib records it.
pub const WHOLE_SHA256: &str = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d";

/// The 15 categories and the path of each one's archive below [`SHARE`]; the
/// archive's file name is `<category>.tar.xz`.
pub const CATEGORIES: [(&str, &str); 15] = [
    (
        "bottle",
        "38536/3830184030e49fe74747669442f0f282/download/420937370-1629951468",
    ),
    (
        "cable",
        "38536/3830184030e49fe74747669442f0f282/download/420937413-1629951498",
    ),
    (
        "capsule",
        "38536/3830184030e49fe74747669442f0f282/download/420937454-1629951595",
    ),
    (
        "carpet",
        "38536/3830184030e49fe74747669442f0f282/download/420937484-1629951672",
    ),
    (
        "grid",
        "38536/3830184030e49fe74747669442f0f282/download/420937487-1629951814",
    ),
    (
        "hazelnut",
        "38536/3830184030e49fe74747669442f0f282/download/420937545-1629951845",
    ),
    (
        "leather",
        "38536/3830184030e49fe74747669442f0f282/download/420937607-1629951964",
    ),
    (
        "metal_nut",
        "38536/3830184030e49fe74747669442f0f282/download/420937637-1629952063",
    ),
    (
        "pill",
        "43421/11a215a5749fcfb75e331ddd5f8e43ee/download/420938129-1629953099",
    ),
    (
        "screw",
        "38536/3830184030e49fe74747669442f0f282/download/420938130-1629953152",
    ),
    (
        "tile",
        "38536/3830184030e49fe74747669442f0f282/download/420938133-1629953189",
    ),
    (
        "toothbrush",
        "38536/3830184030e49fe74747669442f0f282/download/420938134-1629953256",
    ),
    (
        "transistor",
        "38536/3830184030e49fe74747669442f0f282/download/420938166-1629953277",
    ),
    (
        "wood",
        "38536/3830184030e49fe74747669442f0f282/download/420938383-1629953354",
    ),
    (
        "zipper",
        "38536/3830184030e49fe74747669442f0f282/download/420938385-1629953449",
    ),
];

/// Where the archives come from and what they must hash to.
#[derive(Debug, Clone)]
pub struct Source {
    /// A mirror serving `<base>/<file name>`, or `None` for the publisher.
    pub base: Option<String>,
    /// The sha256 of the whole-set archive, if known.
    pub whole_sha256: Option<String>,
}

impl Source {
    /// The publisher's archives, or a mirror of them at `base`, with the
    /// whole-set archive's recorded sha256.
    pub fn official(base: Option<String>) -> Self {
        Self {
            base,
            whole_sha256: Some(WHOLE_SHA256.to_owned()),
        }
    }

    /// Returns the URL of the archive `file_name` whose publisher path is `share_path`.
    fn url(&self, share_path: &str, file_name: &str) -> String {
        match &self.base {
            Some(base) => format!("{}/{file_name}", base.trim_end_matches('/')),
            None => format!("{SHARE}{share_path}/{file_name}"),
        }
    }
}

/// The image counts of one extracted category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Images in `train/good/`.
    pub train_good: usize,
    /// Images in `test/good/`.
    pub test_good: usize,
    /// Images in the other `test/<defect>/` folders.
    pub test_defect: usize,
    /// The number of defect kinds.
    pub defect_kinds: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} train/good, {} test/good, {} test defects of {} kinds (each with a mask)",
            self.train_good, self.test_good, self.test_defect, self.defect_kinds
        )
    }
}

/// Runs `cargo xtask download mvtec [--category NAME]… [--cache DIR] [--url-base URL]`.
pub fn command(args: &[String]) -> Result<()> {
    let Some((what, rest)) = args.split_first() else {
        bail!("`download` needs a target: `mvtec`");
    };
    if what != "mvtec" {
        bail!("unknown download target `{what}`: expected `mvtec`");
    }
    let (names, rest) = take_repeated(rest, "--category")?;
    let options = Options::parse(&rest, &["--cache", "--url-base", "--category"], &[])?;
    let cache = paths::cache_dir(options.value("--cache"))?;
    let mut categories = Vec::new();
    for name in &names {
        let Some(&(known, _)) = CATEGORIES.iter().find(|(known, _)| known == name) else {
            let all: Vec<&str> = CATEGORIES.iter().map(|(name, _)| *name).collect();
            bail!(
                "`--category {name}`: unknown MVTec AD category; expected one of {}",
                all.join(", ")
            );
        };
        if !categories.contains(&known) {
            categories.push(known);
        }
    }
    let base = match options.value("--url-base") {
        Some(base) => Some(base.to_owned()),
        None => std::env::var(URL_BASE_ENV)
            .ok()
            .filter(|base| !base.is_empty()),
    };
    let root = fetch(
        &cache,
        &categories,
        &Source::official(base),
        &Downloader::default(),
    )?;
    println!("{}", root.display());
    Ok(())
}

/// Splits the values of a repeatable option `name` (`--name V` or
/// `--name=V`) from the other arguments.
fn take_repeated(args: &[String], name: &str) -> Result<(Vec<String>, Vec<String>)> {
    let mut values = Vec::new();
    let mut rest = Vec::new();
    let mut iter = args.iter();
    let inline = format!("{name}=");
    while let Some(arg) = iter.next() {
        if arg == name {
            match iter.next() {
                Some(value) if !value.is_empty() => values.push(value.clone()),
                _ => bail!("option `{name}` needs a value"),
            }
        } else if let Some(value) = arg.strip_prefix(&inline) {
            if value.is_empty() {
                bail!("option `{name}` needs a non-empty value");
            }
            values.push(value.to_owned());
        } else {
            rest.push(arg.clone());
        }
    }
    Ok((values, rest))
}

/// Makes sure the categories (all 15 when `categories` is empty) are extracted
/// under `<cache>/data/mvtec/`, and returns that folder.
///
/// All categories come from the whole-set archive; named ones come from their
/// own archives. Categories already in place are skipped without any request.
pub fn fetch(
    cache: &Path,
    categories: &[&str],
    source: &Source,
    downloader: &Downloader,
) -> Result<PathBuf> {
    let root = cache.join("data").join("mvtec");
    let downloads = cache.join("downloads").join("mvtec");
    let wanted: Vec<&str> = if categories.is_empty() {
        CATEGORIES.iter().map(|(name, _)| *name).collect()
    } else {
        categories.to_vec()
    };
    let pending: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|name| !is_complete(&root.join(name)))
        .collect();
    for name in wanted.iter().filter(|name| !pending.contains(name)) {
        eprintln!(
            "xtask: MVTec AD `{name}` is already in {}",
            root.join(name).display()
        );
    }
    if pending.is_empty() {
        return Ok(root);
    }

    // Each job is one archive and the categories to take from it.
    let mut jobs: Vec<(String, String, Checksum, Vec<&str>)> = Vec::new();
    if categories.is_empty() {
        let checksum = source
            .whole_sha256
            .clone()
            .map_or(Checksum::Unknown, Checksum::Sha256);
        jobs.push((
            WHOLE.1.to_owned(),
            source.url(WHOLE.0, WHOLE.1),
            checksum,
            pending,
        ));
    } else {
        for name in pending {
            let share_path = CATEGORIES
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, path)| *path)
                .with_context(|| format!("unknown MVTec AD category `{name}`"))?;
            let file_name = format!("{name}.tar.xz");
            let url = source.url(share_path, &file_name);
            jobs.push((file_name, url, Checksum::Unknown, vec![name]));
        }
    }

    for (file_name, url, checksum, names) in jobs {
        let archive_path = downloads.join(&file_name);
        eprintln!("xtask: fetching {url}");
        downloader.fetch(&url, &archive_path, &checksum)?;
        eprintln!("xtask: extracting {}", archive_path.display());
        match install(&archive_path, &names, &root) {
            Ok(counts) => {
                for (name, counts) in names.iter().zip(counts) {
                    eprintln!("xtask: MVTec AD `{name}`: {counts}");
                }
            }
            Err(err) => {
                let removed = fs::remove_file(&archive_path).is_ok();
                let note = if removed {
                    format!(
                        "the archive {} was removed; run the command again to download it afresh",
                        archive_path.display()
                    )
                } else {
                    format!(
                        "remove the archive {} and run again",
                        archive_path.display()
                    )
                };
                return Err(err.context(format!(
                    "the archive from {url} is corrupt or not in MVTec AD layout; {note}"
                )));
            }
        }
        fs::remove_file(&archive_path)
            .with_context(|| format!("could not remove {}", archive_path.display()))?;
    }
    Ok(root)
}

/// Tells whether `dir` holds an extracted category.
///
/// Categories are renamed into place only after their layout was checked, so
/// the presence of the two top folders is enough.
fn is_complete(dir: &Path) -> bool {
    dir.join("train").join("good").is_dir() && dir.join("test").is_dir()
}

/// Extracts the categories `names` from `archive` and moves each into `root`.
fn install(archive: &Path, names: &[&str], root: &Path) -> Result<Vec<Counts>> {
    let stem = archive
        .file_name()
        .map(|name| name.to_string_lossy().replace(".tar.xz", ""))
        .unwrap_or_default();
    let scratch = ScratchDir::new(root, &format!("extract-{stem}"))?;
    let keep = |path: &Path| {
        path.components()
            .next()
            .and_then(|first| first.as_os_str().to_str())
            .is_some_and(|first| names.contains(&first))
    };
    archive::extract_tar_xz(archive, scratch.path(), &keep)?;
    let mut all_counts = Vec::new();
    for name in names {
        let dir = scratch.path().join(name);
        if !dir.is_dir() {
            bail!("the archive {} has no folder `{name}/`", archive.display());
        }
        let counts = check_layout(&dir)
            .with_context(|| format!("the category `{name}` in {}", archive.display()))?;
        all_counts.push(counts);
    }
    for name in names {
        let dest = root.join(name);
        if dest.exists() {
            eprintln!("xtask: replacing the incomplete folder {}", dest.display());
            fs::remove_dir_all(&dest)
                .with_context(|| format!("could not remove {}", dest.display()))?;
        }
        let from = scratch.path().join(name);
        fs::rename(&from, &dest).with_context(|| {
            format!("could not rename {} to {}", from.display(), dest.display())
        })?;
    }
    Ok(all_counts)
}

/// Checks the MVTec AD layout of one category folder and counts its images.
///
/// `train/good/` must hold images, `test/` must hold at least one folder, and
/// every image `test/<defect>/<name>.png` of a defect kind must have its mask
/// `ground_truth/<defect>/<name>_mask.png`.
pub fn check_layout(dir: &Path) -> Result<Counts> {
    let mut counts = Counts {
        train_good: count_pngs(&dir.join("train").join("good"))?,
        ..Counts::default()
    };
    if counts.train_good == 0 {
        bail!(
            "{} holds no .png images",
            dir.join("train").join("good").display()
        );
    }
    let test = dir.join("test");
    let kinds = subfolders(&test)?;
    if kinds.is_empty() {
        bail!("{} holds no folders", test.display());
    }
    for kind in kinds {
        let images = pngs(&test.join(&kind))?;
        if kind == "good" {
            counts.test_good = images.len();
            continue;
        }
        counts.defect_kinds += 1;
        counts.test_defect += images.len();
        for image in images {
            let stem = image.strip_suffix(".png").unwrap_or(&image);
            let mask = dir
                .join("ground_truth")
                .join(&kind)
                .join(format!("{stem}_mask.png"));
            if !mask.is_file() {
                bail!(
                    "the test image {} has no mask: expected {}",
                    test.join(&kind).join(&image).display(),
                    mask.display()
                );
            }
        }
    }
    Ok(counts)
}

/// Lists the names of the folders in `dir`, sorted; a missing `dir` has none.
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    list(dir, |path| path.is_dir())
}

/// Lists the names of the `.png` files in `dir`, sorted.
fn pngs(dir: &Path) -> Result<Vec<String>> {
    list(dir, |path| {
        path.is_file()
            && path
                .extension()
                .is_some_and(|ext| ext.eq_ignore_ascii_case("png"))
    })
}

/// Lists the names of the entries of `dir` that `wanted` accepts, sorted.
fn list(dir: &Path, wanted: impl Fn(&Path) -> bool) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("could not list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        if wanted(&entry.path()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::tests::{tar_bytes, tree, xz, TestEntry};
    use crate::download::{part_path, sha256_hex};
    use crate::testserver::{Behaviour, TestServer};
    use std::time::Duration;

    fn test_cache(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-mvtec-{name}-{}", std::process::id()));
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

    /// Pseudo-random bytes, so that the archive does not compress to nothing.
    fn noise(seed: u32, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    /// The entries of one synthetic category in MVTec layout.
    fn category_entries(name: &str) -> Vec<TestEntry> {
        let file = |path: String, seed: u32| TestEntry::File(path, noise(seed, 3000));
        vec![
            TestEntry::Dir(format!("{name}/")),
            file(format!("{name}/train/good/000.png"), 1),
            file(format!("{name}/train/good/001.png"), 2),
            file(format!("{name}/test/good/000.png"), 3),
            file(format!("{name}/test/crack/000.png"), 4),
            file(format!("{name}/test/crack/001.png"), 5),
            file(format!("{name}/ground_truth/crack/000_mask.png"), 6),
            file(format!("{name}/ground_truth/crack/001_mask.png"), 7),
            file(format!("{name}/license.txt"), 8),
        ]
    }

    fn category_archive(name: &str) -> Vec<u8> {
        xz(&tar_bytes(&category_entries(name)))
    }

    fn whole_archive() -> Vec<u8> {
        let mut entries = vec![TestEntry::File("readme.txt".into(), b"MVTec AD".to_vec())];
        for (name, _) in CATEGORIES {
            entries.extend(category_entries(name));
        }
        xz(&tar_bytes(&entries))
    }

    fn mirror(server: &TestServer, whole_sha256: Option<String>) -> Source {
        Source {
            base: Some(server.url("/mvtec")),
            whole_sha256,
        }
    }

    const EXPECTED: Counts = Counts {
        train_good: 2,
        test_good: 1,
        test_defect: 2,
        defect_kinds: 1,
    };

    #[test]
    fn official_urls_have_the_publisher_layout() {
        let source = Source::official(None);
        assert_eq!(
            source.url(WHOLE.0, WHOLE.1),
            format!("{SHARE}{}/{}", WHOLE.0, WHOLE.1)
        );
        assert!(source
            .url(CATEGORIES[8].1, "pill.tar.xz")
            .ends_with("/download/420938129-1629953099/pill.tar.xz"));
        assert_eq!(
            Source::official(Some("http://h/m/".into())).url(WHOLE.0, "bottle.tar.xz"),
            "http://h/m/bottle.tar.xz"
        );
        assert_eq!(WHOLE_SHA256.len(), 64);
    }

    #[test]
    fn repeated_categories_are_collected() {
        let args: Vec<String> = ["--category", "bottle", "--cache", "/c", "--category=pill"]
            .iter()
            .map(|arg| (*arg).to_owned())
            .collect();
        let (values, rest) = take_repeated(&args, "--category").unwrap();
        assert_eq!(values, ["bottle", "pill"]);
        assert_eq!(rest, ["--cache", "/c"]);
        assert!(take_repeated(&["--category".to_owned()], "--category").is_err());
    }

    #[test]
    fn unknown_categories_are_refused_by_name() {
        let args: Vec<String> = [
            "mvtec",
            "--category",
            "bottel",
            "--cache",
            "/nonexistent-xtask",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let err = command(&args).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`--category bottel`"), "{text}");
        assert!(text.contains("bottle, cable"), "{text}");
    }

    #[test]
    fn whole_set_is_downloaded_verified_extracted_and_not_fetched_again() {
        let cache = test_cache("whole");
        let archive = whole_archive();
        let server = TestServer::start();
        server.serve(
            "/mvtec/mvtec_anomaly_detection.tar.xz",
            archive.clone(),
            Behaviour::Normal,
        );
        let source = mirror(&server, Some(sha256_hex(&archive)));
        let root = fetch(&cache, &[], &source, &quiet()).unwrap();
        assert_eq!(root, cache.join("data").join("mvtec"));
        for (name, _) in CATEGORIES {
            assert_eq!(check_layout(&root.join(name)).unwrap(), EXPECTED, "{name}");
        }
        assert_eq!(
            tree(&root.join("bottle")),
            [
                "ground_truth",
                "ground_truth/crack",
                "ground_truth/crack/000_mask.png",
                "ground_truth/crack/001_mask.png",
                "license.txt",
                "test",
                "test/crack",
                "test/crack/000.png",
                "test/crack/001.png",
                "test/good",
                "test/good/000.png",
                "train",
                "train/good",
                "train/good/000.png",
                "train/good/001.png",
            ]
        );
        assert_eq!(
            fs::read(root.join("zipper/test/crack/001.png")).unwrap(),
            noise(5, 3000)
        );
        // Only the categories are kept: no scratch folder, no readme, no archive.
        let mut top: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        let mut names: Vec<&str> = CATEGORIES.iter().map(|(name, _)| *name).collect();
        names.sort();
        assert_eq!(top, names);
        assert!(tree(&cache.join("downloads"))
            .iter()
            .all(|path| !path.ends_with(".xz")));
        assert_eq!(server.requests().len(), 1);

        // A second run finds everything in place and makes no request.
        fetch(&cache, &[], &source, &quiet()).unwrap();
        fetch(&cache, &["bottle"], &source, &quiet()).unwrap();
        assert_eq!(server.requests().len(), 1);
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn an_interrupted_category_download_resumes() {
        let cache = test_cache("resume");
        let archive = category_archive("bottle");
        let cut = archive.len() / 2;
        let server = TestServer::start();
        server.serve(
            "/mvtec/bottle.tar.xz",
            archive.clone(),
            Behaviour::DropFirstAfter(cut),
        );
        let root = fetch(&cache, &["bottle"], &mirror(&server, None), &quiet()).unwrap();
        assert_eq!(check_layout(&root.join("bottle")).unwrap(), EXPECTED);
        let requests = server.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[0].range, None);
        assert_eq!(requests[1].range, Some(format!("bytes={cut}-")));
        assert_eq!(
            fs::read(root.join("bottle/train/good/001.png")).unwrap(),
            noise(2, 3000)
        );
        assert!(!root.join("cable").exists());
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn a_whole_archive_with_the_wrong_sha256_is_reported_and_removed() {
        let cache = test_cache("bad-sha");
        let mut archive = whole_archive();
        let good = sha256_hex(&archive);
        let last = archive.len() - 100;
        archive[last] ^= 0x01;
        let server = TestServer::start();
        server.serve(
            "/mvtec/mvtec_anomaly_detection.tar.xz",
            archive.clone(),
            Behaviour::Normal,
        );
        let err = fetch(&cache, &[], &mirror(&server, Some(good.clone())), &quiet()).unwrap_err();
        let text = format!("{err:#}");
        let dest = cache.join("downloads/mvtec/mvtec_anomaly_detection.tar.xz");
        assert!(text.contains("checksum mismatch"), "{text}");
        assert!(text.contains(&dest.display().to_string()), "{text}");
        assert!(text.contains(&good), "{text}");
        assert!(text.contains(&sha256_hex(&archive)), "{text}");
        assert!(!dest.exists());
        assert!(!part_path(&dest).exists());
        assert!(!cache.join("data/mvtec/bottle").exists());
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn a_corrupt_category_archive_is_reported_and_removed() {
        let cache = test_cache("corrupt");
        let mut archive = category_archive("bottle");
        let middle = archive.len() / 2;
        archive[middle] ^= 0xFF;
        let server = TestServer::start();
        server.serve("/mvtec/bottle.tar.xz", archive, Behaviour::Normal);
        let err = fetch(&cache, &["bottle"], &mirror(&server, None), &quiet()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("corrupt"), "{text}");
        assert!(text.contains("was removed"), "{text}");
        assert!(!cache.join("downloads/mvtec/bottle.tar.xz").exists());
        let root = cache.join("data/mvtec");
        assert_eq!(
            tree(&root),
            Vec::<String>::new(),
            "nothing may be left half-extracted"
        );
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn an_archive_without_the_mvtec_layout_is_refused() {
        let cache = test_cache("layout");
        let entries = vec![
            TestEntry::File("bottle/train/good/000.png".into(), b"x".to_vec()),
            TestEntry::File("bottle/test/crack/000.png".into(), b"x".to_vec()),
        ];
        let server = TestServer::start();
        server.serve(
            "/mvtec/bottle.tar.xz",
            xz(&tar_bytes(&entries)),
            Behaviour::Normal,
        );
        let err = fetch(&cache, &["bottle"], &mirror(&server, None), &quiet()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("000_mask.png"), "{text}");
        assert!(!cache.join("data/mvtec/bottle").exists());
        assert!(!cache.join("downloads/mvtec/bottle.tar.xz").exists());
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn a_malicious_archive_is_refused_and_writes_nothing_outside() {
        let outside =
            std::env::temp_dir().join(format!("xtask-mvtec-absolute-{}", std::process::id()));
        let _ = fs::remove_file(&outside);
        let cases = [
            TestEntry::File("bottle/../../../escape.txt".into(), b"x".to_vec()),
            TestEntry::File(outside.display().to_string(), b"x".to_vec()),
        ];
        for (index, bad) in cases.into_iter().enumerate() {
            let cache = test_cache(&format!("malicious-{index}"));
            let mut entries = category_entries("bottle");
            entries.insert(2, bad);
            let server = TestServer::start();
            server.serve(
                "/mvtec/bottle.tar.xz",
                xz(&tar_bytes(&entries)),
                Behaviour::Normal,
            );
            let err = fetch(&cache, &["bottle"], &mirror(&server, None), &quiet()).unwrap_err();
            let text = format!("{err:#}");
            assert!(
                text.contains("refusing to extract outside"),
                "case {index}: {text}"
            );
            assert_eq!(
                tree(&cache),
                ["data", "data/mvtec", "downloads", "downloads/mvtec"],
                "case {index}"
            );
            assert!(!cache.parent().unwrap().join("escape.txt").exists());
            fs::remove_dir_all(&cache).unwrap();
        }
        assert!(!outside.exists());
    }
}
