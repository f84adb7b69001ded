//! Hand-checkable cases, error reporting and the random streams.

use patchcore_coreset::{
    coreset_size, greedy_select, project, random_projection, start_points, CoresetError,
    GreedyConfig, Sampler,
};

fn no_progress() -> impl FnMut(usize, usize) {
    |_, _| {}
}

#[test]
fn one_dimensional_points_by_hand() {
    let x = [0.0, 1.0, 2.0, 10.0, 11.0];
    // One start point at 0: d = |x| = [0, 1, 2, 10, 11]; pick 11 (index 4). Then
    // d = min(d, |x − 11|) = [0, 1, 2, 1, ·]: pick 2 (index 2). Then d = [0, 1, ·, 1, ·]: the tie
    // between indices 1 and 3 goes to the first.
    assert_eq!(greedy_select(&x, 1, &[0], 3, &mut no_progress()), [4, 2, 1]);
    // Start points 0 and 11: every mean distance is 5.5, so index 0 comes first; then
    // d = [·, 1, 2, 5.5, 5.5]: index 3; then d = [·, 1, 2, ·, 1]: index 2.
    assert_eq!(
        greedy_select(&x, 1, &[0, 4], 3, &mut no_progress()),
        [0, 3, 2]
    );
    // All rows.
    let mut all = greedy_select(&x, 1, &[1], 5, &mut no_progress());
    assert_eq!(all[..2], [4, 0]);
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3, 4]);
}

#[test]
fn two_dimensional_points_by_hand() {
    // The corners of the unit square and its centre (index 0); start at the corner (0, 0).
    let x = [0.5, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    // d = [√½, 0, 1, 1, √2]: the opposite corner (index 4) first. Then (1, 0) and (0, 1) stay at
    // 1 and tie (index 2 first); (0, 1) is √2 from (1, 0), so it stays at 1 and comes next; the
    // centre (√½) last.
    assert_eq!(
        greedy_select(&x, 2, &[1], 4, &mut no_progress()),
        [4, 2, 3, 0]
    );
    // Starting at the centre, every corner is capped at √½ by the start distance: index order.
    assert_eq!(
        greedy_select(&x, 2, &[0], 4, &mut no_progress()),
        [1, 2, 3, 4]
    );
}

#[test]
fn duplicate_rows_are_never_picked_twice() {
    let x = [1.0, 1.0, 1.0, 1.0];
    let picks = greedy_select(&x, 1, &[0], 4, &mut no_progress());
    let mut sorted = picks.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1, 2, 3]);
}

#[test]
fn progress_reports_every_pick() {
    let x: Vec<f32> = (0..50).map(|v| v as f32).collect();
    let mut seen = Vec::new();
    let picks = Sampler::ApproximateGreedy(GreedyConfig {
        ratio: 0.1,
        projection_dim: 1,
        start_points: 3,
    })
    .select(&x, 1, 9, &mut |done, total| seen.push((done, total)))
    .unwrap();
    assert_eq!(picks.len(), 5);
    assert_eq!(seen, (1..=5).map(|d| (d, 5)).collect::<Vec<_>>());
}

#[test]
fn coreset_size_truncates_like_python() {
    assert_eq!(coreset_size(2352, 0.1), 235);
    // 10 · 0.3 = 3.0000000000000004 and 10 · 0.7 = 7.000000000000001 in f64.
    assert_eq!(coreset_size(10, 0.3), 3);
    assert_eq!(coreset_size(10, 0.7), 7);
    // 100 · 0.29 = 28.999999999999996: Python's int gives 28.
    assert_eq!(coreset_size(100, 0.29), 28);
    assert_eq!(coreset_size(3, 0.1), 0);
    assert_eq!(coreset_size(7, 1.0), 7);
    assert_eq!(coreset_size(100_000, 0.01), 1000);
}

