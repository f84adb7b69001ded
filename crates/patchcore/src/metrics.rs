//! Evaluation metrics.

/// Errors of metric computation.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricError {
    /// AUROC needs at least one positive and one negative example.
    #[error("AUROC is undefined: {positives} anomalous and {negatives} normal examples (both must be at least 1)")]
    Undefined {
        /// Number of positive (anomalous) examples.
        positives: usize,
        /// Number of negative (normal) examples.
        negatives: usize,
    },
    /// Scores and labels differ in length.
    #[error("{scores} scores but {labels} labels")]
    LengthMismatch {
        /// Number of scores.
        scores: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A score is NaN.
    #[error("score {index} is NaN")]
    NaN {
        /// Position of the first NaN score.
        index: usize,
    },
}

/// Area under the ROC curve as the Mann–Whitney statistic: the probability that a random anomalous example scores
/// higher than a random normal one, ties counted half. `labels[i]` is `true` for anomalous.
///
/// # Errors
/// [`MetricError::Undefined`] when either class is empty; length mismatch; NaN scores.
///
/// # Examples
/// ```
/// # fn main() -> Result<(), patchcore::metrics::MetricError> {
/// let auroc = patchcore::metrics::auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true])?;
/// assert_eq!(auroc, 0.75);
/// # Ok(())
/// # }
/// ```
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    if scores.len() != labels.len() {
        return Err(MetricError::LengthMismatch {
            scores: scores.len(),
            labels: labels.len(),
        });
    }
    if let Some(index) = scores.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NaN { index });
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Err(MetricError::Undefined {
            positives,
            negatives,
        });
    }
    // Rank-sum form: sort once, give tied scores their average rank.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &idx in &order[i..=j] {
            if labels[idx] {
                rank_sum_pos += mean_rank;
            }
        }
        i = j + 1;
    }
    let p = positives as f64;
    let u = rank_sum_pos - p * (p + 1.0) / 2.0;
    Ok(u / (p * negatives as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_values() {
        assert_eq!(
            auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Ok(0.75)
        );
        assert_eq!(auroc(&[1.0, 2.0], &[false, true]), Ok(1.0));
        assert_eq!(auroc(&[2.0, 1.0], &[false, true]), Ok(0.0));
        // All equal: every pair is a tie.
        assert_eq!(auroc(&[3.0; 4], &[false, true, false, true]), Ok(0.5));
        // One tie among four pairs: (1 + 1 + 0.5 + 0) / 4.
        assert_eq!(
            auroc(&[0.0, 0.5, 0.5, 1.0], &[false, false, true, true]),
            Ok(0.875)
        );
    }

    #[test]
    fn undefined_and_bad_input() {
        assert_eq!(
            auroc(&[1.0, 2.0], &[true, true]),
            Err(MetricError::Undefined {
                positives: 2,
                negatives: 0
            })
        );
        assert!(matches!(
            auroc(&[1.0], &[true, false]),
            Err(MetricError::LengthMismatch { .. })
        ));
        assert_eq!(
            auroc(&[1.0, f32::NAN], &[true, false]),
            Err(MetricError::NaN { index: 1 })
        );
    }

    #[test]
    fn brute_force_agrees() {
        let scores: Vec<f32> = (0..60).map(|i| ((i * 37) % 17) as f32).collect();
        let labels: Vec<bool> = (0..60).map(|i| (i * 11) % 5 < 2).collect();
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for (i, &li) in labels.iter().enumerate() {
            for (j, &lj) in labels.iter().enumerate() {
                if li && !lj {
                    pairs += 1.0;
                    if scores[i] > scores[j] {
                        wins += 1.0;
                    } else if scores[i] == scores[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        assert!((auroc(&scores, &labels).unwrap() - wins / pairs).abs() < 1e-12);
    }
}

#[cfg(test)]
mod properties {
    use super::auroc;
    use proptest::prelude::*;

    proptest! {
        /// AUROC depends only on the order of the scores: a strictly increasing transform leaves it unchanged,
        /// and negating the scores gives 1 − AUROC.
        #[test]
        fn invariant_under_monotone_transforms(
            pairs in prop::collection::vec((0u16..50, any::<bool>()), 2..80),
        ) {
            let scores: Vec<f32> = pairs.iter().map(|p| p.0 as f32).collect();
            let labels: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            prop_assume!(labels.iter().any(|&l| l) && labels.iter().any(|&l| !l));
            let base = auroc(&scores, &labels).unwrap();
            let exp: Vec<f32> = scores.iter().map(|s| (s / 10.0).exp() * 3.0 + 7.0).collect();
            let cubic: Vec<f32> = scores.iter().map(|s| s * s * s - 1000.0).collect();
            prop_assert!((auroc(&exp, &labels).unwrap() - base).abs() < 1e-12);
            prop_assert!((auroc(&cubic, &labels).unwrap() - base).abs() < 1e-12);
            let neg: Vec<f32> = scores.iter().map(|s| -s).collect();
            prop_assert!((auroc(&neg, &labels).unwrap() - (1.0 - base)).abs() < 1e-12);
        }
    }
}
