//! The ELPV solar-cell data set, laid out as MVTec-style folders.
//!
//! The `elpv-dataset` wheel holds 2,624 electroluminescence images of solar
//! cells and a `labels.csv` that gives each one a defect probability (0, 1/3,
//! 2/3 or 1) and a cell type (`mono` or `poly`). For each type this module
//! builds `train/good/`, `test/good/` and `test/defect/`:
//!
//! * functional cells (probability 0), in file-name order, go to `test/good/`
//!   when their position modulo 3 is 2, and to `train/good/` otherwise;
//! * defective cells (probability 1) go to `test/defect/`;
//! * the uncertain cells (probability 1/3 or 2/3) are left out.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::fsutil::{self, ScratchDir};
use crate::pip;

/// The pip package whose wheel carries the data set.
const PACKAGE: &str = "elpv-dataset";

/// The folder inside the wheel that holds `labels.csv` and `images/`.
const WHEEL_DATA_DIR: &str = "elpv_dataset/data";

/// The manifest's name inside the layout; it is written last.
const MANIFEST: &str = "manifest.json";

/// The manifest format; a layout with another version is rebuilt.
const MANIFEST_VERSION: u64 = 1;

/// The split sizes that the mono cells must give.
pub const EXPECTED_MONO: SplitCounts = SplitCounts {
    train_good: 392,
    test_good: 196,
    test_defect: 313,
};

/// The two kinds of solar cell in the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellType {
    /// Monocrystalline cells.
    Mono,
    /// Polycrystalline cells.
    Poly,
}

impl CellType {
    /// Both cell types, in the order they are reported.
    pub const ALL: [CellType; 2] = [CellType::Mono, CellType::Poly];

    /// Returns the name used in `labels.csv` and for the layout's folders.
    pub fn name(self) -> &'static str {
        match self {
            CellType::Mono => "mono",
            CellType::Poly => "poly",
        }
    }

    /// Parses a name as written in `labels.csv`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.name() == name)
    }
}

/// What a cell's defect probability says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Probability 0: the cell works.
    Functional,
    /// Probability 1/3 or 2/3: the annotators were unsure.
    Uncertain,
    /// Probability 1: the cell is defective.
    Defective,
}

/// One line of `labels.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The image path relative to the data folder, such as `images/cell0001.png`.
    pub image: String,
    /// The condition read from the defect probability.
    pub condition: Condition,
    /// The cell type.
    pub cell_type: CellType,
}

impl Label {
    /// Returns the image's file name, such as `cell0001.png`.
    pub fn file_name(&self) -> &str {
        self.image.rsplit('/').next().unwrap_or(&self.image)
    }
}

/// Parses `labels.csv`: one cell per line, as `path probability type` separated
/// by whitespace. Blank lines are skipped; `source` names the file in errors.
pub fn parse_labels(text: &str, source: &str) -> Result<Vec<Label>> {
    let mut labels = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [image, probability, cell_type] = fields[..] else {
            bail!(
                "{source} line {number}: expected 3 whitespace-separated fields \
                 (image path, defect probability, cell type), found {}: `{line}`",
                fields.len()
            );
        };
        let probability: f64 = probability.parse().map_err(|_| {
            anyhow::anyhow!(
                "{source} line {number}: the defect probability `{probability}` is not a number"
            )
        })?;
        let Some(condition) = condition_of(probability) else {
            bail!(
                "{source} line {number}: the defect probability {probability} is not one of 0, 1/3, 2/3, 1"
            );
        };
        let Some(cell_type) = CellType::parse(cell_type) else {
            bail!(
                "{source} line {number}: the cell type `{cell_type}` is neither `mono` nor `poly`"
            );
        };
        if image.contains("..") || image.starts_with('/') || !image.ends_with(".png") {
            bail!("{source} line {number}: `{image}` is not a relative path to a PNG image");
        }
        labels.push(Label {
            image: image.to_owned(),
            condition,
            cell_type,
        });
    }
    Ok(labels)
}

/// Maps a defect probability to a condition, allowing for rounding.
fn condition_of(probability: f64) -> Option<Condition> {
    const TOLERANCE: f64 = 1e-3;
    let near = |value: f64| (probability - value).abs() < TOLERANCE;
    if near(0.0) {
        Some(Condition::Functional)
    } else if near(1.0) {
        Some(Condition::Defective)
    } else if near(1.0 / 3.0) || near(2.0 / 3.0) {
        Some(Condition::Uncertain)
    } else {
        None
    }
}

