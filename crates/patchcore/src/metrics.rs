//! Evaluation metrics: image AUROC, pixel AUROC, PRO (MVTec AD's per-region overlap) and F1-max.

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
    /// PRO needs at least one anomalous and one normal pixel.
    #[error("PRO is undefined: {anomalous} anomalous and {normal} normal pixels (both must be at least 1)")]
    ProUndefined {
        /// Number of anomalous pixels.
        anomalous: usize,
        /// Number of normal pixels.
        normal: usize,
    },
    /// A mask's shape differs from its map's.
    #[error("mask {index} has shape {mask:?} but its anomaly map has shape {map:?}")]
    ShapeMismatch {
        /// Which map.
        index: usize,
        /// The mask's (height, width).
        mask: (usize, usize),
        /// The map's (height, width).
        map: (usize, usize),
    },
    /// The false-positive-rate limit of PRO is outside (0, 1].
    #[error("invalid FPR limit {limit}: expected a number in (0, 1]")]
    InvalidFprLimit {
        /// The given limit.
        limit: f64,
    },
    /// A threshold was asked of an empty set of scores.
    #[error("no scores to calibrate a threshold on (at least 1 is needed)")]
    NoScores,
    /// The false-alarm rate of a threshold is outside (0, 1).
    #[error("invalid false-alarm rate {rate}: expected a number in (0, 1)")]
    InvalidRate {
        /// The given rate.
        rate: f64,
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

/// Pixel-level AUROC over every pixel of every map, `true` mask pixels counting as anomalous.
///
/// # Errors
/// As [`auroc`], and [`MetricError::ShapeMismatch`] when a mask's shape differs from its map's.
pub fn pixel_auroc(
    maps: &[ndarray::ArrayView2<'_, f32>],
    masks: &[ndarray::ArrayView2<'_, bool>],
) -> Result<f64, MetricError> {
    if maps.len() != masks.len() {
        return Err(MetricError::LengthMismatch {
            scores: maps.len(),
            labels: masks.len(),
        });
    }
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for (index, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if map.dim() != mask.dim() {
            return Err(MetricError::ShapeMismatch {
                index,
                mask: mask.dim(),
                map: map.dim(),
            });
        }
        scores.extend(map.iter().copied());
        labels.extend(mask.iter().copied());
    }
    auroc(&scores, &labels)
}

/// The best F1 score over all thresholds and the threshold that reaches it: an image (or pixel) is called
/// anomalous when its score is at least the threshold. Ties are never split.
///
/// # Errors
/// As [`auroc`]: both classes must be present, lengths must agree, no NaN.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Result<(f64, f32), MetricError> {
    auroc(scores, labels)?;
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut best = (0.0f64, f32::INFINITY);
    let mut i = 0;
    while i < order.len() {
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if labels[order[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        let f1 = 2.0 * tp / (2.0 * tp + fp + (positives - tp));
        if f1 > best.0 {
            best = (f1, threshold);
        }
    }
    Ok(best)
}

/// The ROC curve as (false-positive rate, true-positive rate) points, from (0, 0) to (1, 1): one point per distinct
/// score, sweeping the threshold down, an example called anomalous when its score is at least the threshold. Tied
/// scores move both rates in one step, so the trapezoidal area under these points equals [`auroc`] (ties counted
/// half).
///
/// # Errors
/// As [`auroc`].
///
/// # Examples
/// ```
/// # fn main() -> Result<(), patchcore::metrics::MetricError> {
/// let roc = patchcore::metrics::roc_curve(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true])?;
/// assert_eq!(roc, [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
/// # Ok(())
/// # }
/// ```
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Result<Vec<(f64, f64)>, MetricError> {
    auroc(scores, labels)?;
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut points = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < order.len() {
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if labels[order[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        points.push((fp / negatives, tp / positives));
    }
    Ok(points)
}

/// The area under a piecewise-linear curve by trapezoids, the points taken in the given order.
pub fn trapezoid_area(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum()
}

/// The threshold that keeps the false-alarm rate on known-normal scores at or below `rate`, for the decision rule
/// "anomalous when the score is strictly greater than the threshold".
///
/// With the n scores sorted in descending order s₁ ≥ s₂ ≥ … ≥ sₙ and m = ⌊rate·n⌋, the threshold is sₘ₊₁: the
/// smallest of the scores such that at most m of them exceed it. For example, the scores 1, 2, …, 10 at rate 0.1
/// give m = 1 and threshold 9 (only 10 exceeds it); at rate 0.05, m = 0 and the threshold is the maximum, 10.
/// When n < 1/rate, m is 0 and the threshold is the largest score: the requested rate cannot be resolved with so
/// few scores, and the threshold is as cautious as the data allow.
///
/// # Errors
/// [`MetricError::NoScores`] for an empty slice, [`MetricError::InvalidRate`] for a rate outside (0, 1),
/// [`MetricError::NaN`].
pub fn false_alarm_threshold(normal_scores: &[f32], rate: f64) -> Result<f32, MetricError> {
    if !(rate > 0.0 && rate < 1.0) {
        return Err(MetricError::InvalidRate { rate });
    }
    if normal_scores.is_empty() {
        return Err(MetricError::NoScores);
    }
    if let Some(index) = normal_scores.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NaN { index });
    }
    let mut sorted = normal_scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let m = (rate * sorted.len() as f64).floor() as usize;
    // m ≤ ⌊rate·n⌋ < n because rate < 1, so the index is in range.
    Ok(sorted[m.min(sorted.len() - 1)])
}

/// The best F1 score and the threshold that reaches it, for the decision rule "anomalous when the score is strictly
/// greater than the threshold" (the rule of [`false_alarm_threshold`]).
///
/// It calls the same examples anomalous as [`f1_max`]: the threshold is the largest score below [`f1_max`]'s
/// (which counts a score equal to the threshold as anomalous), or, when every example is called anomalous, the
/// next `f32` below the smallest score.
///
/// # Errors
/// As [`auroc`].
///
/// # Examples
/// ```
/// # fn main() -> Result<(), patchcore::metrics::MetricError> {
/// // 0.35, 0.4 and 0.8 are called anomalous: tp 2, fp 1, fn 0, so F1 = 4/5.
/// let (f1, threshold) = patchcore::metrics::f1_threshold(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true])?;
/// assert!((f1 - 0.8).abs() < 1e-12);
/// assert_eq!(threshold, 0.1);
/// # Ok(())
/// # }
/// ```
pub fn f1_threshold(scores: &[f32], labels: &[bool]) -> Result<(f64, f32), MetricError> {
    let (f1, at_least) = f1_max(scores, labels)?;
    let below = scores
        .iter()
        .copied()
        .filter(|&s| s < at_least)
        .max_by(f32::total_cmp);
    Ok((f1, below.unwrap_or_else(|| next_down(at_least))))
}

/// The largest `f32` below a finite `x`.
fn next_down(x: f32) -> f32 {
    if x == 0.0 {
        -f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// Labels the 8-connected components of a binary mask: 0 for background, 1..=n for the regions.
/// Returns the label image and n.
pub fn connected_components(mask: ndarray::ArrayView2<'_, bool>) -> (ndarray::Array2<u32>, u32) {
    let (h, w) = mask.dim();
    let mut labels = ndarray::Array2::<u32>::zeros((h, w));
    let mut count = 0u32;
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if !mask[[y, x]] || labels[[y, x]] != 0 {
                continue;
            }
            count += 1;
            labels[[y, x]] = count;
            stack.push((y, x));
            while let Some((cy, cx)) = stack.pop() {
                for ny in cy.saturating_sub(1)..=(cy + 1).min(h - 1) {
                    for nx in cx.saturating_sub(1)..=(cx + 1).min(w - 1) {
                        if mask[[ny, nx]] && labels[[ny, nx]] == 0 {
                            labels[[ny, nx]] = count;
                            stack.push((ny, nx));
                        }
                    }
                }
            }
        }
    }
    (labels, count)
}

/// The per-region-overlap (PRO) score of MVTec AD: the mean over ground-truth regions (8-connected components of
/// every mask) of the fraction of the region above a threshold, plotted against the false-positive rate over all
/// normal pixels, integrated over FPR from 0 to `fpr_limit` (0.3 in the literature, linear interpolation at the
/// limit) and divided by `fpr_limit`, so a perfect detector scores 1. The curve is exact: one point per distinct
/// score, ties never split; it is [`pro_curve`], integrated by [`trapezoid_area`].
///
/// # Errors
/// [`MetricError::ProUndefined`] without any anomalous or any normal pixel, shape mismatches, NaN scores, and a
/// limit outside (0, 1].
pub fn pro_auc(
    maps: &[ndarray::ArrayView2<'_, f32>],
    masks: &[ndarray::ArrayView2<'_, bool>],
    fpr_limit: f64,
) -> Result<f64, MetricError> {
    Ok(trapezoid_area(&pro_curve(maps, masks, fpr_limit)?) / fpr_limit)
}

/// The PRO curve as (false-positive rate, per-region overlap) points from (0, 0) up to FPR = `fpr_limit`: one point
/// per distinct score, sweeping the threshold down, and a last point linearly interpolated at the limit (see
/// [`pro_auc`]).
///
/// # Errors
/// As [`pro_auc`].
pub fn pro_curve(
    maps: &[ndarray::ArrayView2<'_, f32>],
    masks: &[ndarray::ArrayView2<'_, bool>],
    fpr_limit: f64,
) -> Result<Vec<(f64, f64)>, MetricError> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(MetricError::InvalidFprLimit { limit: fpr_limit });
    }
    if maps.len() != masks.len() {
        return Err(MetricError::LengthMismatch {
            scores: maps.len(),
            labels: masks.len(),
        });
    }
    // Every pixel as (score, region): region 0 for normal pixels, else a global region number.
    let mut pixels: Vec<(f32, u32)> = Vec::new();
    let mut region_sizes: Vec<f64> = vec![0.0];
    for (index, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if map.dim() != mask.dim() {
            return Err(MetricError::ShapeMismatch {
                index,
                mask: mask.dim(),
                map: map.dim(),
            });
        }
        let (labels, n) = connected_components(*mask);
        let base = region_sizes.len() as u32 - 1;
        region_sizes.extend(std::iter::repeat_n(0.0, n as usize));
        for (&score, &label) in map.iter().zip(labels.iter()) {
            if score.is_nan() {
                return Err(MetricError::NaN {
                    index: pixels.len(),
                });
            }
            let region = if label == 0 { 0 } else { base + label };
            region_sizes[region as usize] += 1.0;
            pixels.push((score, region));
        }
    }
    let regions = (region_sizes.len() - 1) as f64;
    let normal = region_sizes[0];
    let anomalous = pixels.len() - normal as usize;
    if regions == 0.0 || normal == 0.0 {
        return Err(MetricError::ProUndefined {
            anomalous,
            normal: normal as usize,
        });
    }
    pixels.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Sweep the threshold down through the distinct scores.
    let (mut fpr, mut pro) = (0.0f64, 0.0f64);
    let mut points = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < pixels.len() {
        let threshold = pixels[i].0;
        let (mut next_fpr, mut next_pro) = (fpr, pro);
        while i < pixels.len() && pixels[i].0 == threshold {
            let region = pixels[i].1 as usize;
            if region == 0 {
                next_fpr += 1.0 / normal;
            } else {
                next_pro += 1.0 / (region_sizes[region] * regions);
            }
            i += 1;
        }
        if next_fpr >= fpr_limit {
            // Interpolate the segment at the limit and stop.
            let t = if next_fpr > fpr {
                (fpr_limit - fpr) / (next_fpr - fpr)
            } else {
                1.0
            };
            points.push((fpr_limit, pro + t * (next_pro - pro)));
            return Ok(points);
        }
        points.push((next_fpr, next_pro));
        fpr = next_fpr;
        pro = next_pro;
    }
    // The curve ends at FPR 1 ≥ the limit, so the loop always returns; this is only reached through rounding.
    if fpr < fpr_limit {
        points.push((fpr_limit, pro));
    }
    Ok(points)
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
    fn f1_max_hand_checked() {
        // Threshold 0.35 calls 0.35 and 0.8 (and 0.4) anomalous: tp 2, fp 1, fn 0 → F1 = 4/5.
        let (f1, t) = f1_max(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!((f1 - 0.8).abs() < 1e-12 && t == 0.35, "{f1} {t}");
        // Perfect separation.
        assert_eq!(f1_max(&[0.0, 1.0], &[false, true]).unwrap(), (1.0, 1.0));
        assert!(f1_max(&[1.0, 2.0], &[true, true]).is_err());
    }

    #[test]
    fn components_are_eight_connected() {
        let m = ndarray::array![
            [true, false, false, true],
            [false, true, false, false],
            [false, false, false, true],
            [true, true, false, true]
        ];
        let (labels, n) = connected_components(m.view());
        // The diagonal pair (0,0)-(1,1) is one region; (0,3) alone; (2,3)-(3,3); (3,0)-(3,1).
        assert_eq!(n, 4);
        assert_eq!(labels[[0, 0]], labels[[1, 1]]);
        assert_eq!(labels[[2, 3]], labels[[3, 3]]);
        assert_ne!(labels[[0, 3]], labels[[2, 3]]);
    }

    #[test]
    fn pro_hand_checked() {
        use ndarray::array;
        // Perfect maps: every anomalous pixel scores above every normal one → PRO reaches 1 at FPR 0.
        let map = array![[0.9f32, 0.1], [0.1, 0.1]];
        let mask = array![[true, false], [false, false]];
        assert!((pro_auc(&[map.view()], &[mask.view()], 0.3).unwrap() - 1.0).abs() < 1e-12);
        // Inverted maps: the region is found only after every normal pixel → PRO 0 up to FPR 1.
        let map = array![[0.0f32, 0.5], [0.5, 0.5]];
        assert_eq!(pro_auc(&[map.view()], &[mask.view()], 0.3).unwrap(), 0.0);
        // Two one-pixel regions, (0,0) scoring 0.9 and (2,2) scoring 0.0, among 7 normal pixels. Sweeping down:
        // 0.9 → PRO 1/2 at FPR 0; 0.5 → FPR 1/7; 0.4 → 2/7; 0.2 → 3/7 ≥ 0.3, so interpolate at 0.3 (PRO stays 1/2).
        let map = array![[0.9f32, 0.5, 0.0], [0.1, 0.4, 0.1], [0.2, 0.0, 0.0]];
        let mask = array![
            [true, false, false],
            [false, false, false],
            [false, false, true]
        ];
        let area = 0.5 * (1.0 / 7.0) + 0.5 * (1.0 / 7.0) + 0.5 * (0.3 - 2.0 / 7.0);
        let got = pro_auc(&[map.view()], &[mask.view()], 0.3).unwrap();
        assert!((got - area / 0.3).abs() < 1e-12, "{got} vs {}", area / 0.3);
    }

    #[test]
    fn pixel_auroc_flattens_all_maps() {
        use ndarray::array;
        let a = array![[0.1f32, 0.4]];
        let b = array![[0.35f32, 0.8]];
        let ma = array![[false, false]];
        let mb = array![[true, true]];
        assert_eq!(
            pixel_auroc(&[a.view(), b.view()], &[ma.view(), mb.view()]),
            Ok(0.75)
        );
        let short = array![[true]];
        assert!(matches!(
            pixel_auroc(&[a.view()], &[short.view()]),
            Err(MetricError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn pro_edge_cases() {
        use ndarray::array;
        let map = array![[0.3f32, 0.3], [0.3, 0.3]];
        let none = array![[false, false], [false, false]];
        let all = array![[true, true], [true, true]];
        assert!(matches!(
            pro_auc(&[map.view()], &[none.view()], 0.3),
            Err(MetricError::ProUndefined { .. })
        ));
        assert!(matches!(
            pro_auc(&[map.view()], &[all.view()], 0.3),
            Err(MetricError::ProUndefined { .. })
        ));
        // All scores equal: the curve jumps from (0, 0) to (1, 1); the segment up to 0.3 averages 0 and 0.3.
        let some = array![[true, false], [false, false]];
        let got = pro_auc(&[map.view()], &[some.view()], 0.3).unwrap();
        assert!((got - 0.15).abs() < 1e-12, "{got}");
        let wrong = array![[true, false]];
        assert!(matches!(
            pro_auc(&[map.view()], &[wrong.view()], 0.3),
            Err(MetricError::ShapeMismatch { .. })
        ));
        assert!(pro_auc(&[map.view()], &[some.view()], 0.0).is_err());
    }

    #[test]
    fn roc_curve_hand_checked_and_ties_move_together() {
        // Sweeping down: 0.8 (anomalous) → (0, ½); 0.4 (normal) → (½, ½); 0.35 (anomalous) → (½, 1); 0.1 → (1, 1).
        let roc = roc_curve(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert_eq!(
            roc,
            [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        assert_eq!(trapezoid_area(&roc), 0.75);
        // A tie between classes is one diagonal step: the area counts it half.
        let roc = roc_curve(&[0.0, 0.5, 0.5, 1.0], &[false, false, true, true]).unwrap();
        assert_eq!(roc, [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert_eq!(trapezoid_area(&roc), 0.875);
        assert!(roc_curve(&[1.0, 2.0], &[true, true]).is_err());
    }

    #[test]
    fn false_alarm_threshold_hand_checked() {
        let scores: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        // m = ⌊0.1 · 10⌋ = 1: the second largest, 9; only 10 exceeds it.
        assert_eq!(false_alarm_threshold(&scores, 0.1), Ok(9.0));
        // m = ⌊0.25 · 10⌋ = 2: 8; 9 and 10 exceed it.
        assert_eq!(false_alarm_threshold(&scores, 0.25), Ok(8.0));
        // Too few scores to resolve 5%: m = 0, the maximum.
        assert_eq!(false_alarm_threshold(&scores, 0.05), Ok(10.0));
        // The order of the input does not matter, and ties keep the count at most m.
        assert_eq!(false_alarm_threshold(&[3.0, 1.0, 3.0, 2.0], 0.5), Ok(2.0));
        assert_eq!(false_alarm_threshold(&[], 0.1), Err(MetricError::NoScores));
        for rate in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(matches!(
                false_alarm_threshold(&scores, rate),
                Err(MetricError::InvalidRate { .. })
            ));
        }
        assert_eq!(
            false_alarm_threshold(&[1.0, f32::NAN], 0.1),
            Err(MetricError::NaN { index: 1 })
        );
    }

    #[test]
    fn f1_threshold_uses_the_strict_rule() {
        let scores = [0.1f32, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        let (f1, t) = f1_threshold(&scores, &labels).unwrap();
        assert!((f1 - 0.8).abs() < 1e-12);
        // Strictly above 0.1: the same three images f1_max calls anomalous at 0.35.
        assert_eq!(t, 0.1);
        let called: Vec<bool> = scores.iter().map(|&s| s > t).collect();
        assert_eq!(called, [false, true, true, true]);
        // Perfect separation: strictly above the normal score.
        assert_eq!(f1_threshold(&[0.0, 1.0], &[false, true]), Ok((1.0, 0.0)));
        // Everything anomalous is best when the normal image scores highest of few: the threshold lies just
        // below the smallest score.
        let (f1, t) = f1_threshold(&[1.0, 2.0, 3.0], &[true, true, false]).unwrap();
        assert!((f1 - 0.8).abs() < 1e-12, "{f1}");
        assert_eq!(t, next_down(1.0));
        assert!(t < 1.0 && t > 0.99999, "{t}");
        assert_eq!(next_down(0.0), -f32::from_bits(1));
        assert_eq!(next_down(-1.0), -1.0 - f32::EPSILON);
    }

    #[test]
    fn pro_curve_points_and_area_agree() {
        use ndarray::array;
        let map = array![[0.9f32, 0.5, 0.0], [0.1, 0.4, 0.1], [0.2, 0.0, 0.0]];
        let mask = array![
            [true, false, false],
            [false, false, false],
            [false, false, true]
        ];
        let curve = pro_curve(&[map.view()], &[mask.view()], 0.3).unwrap();
        assert_eq!(
            curve,
            [
                (0.0, 0.0),
                (0.0, 0.5),
                (1.0 / 7.0, 0.5),
                (2.0 / 7.0, 0.5),
                (0.3, 0.5)
            ]
        );
        let auc = pro_auc(&[map.view()], &[mask.view()], 0.3).unwrap();
        assert_eq!(auc, trapezoid_area(&curve) / 0.3);
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
    use super::{auroc, roc_curve, trapezoid_area};
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

        /// The ROC curve starts at (0, 0), ends at (1, 1), never decreases, and its trapezoidal area is the AUROC.
        #[test]
        fn roc_curve_area_is_auroc(
            pairs in prop::collection::vec((0u16..50, any::<bool>()), 2..80),
        ) {
            let scores: Vec<f32> = pairs.iter().map(|p| p.0 as f32).collect();
            let labels: Vec<bool> = pairs.iter().map(|p| p.1).collect();
            prop_assume!(labels.iter().any(|&l| l) && labels.iter().any(|&l| !l));
            let roc = roc_curve(&scores, &labels).unwrap();
            prop_assert_eq!(roc[0], (0.0, 0.0));
            prop_assert!((roc[roc.len() - 1].0 - 1.0).abs() < 1e-12 && (roc[roc.len() - 1].1 - 1.0).abs() < 1e-12);
            prop_assert!(roc.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1));
            prop_assert!((trapezoid_area(&roc) - auroc(&scores, &labels).unwrap()).abs() < 1e-9);
        }
    }
}
