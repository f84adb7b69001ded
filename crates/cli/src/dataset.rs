//! Image folders: MVTec AD layout (`train/good`, `test/<kind>/`) or plain folders of images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// File suffixes taken as images (case-insensitive). The content decides the format when decoding.
const IMAGE_SUFFIXES: &[&str] = &[
    "png", "jpg", "jpeg", "bmp", "tif", "tiff", "gif", "webp", "pnm", "pgm", "ppm", "pbm", "tga",
    "ico", "qoi", "hdr", "exr", "dds", "ff",
];

/// One test image and its kind (the name of its folder under `test/`).
#[derive(Debug, Clone)]
pub struct TestImage {
    pub path: PathBuf,
    pub kind: String,
}

/// The image files directly inside `dir`, sorted by name.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read the folder {}", dir.display()))?
            .path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_SUFFIXES.contains(&e.to_ascii_lowercase().as_str()));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Training images: `<data>/train/good/` when it exists, else the images directly in `<data>`.
pub fn train_images(data: &Path) -> Result<Vec<PathBuf>> {
    let good = data.join("train").join("good");
    let dir = if good.is_dir() {
        good
    } else {
        data.to_path_buf()
    };
    let files = images_in(&dir)?;
    if files.is_empty() {
        bail!(
            "no training images in {} (expected image files such as .png or .jpg; suffixes taken: {})",
            dir.display(),
            IMAGE_SUFFIXES.join(", ")
        );
    }
    Ok(files)
}

/// Test images: every image in `<data>/test/<kind>/`, kinds in name order.
pub fn test_images(data: &Path) -> Result<Vec<TestImage>> {
    let test = data.join("test");
    let entries = std::fs::read_dir(&test).with_context(|| {
        format!(
            "cannot read {} (expected a folder in MVTec layout with test/<kind>/ subfolders)",
            test.display()
        )
    })?;
    let mut kinds = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read the folder {}", test.display()))?
            .path();
        if path.is_dir() {
            kinds.push(path);
        }
    }
    kinds.sort();
    let mut out = Vec::new();
    for dir in kinds {
        let kind = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("a test folder name is not valid UTF-8")?
            .to_string();
        out.extend(images_in(&dir)?.into_iter().map(|path| TestImage {
            path,
            kind: kind.clone(),
        }));
    }
    if out.is_empty() {
        bail!("no test images in {}/<kind>/", test.display());
    }
    Ok(out)
}

/// The ground-truth mask of a test image in MVTec AD layout: `<data>/ground_truth/<kind>/<stem>_mask.png`, if it
/// exists. Good images have none.
pub fn mask_for(data: &Path, kind: &str, image: &Path) -> Option<PathBuf> {
    if kind == "good" {
        return None;
    }
    let stem = image.file_stem()?.to_str()?;
    let path = data
        .join("ground_truth")
        .join(kind)
        .join(format!("{stem}_mask.png"));
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_read_and_empty_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("train/good")).unwrap();
        std::fs::create_dir_all(root.join("test/good")).unwrap();
        std::fs::create_dir_all(root.join("test/crack")).unwrap();
        let err = train_images(root).unwrap_err().to_string();
        assert!(err.contains("no training images"), "{err}");
        for p in [
            "train/good/b.png",
            "train/good/a.PNG",
            "train/good/notes.txt",
            "test/good/x.jpg",
            "test/crack/y.png",
        ] {
            std::fs::write(root.join(p), b"x").unwrap();
        }
        let train = train_images(root).unwrap();
        assert_eq!(train.len(), 2);
        assert!(train[0].ends_with("a.PNG"));
        let test = test_images(root).unwrap();
        assert_eq!(
            test.iter().map(|t| t.kind.as_str()).collect::<Vec<_>>(),
            ["crack", "good"]
        );
        assert!(test_images(&root.join("missing")).is_err());
    }
}