/// The images of one cell type, assigned to the layout's folders.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The functional cells to fit on.
    pub train_good: Vec<&'a Label>,
    /// The functional cells held out for testing.
    pub test_good: Vec<&'a Label>,
    /// The defective cells, all for testing.
    pub test_defect: Vec<&'a Label>,
}

impl Split<'_> {
    /// Returns how many images each folder gets.
    pub fn counts(&self) -> SplitCounts {
        SplitCounts {
            train_good: self.train_good.len(),
            test_good: self.test_good.len(),
            test_defect: self.test_defect.len(),
        }
    }

    /// Returns each folder, relative to the type's folder, with its images.
    fn folders(&self) -> [(&'static str, &[&Label]); 3] {
        [
            ("train/good", &self.train_good),
            ("test/good", &self.test_good),
            ("test/defect", &self.test_defect),
        ]
    }
}

/// Splits the cells of `cell_type` by the rule in this module's documentation.
pub fn split(labels: &[Label], cell_type: CellType) -> Split<'_> {
    let of_condition = |condition: Condition| {
        let mut chosen: Vec<&Label> = labels
            .iter()
            .filter(|label| label.cell_type == cell_type && label.condition == condition)
            .collect();
        chosen.sort_by(|a, b| a.file_name().cmp(b.file_name()));
        chosen
    };
    let mut result = Split {
        test_defect: of_condition(Condition::Defective),
        ..Split::default()
    };
    for (position, label) in of_condition(Condition::Functional).into_iter().enumerate() {
        if position % 3 == 2 {
            result.test_good.push(label);
        } else {
            result.train_good.push(label);
        }
    }
    result
}

/// How many images each folder of one cell type holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SplitCounts {
    /// Images in `train/good/`.
    pub train_good: usize,
    /// Images in `test/good/`.
    pub test_good: usize,
    /// Images in `test/defect/`.
    pub test_defect: usize,
}

impl SplitCounts {
    fn to_json(self) -> Value {
        json!({
            "train_good": self.train_good,
            "test_good": self.test_good,
            "test_defect": self.test_defect,
        })
    }

    fn from_json(value: &Value) -> Option<Self> {
        let count = |key: &str| value.get(key)?.as_u64()?.try_into().ok();
        Some(Self {
            train_good: count("train_good")?,
            test_good: count("test_good")?,
            test_defect: count("test_defect")?,
        })
    }

    /// Returns each folder, relative to the type's folder, with its count.
    fn by_folder(self) -> [(&'static str, usize); 3] {
        [
            ("train/good", self.train_good),
            ("test/good", self.test_good),
            ("test/defect", self.test_defect),
        ]
    }
}

impl std::fmt::Display for SplitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} train/good, {} test/good, {} test/defect",
            self.train_good, self.test_good, self.test_defect
        )
    }
}

/// A complete layout on disk.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The layout's root; each cell type has a folder in it.
    pub root: PathBuf,
    /// The counts of each cell type, in the order of [`CellType::ALL`].
    pub counts: Vec<(CellType, SplitCounts)>,
}

/// Returns where the layout lives in the cache.
pub fn root_in(cache: &Path) -> PathBuf {
    cache.join("data").join("elpv")
}

