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
/// score, ties never split.
///
/// # Errors
/// [`MetricError::ProUndefined`] without any anomalous or any normal pixel, shape mismatches, NaN scores, and a
/// limit outside (0, 1].
pub fn pro_auc(
    maps: &[ndarray::ArrayView2<'_, f32>],
    masks: &[ndarray::ArrayView2<'_, bool>],
    fpr_limit: f64,
) -> Result<f64, MetricError> {
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
    // Sweep the threshold down through the distinct scores; integrate PRO over FPR by trapezoids.
    let (mut fpr, mut pro, mut area) = (0.0f64, 0.0f64, 0.0f64);
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
            let pro_at = pro + t * (next_pro - pro);
            area += (fpr_limit - fpr) * (pro + pro_at) / 2.0;
            return Ok(area / fpr_limit);
        }
        area += (next_fpr - fpr) * (pro + next_pro) / 2.0;
        fpr = next_fpr;
        pro = next_pro;
    }
    // The curve ends at FPR 1 ≥ the limit, so the loop always returns; this is only reached through rounding.
    area += (fpr_limit - fpr).max(0.0) * pro;
    Ok(area / fpr_limit)
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
