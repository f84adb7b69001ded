//! Reading the report that `patchcore eval` writes, and summarizing it.

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The image AUROC of the original PatchCore implementation on the ELPV mono
/// cells, with the demo's settings (EfficientNet-Lite0, 1% coreset, k = 1).
pub const REFERENCE_MONO_AUROC: f64 = 0.943;

/// The parts of `report.json` that the demo prints.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// The image-level area under the ROC curve.
    pub image_auroc: f64,
    /// The number of patch features in the memory bank.
    pub bank_size: u64,
    /// Named timings, in seconds, in name order.
    pub timings: Vec<(String, f64)>,
    /// How many images were scored.
    pub scored: usize,
    /// How many scored images carry each label, in label order.
    pub labels: Vec<(String, usize)>,
}

/// Parses the text of `report.json`.
pub fn parse_report(text: &str) -> Result<ReportSummary> {
    let report: Value = serde_json::from_str(text).context("it is not valid JSON")?;
    if !report.is_object() {
        bail!("it is not a JSON object");
    }
    let image_auroc = report
        .get("image_auroc")
        .and_then(Value::as_f64)
        .context("`image_auroc` is missing or not a number")?;
    let bank_size = report
        .get("bank_size")
        .and_then(Value::as_u64)
        .context("`bank_size` is missing or not a non-negative integer")?;
    let timings = match report.get("timings") {
        None => Vec::new(),
        Some(Value::Object(timings)) => timings
            .iter()
            .map(|(name, seconds)| {
                let seconds = seconds
                    .as_f64()
                    .with_context(|| format!("`timings.{name}` is not a number of seconds"))?;
                Ok((name.clone(), seconds))
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("`timings` is not an object"),
    };
    let scores = report
        .get("scores")
        .and_then(Value::as_array)
        .context("`scores` is missing or not an array")?;
    let mut labels: Vec<(String, usize)> = Vec::new();
    for (index, entry) in scores.iter().enumerate() {
        // The folder name (`kind`) reads better than the 0/1 label when the report has it.
        let label = match entry.get("kind").or_else(|| entry.get("label")) {
            Some(Value::String(label)) => label.clone(),
            Some(other) => other.to_string(),
            None => bail!("`scores[{index}]` has no `label`"),
        };
        match labels.iter_mut().find(|(known, _)| *known == label) {
            Some((_, count)) => *count += 1,
            None => labels.push((label, 1)),
        }
    }
    labels.sort();
    Ok(ReportSummary {
        image_auroc,
        bank_size,
        timings,
        scored: scores.len(),
        labels,
    })
}

/// Formats the demo's closing summary.
///
/// `reference` is the AUROC to compare with, if there is one for the data;
/// `overlays` is the number of overlay images written to `out/overlays/`.
pub fn render_summary(
    summary: &ReportSummary,
    reference: Option<f64>,
    out: &Path,
    overlays: usize,
) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail, so the results are ignored.
    let _ = write!(text, "image AUROC: {:.3}", summary.image_auroc);
    match reference {
        Some(reference) => {
            let _ = writeln!(
                text,
                " (reference {reference:.3}, difference {:+.3})",
                summary.image_auroc - reference
            );
        }
        None => text.push('\n'),
    }
    let _ = writeln!(text, "memory bank: {} patch features", summary.bank_size);
    let labels: Vec<String> = summary
        .labels
        .iter()
        .map(|(label, count)| format!("{count} {label}"))
        .collect();
    let _ = writeln!(
        text,
        "scored images: {} ({})",
        summary.scored,
        labels.join(", ")
    );
    if !summary.timings.is_empty() {
        let timings: Vec<String> = summary
            .timings
            .iter()
            .map(|(name, seconds)| format!("{name} {seconds:.2} s"))
            .collect();
        let _ = writeln!(text, "timings: {}", timings.join(", "));
    }
    let _ = writeln!(
        text,
        "wrote: {} (report.json, {overlays} overlays in overlays/)",
        out.display()
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "image_auroc": 0.9512,
        "bank_size": 12345,
        "timings": {"fit": 12.5, "eval": 3.25},
        "scores": [
            {"path": "test/good/cell0003.png", "label": "good", "score": 1.5},
            {"path": "test/defect/cell0001.png", "label": "defect", "score": 4.0},
            {"path": "test/defect/cell0002.png", "label": "defect", "score": 3.0}
        ],
        "extra": "ignored"
    }"#;

    #[test]
    fn parses_a_sample_report() {
        let summary = parse_report(SAMPLE).unwrap();
        assert_eq!(summary.image_auroc, 0.9512);
        assert_eq!(summary.bank_size, 12345);
        assert_eq!(
            summary.timings,
            [("eval".to_owned(), 3.25), ("fit".to_owned(), 12.5)]
        );
        assert_eq!(summary.scored, 3);
        assert_eq!(
            summary.labels,
            [("defect".to_owned(), 2), ("good".to_owned(), 1)]
        );
    }

    #[test]
    fn renders_the_summary_with_the_reference() {
        let summary = parse_report(SAMPLE).unwrap();
        let text = render_summary(&summary, Some(REFERENCE_MONO_AUROC), Path::new("/out"), 3);
        assert!(
            text.contains("image AUROC: 0.951 (reference 0.943, difference +0.008)"),
            "{text}"
        );
        assert!(text.contains("memory bank: 12345"), "{text}");
        assert!(
            text.contains("scored images: 3 (2 defect, 1 good)"),
            "{text}"
        );
        assert!(text.contains("eval 3.25 s, fit 12.50 s"), "{text}");
        assert!(
            text.contains("wrote: /out (report.json, 3 overlays"),
            "{text}"
        );
        let without = render_summary(&summary, None, Path::new("/out"), 0);
        assert!(!without.contains("reference"), "{without}");
    }

    #[test]
    fn numeric_labels_are_counted_too() {
        let text = r#"{"image_auroc": 0.5, "bank_size": 1, "timings": {},
                       "scores": [{"path": "a", "label": 0, "score": 1.0},
                                  {"path": "b", "label": 1, "score": 2.0}]}"#;
        let summary = parse_report(text).unwrap();
        assert_eq!(summary.labels, [("0".to_owned(), 1), ("1".to_owned(), 1)]);
    }

    #[test]
    fn missing_or_wrong_fields_are_named() {
        let cases = [
            ("[]", "not a JSON object"),
            (r#"{"bank_size": 1, "scores": []}"#, "`image_auroc`"),
            (r#"{"image_auroc": 0.9, "scores": []}"#, "`bank_size`"),
            (r#"{"image_auroc": 0.9, "bank_size": 1}"#, "`scores`"),
            (
                r#"{"image_auroc": 0.9, "bank_size": 1, "scores": [], "timings": {"fit": "1s"}}"#,
                "`timings.fit`",
            ),
            ("{", "not valid JSON"),
        ];
        for (text, expected) in cases {
            let err = parse_report(text).unwrap_err().to_string();
            assert!(err.contains(expected), "`{err}` lacks `{expected}`");
        }
    }
}