/// Makes sure the complete layout is in the cache, and returns it.
///
/// The layout is built in a scratch folder next to its destination and
/// renamed into place once complete, with its manifest written last, so an
/// interrupted run never leaves a layout that a later run takes for complete.
/// When a complete layout is already there, nothing is downloaded.
pub fn fetch(cache: &Path) -> Result<Layout> {
    let root = root_in(cache);
    if let Some(layout) = existing(&root)? {
        return Ok(layout);
    }
    if root.exists() {
        eprintln!(
            "xtask: {} is incomplete or outdated; rebuilding it",
            root.display()
        );
        fs::remove_dir_all(&root)
            .with_context(|| format!("could not remove {}", root.display()))?;
    }

    let wheel = pip::download_wheel(PACKAGE, &cache.join("downloads"))?;
    let data_dir = cache.join("data");
    let unpacked = ScratchDir::new(&data_dir, "unpack-elpv")?;
    pip::unpack_wheel(&wheel, unpacked.path())?;
    let source = unpacked.path().join(WHEEL_DATA_DIR);
    let labels_path = source.join("labels.csv");
    if !labels_path.is_file() {
        bail!(
            "the wheel {} does not contain `{WHEEL_DATA_DIR}/labels.csv`",
            wheel.display()
        );
    }
    let text = fs::read_to_string(&labels_path)
        .with_context(|| format!("could not read {}", labels_path.display()))?;
    let labels = parse_labels(&text, &format!("{WHEEL_DATA_DIR}/labels.csv"))?;

    let staging = ScratchDir::new(&data_dir, "elpv")?;
    let mut counts = Vec::new();
    for cell_type in CellType::ALL {
        let split = split(&labels, cell_type);
        for (folder, images) in split.folders() {
            let dest_dir = staging.path().join(cell_type.name()).join(folder);
            fs::create_dir_all(&dest_dir)
                .with_context(|| format!("could not create {}", dest_dir.display()))?;
            for label in images {
                let from = source.join(&label.image);
                fsutil::require_file(
                    &from,
                    &format!("the image listed in labels.csv as `{}`", label.image),
                )?;
                fsutil::link_or_copy(&from, &dest_dir.join(label.file_name()))?;
            }
        }
        counts.push((cell_type, split.counts()));
    }
    check_mono(&counts)?;
    write_manifest(staging.path(), &wheel, &counts)?;
    let layout = Layout {
        root: root.clone(),
        counts,
    };
    if let Err(err) = staging.persist_as(&root) {
        // A concurrent run may have finished first; its layout is as good as ours.
        return existing(&root)?.ok_or(err);
    }
    Ok(layout)
}

/// Fails unless the mono cells gave [`EXPECTED_MONO`].
fn check_mono(counts: &[(CellType, SplitCounts)]) -> Result<()> {
    let mono = counts
        .iter()
        .find(|(ty, _)| *ty == CellType::Mono)
        .map(|(_, counts)| *counts)
        .unwrap_or_default();
    if mono != EXPECTED_MONO {
        bail!(
            "the mono split gave {mono}, but {EXPECTED_MONO} were expected; \
             the `{PACKAGE}` wheel's labels.csv differs from the known release"
        );
    }
    Ok(())
}

/// Writes the manifest that marks the layout in `dir` as complete.
fn write_manifest(dir: &Path, wheel: &Path, counts: &[(CellType, SplitCounts)]) -> Result<()> {
    let types: serde_json::Map<String, Value> = counts
        .iter()
        .map(|(ty, counts)| (ty.name().to_owned(), counts.to_json()))
        .collect();
    let manifest = json!({
        "version": MANIFEST_VERSION,
        "package": PACKAGE,
        "wheel": wheel.file_name().map(|name| name.to_string_lossy()),
        "split_rule": "functional cells (probability 0) in file-name order: position % 3 == 2 \
                       to test/good, others to train/good; defective cells (probability 1) \
                       to test/defect; probabilities 1/3 and 2/3 left out",
        "types": types,
    });
    let path = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).context("could not format the manifest")?;
    fs::write(&path, text + "\n").with_context(|| format!("could not write {}", path.display()))
}