#[test]
fn invalid_parameters_are_reported_with_their_values() {
    let x = [0.0f32; 40];
    for ratio in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        let err = Sampler::ApproximateGreedy(GreedyConfig::new(ratio))
            .select(&x, 4, 0, &mut no_progress())
            .unwrap_err();
        assert!(matches!(err, CoresetError::InvalidRatio { .. }), "{err}");
        assert!(err.to_string().contains("`ratio`"), "{err}");
    }
    let err = Sampler::ApproximateGreedy(GreedyConfig {
        ratio: 0.5,
        projection_dim: 0,
        start_points: 10,
    })
    .select(&x, 4, 0, &mut no_progress())
    .unwrap_err();
    assert!(
        matches!(
            err,
            CoresetError::InvalidParameter {
                name: "projection_dim",
                value: 0
            }
        ),
        "{err}"
    );
    let err = Sampler::ApproximateGreedy(GreedyConfig {
        ratio: 0.5,
        projection_dim: 8,
        start_points: 0,
    })
    .select(&x, 4, 0, &mut no_progress())
    .unwrap_err();
    assert!(
        matches!(
            err,
            CoresetError::InvalidParameter {
                name: "start_points",
                value: 0
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_features_are_errors() {
    let greedy = Sampler::ApproximateGreedy(GreedyConfig::new(0.5));
    for sampler in [&greedy, &Sampler::KeepAll] {
        let err = sampler.select(&[], 4, 0, &mut no_progress()).unwrap_err();
        assert!(matches!(err, CoresetError::EmptyInput), "{err}");
        let err = sampler
            .select(&[1.0; 7], 4, 0, &mut no_progress())
            .unwrap_err();
        assert!(
            matches!(err, CoresetError::RaggedInput { len: 7, dim: 4 }),
            "{err}"
        );
        let err = sampler
            .select(&[1.0; 8], 0, 0, &mut no_progress())
            .unwrap_err();
        assert!(matches!(err, CoresetError::ZeroDimension), "{err}");
        let mut x = [1.0f32; 12];
        x[9] = f32::NAN;
        let err = sampler.select(&x, 3, 0, &mut no_progress()).unwrap_err();
        assert!(matches!(err, CoresetError::NonFinite { row: 3 }), "{err}");
    }
    let err = greedy
        .select(&[1e30; 8], 4, 0, &mut no_progress())
        .unwrap_err();
    assert!(matches!(err, CoresetError::Overflow { .. }), "{err}");
}

#[test]
fn a_ratio_that_picks_nothing_is_an_error() {
    let x = [0.0f32; 5 * 3];
    let err = Sampler::ApproximateGreedy(GreedyConfig::new(0.1))
        .select(&x, 3, 0, &mut no_progress())
        .unwrap_err();
    assert!(
        matches!(err, CoresetError::NoSamples { n: 5, ratio } if ratio == 0.1),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains('5') && msg.contains("0.1"), "{msg}");
}

#[test]
fn keep_all_and_ratio_one_keep_every_row_in_order() {
    let x: Vec<f32> = (0..30).map(|v| (v * v) as f32).collect();
    let all: Vec<usize> = (0..10).collect();
    assert_eq!(
        Sampler::KeepAll
            .select(&x, 3, 0, &mut no_progress())
            .unwrap(),
        all
    );
    assert_eq!(
        Sampler::ApproximateGreedy(GreedyConfig::new(1.0))
            .select(&x, 3, 0, &mut no_progress())
            .unwrap(),
        all
    );
}

#[test]
fn random_projection_has_the_torch_linear_distribution() {
    let (d, o) = (1024, 128);
    let p = random_projection(d, o, 42);
    assert_eq!(p.len(), d * o);
    assert_eq!(p, random_projection(d, o, 42));
    assert_ne!(p, random_projection(d, o, 43));
    let bound = 1.0 / (d as f32).sqrt();
    assert!(p.iter().all(|v| (-bound..bound).contains(v)));
    let n = p.len() as f64;
    let mean = p.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = p
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let b = f64::from(bound);
    assert!(mean.abs() < 0.01 * b, "mean {mean}");
    assert!((var / (b * b / 3.0) - 1.0).abs() < 0.02, "variance {var}");
}

#[test]
fn start_points_are_distinct_uniform_and_seeded() {
    assert_eq!(start_points(5, 5, 1).len(), 5);
    let mut all = start_points(5, 5, 1);
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3, 4]);
    assert_eq!(start_points(1000, 10, 7), start_points(1000, 10, 7));
    assert_ne!(start_points(1000, 10, 7), start_points(1000, 10, 8));
    // Each of 20 rows should be drawn about 3 / 20 of the time.
    let mut counts = [0usize; 20];
    let trials = 20_000;
    for seed in 0..trials {
        let s = start_points(20, 3, seed);
        let mut u = s.clone();
        u.sort_unstable();
        u.dedup();
        assert_eq!(u.len(), 3);
        for i in s {
            counts[i] += 1;
        }
    }
    let expected = 3.0 * trials as f64 / 20.0;
    for c in counts {
        assert!((c as f64 / expected - 1.0).abs() < 0.05, "{counts:?}");
    }
}

#[test]
fn project_multiplies_by_the_transpose() {
    // Two rows of 3 values, projection 2 × 3.
    let x = [1.0, 2.0, 3.0, -1.0, 0.5, 4.0];
    let p = [1.0, 0.0, 1.0, 0.0, 2.0, -1.0];
    assert_eq!(project(&x, 3, &p, 2), [4.0, 1.0, 3.0, -3.0]);
}

#[test]
fn end_to_end_selection_is_reproducible() {
    let dim = 200;
    let n = 700;
    let mut state = 1u64;
    let x: Vec<f32> = (0..n * dim)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let sampler = Sampler::ApproximateGreedy(GreedyConfig::new(0.1));
    let a = sampler.select(&x, dim, 3, &mut no_progress()).unwrap();
    let b = sampler.select(&x, dim, 3, &mut no_progress()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 70);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(
        pool.install(|| sampler.select(&x, dim, 3, &mut no_progress()).unwrap()),
        a
    );
    // The same as running the steps by hand.
    let p = random_projection(dim, 128, 3);
    let reduced = project(&x, dim, &p, 128);
    let starts = start_points(n, 10, 3);
    assert_eq!(
        greedy_select(&reduced, 128, &starts, 70, &mut no_progress()),
        a
    );
}