/// Returns the layout at `root` if it is complete: its manifest is current,
/// the mono counts are the expected ones, and every folder holds as many
/// images as the manifest says.
fn existing(root: &Path) -> Result<Option<Layout>> {
    let Ok(text) = fs::read_to_string(root.join(MANIFEST)) else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_str::<Value>(&text) else {
        return Ok(None);
    };
    if manifest.get("version").and_then(Value::as_u64) != Some(MANIFEST_VERSION) {
        return Ok(None);
    }
    let mut counts = Vec::new();
    for cell_type in CellType::ALL {
        let Some(expected) = manifest
            .pointer(&format!("/types/{}", cell_type.name()))
            .and_then(SplitCounts::from_json)
        else {
            return Ok(None);
        };
        for (folder, count) in expected.by_folder() {
            if fsutil::count_pngs(&root.join(cell_type.name()).join(folder))? != count {
                return Ok(None);
            }
        }
        counts.push((cell_type, expected));
    }
    if check_mono(&counts).is_err() {
        return Ok(None);
    }
    Ok(Some(Layout {
        root: root.to_path_buf(),
        counts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_labels_format() {
        let text = "images/cell0001.png  1.0                 mono\n\
                    images/cell0002.png  0.3333333333333333  poly\n\
                    \n\
                    images/cell0003.png  0.0                 mono\n";
        let labels = parse_labels(text, "labels.csv").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels[0].image, "images/cell0001.png");
        assert_eq!(labels[0].file_name(), "cell0001.png");
        assert_eq!(labels[0].condition, Condition::Defective);
        assert_eq!(labels[1].condition, Condition::Uncertain);
        assert_eq!(labels[1].cell_type, CellType::Poly);
        assert_eq!(labels[2].condition, Condition::Functional);
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let cases = [
            (
                "images/cell0001.png  1.0  mono\nimages/cell0002.png  0.0\n",
                "line 2",
            ),
            ("images/a.png  x  mono\n", "line 1"),
            ("images/a.png  0.5  mono\n", "not one of"),
            (
                "images/a.png  0.0  mono\n\nimages/b.png  0.0  cigs\n",
                "line 3",
            ),
            ("../a.png  0.0  mono\n", "relative path"),
        ];
        for (text, expected) in cases {
            let err = parse_labels(text, "labels.csv").unwrap_err().to_string();
            assert!(err.contains(expected), "`{err}` lacks `{expected}`");
            assert!(err.starts_with("labels.csv line"), "{err}");
        }
    }

    #[test]
    fn split_follows_the_rule() {
        // Functional mono cells listed out of order, so sorting matters.
        let mut lines = Vec::new();
        for n in [7, 1, 3, 2, 6, 5, 4] {
            lines.push(format!("images/cell000{n}.png 0.0 mono"));
        }
        lines.push("images/cell0010.png 1.0 mono".to_owned());
        lines.push("images/cell0009.png 1.0 mono".to_owned());
        lines.push("images/cell0011.png 0.6666666666666666 mono".to_owned());
        lines.push("images/cell0012.png 0.0 poly".to_owned());
        lines.push("images/cell0013.png 1.0 poly".to_owned());
        let labels = parse_labels(&lines.join("\n"), "labels.csv").unwrap();

        let mono = split(&labels, CellType::Mono);
        let names = |labels: &[&Label]| -> Vec<String> {
            labels
                .iter()
                .map(|label| label.file_name().to_owned())
                .collect()
        };
        assert_eq!(
            names(&mono.train_good),
            [
                "cell0001.png",
                "cell0002.png",
                "cell0004.png",
                "cell0005.png",
                "cell0007.png"
            ]
        );
        assert_eq!(names(&mono.test_good), ["cell0003.png", "cell0006.png"]);
        assert_eq!(names(&mono.test_defect), ["cell0009.png", "cell0010.png"]);

        let poly = split(&labels, CellType::Poly);
        assert_eq!(
            poly.counts(),
            SplitCounts {
                train_good: 1,
                test_good: 0,
                test_defect: 1
            }
        );
    }

    #[test]
    fn mono_counts_are_checked() {
        assert!(check_mono(&[(CellType::Mono, EXPECTED_MONO)]).is_ok());
        let wrong = SplitCounts {
            train_good: 391,
            ..EXPECTED_MONO
        };
        let err = check_mono(&[(CellType::Mono, wrong)]).unwrap_err();
        assert!(err.to_string().contains("391 train/good"), "{err}");
    }

    #[test]
    fn manifest_round_trips_and_incomplete_layouts_are_rejected() {
        let root = std::env::temp_dir().join(format!("xtask-elpv-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let small = SplitCounts {
            train_good: 2,
            test_good: 1,
            test_defect: 1,
        };
        let counts = [(CellType::Mono, small), (CellType::Poly, small)];
        for (ty, counts) in counts {
            for (folder, count) in counts.by_folder() {
                let dir = root.join(ty.name()).join(folder);
                fs::create_dir_all(&dir).unwrap();
                for n in 0..count {
                    fs::write(dir.join(format!("cell{n}.png")), b"png").unwrap();
                }
            }
        }
        // No manifest yet: the layout is incomplete.
        assert!(existing(&root).unwrap().is_none());
        write_manifest(&root, Path::new("elpv.whl"), &counts).unwrap();
        let text = fs::read_to_string(root.join(MANIFEST)).unwrap();
        let manifest: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            SplitCounts::from_json(&manifest["types"]["poly"]),
            Some(small)
        );
        // The counts are right, but they are not the expected mono counts.
        assert!(existing(&root).unwrap().is_none());
        fs::remove_dir_all(&root).unwrap();
    }
}
