//! Coreset subsampling of PatchCore memory banks.
//!
//! [`Sampler::select`] picks the rows of a feature matrix (flat, row-major `&[f32]` with `dim`
//! columns) that form the memory bank. [`Sampler::ApproximateGreedy`] is the original's
//! `ApproximateGreedyCoresetSampler` (patchcore-inspection), step by step:
//!
//! 1. project the `N × D` features to 128 dimensions with a random matrix `P` (128 × `D`):
//!    `reduced = X · Pᵀ` ([`random_projection`], [`project`]);
//! 2. choose 10 start points uniformly without replacement (`min(10, N)`);
//! 3. set `dᵢ` to the mean Euclidean distance of row `i` to the start points;
//! 4. `int(N · ratio)` times: pick `i* = argmax d` (first index on ties), then
//!    `dᵢ = min(dᵢ, ‖rᵢ − r_{i*}‖)` ([`greedy_select`]). Start points are not picked as such.
//!
//! ```
//! use patchcore_coreset::{GreedyConfig, Sampler};
//!
//! // Five 1-D points; keep 40 % of them. The projection to 128 dimensions is skipped for
//! // brevity by projecting to 1 dimension.
//! let features = [0.0, 1.0, 2.0, 10.0, 11.0];
//! let sampler = Sampler::ApproximateGreedy(GreedyConfig { ratio: 0.4, projection_dim: 1, start_points: 10 });
//! let picks = sampler.select(&features, 1, 0, &mut |_, _| {})?;
//! assert_eq!(picks.len(), 2);
//! # Ok::<(), patchcore_coreset::CoresetError>(())
//! ```
//!
//! ## Design
//!
//! * **Faithful arithmetic.** Distances are computed as the original does, in `f32`, as
//!   `sqrt(clamp(−2·a·b + ‖a‖² + ‖b‖², 0))`, so [`greedy_select`] reproduces the original's picks
//!   in pick order on its own projected features (checked against a golden fixture).
//! * **Linear memory.** Only the projected features, their squared norms and the running distance
//!   vector are kept: `O(N·128)`, never `N × N`.
//! * **Few passes.** After a parallel (rayon) pass over all rows, the 2,048 rows that lead in
//!   (distance, lower index) order are kept exact on the side, and the next picks are read off
//!   them one by one for as long as the leader among them provably leads every other row too.
//!   Only then does one pass apply the whole batch of picks (up to 256) to every row, each row
//!   taking them in pick order, which gives the same distances, bit for bit, as one pass per pick.
//!   Ties go to the lower index everywhere, so the picks do not depend on the number of threads.
//!   The pass's kernel is compiled a second time for AVX-512 and chosen at run time.
//! * **Projection.** [`project`] multiplies with the `gemm` crate in fixed blocks of rows, in
//!   parallel; the block partition does not depend on the thread count, so neither does the result.
//! * **Named deviations from the original.**
//!   - *Random streams.* The original draws `P` from torch's RNG (`torch.nn.Linear(D, 128,
//!     bias=False)` default init, uniform in `±1/√D`) and the start points from NumPy's global RNG.
//!     Neither stream can be replicated, so both come from ChaCha8 seeded by the caller's `seed`:
//!     `P` from stream 0, the start points from stream 1 (see [`random_projection`] and
//!     [`start_points`]). The distributions are the same; the draws differ.
//!   - *Unique picks.* The original would re-pick index 0 once every remaining distance is 0 (all
//!     rows coincide with picked ones); here a picked row is never picked again. Whenever some
//!     distance is positive the two agree, because a picked row's own distance is 0.
//! * **The original's shortcuts are kept:** a ratio of exactly 1 keeps all rows in order without
//!   projecting, and features that already have `projection_dim` columns are not projected.
#![deny(missing_docs)]

use std::collections::HashMap;

use gemm::Parallelism;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rows per parallel work item in [`project`] and [`greedy_select`]; fixed so that results do not
/// depend on the number of threads.
const ROW_BLOCK: usize = 2048;

/// Everything that can go wrong when selecting a coreset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoresetError {
    /// The sampling ratio is outside `(0, 1]` (or NaN).
    #[error("invalid coreset parameter `ratio` = {ratio}: it must be in (0, 1]")]
    InvalidRatio {
        /// The rejected ratio.
        ratio: f64,
    },

    /// An integer sampler parameter is zero.
    #[error("invalid coreset parameter `{name}` = {value}: it must be positive")]
    InvalidParameter {
        /// The parameter's name, e.g. `"projection_dim"`.
        name: &'static str,
        /// The rejected value.
        value: usize,
    },

    /// The feature dimension is zero.
    #[error("the feature dimension must be positive, got 0")]
    ZeroDimension,

    /// There are no feature rows.
    #[error("there are no features to subsample")]
    EmptyInput,

    /// The feature buffer is not a whole number of rows.
    #[error("feature buffer of length {len} is not a whole number of rows of dimension {dim}")]
    RaggedInput {
        /// The length of the buffer.
        len: usize,
        /// The row dimension.
        dim: usize,
    },

    /// A feature row holds NaN or an infinity.
    #[error("feature row {row} holds a NaN or infinite value")]
    NonFinite {
        /// The offending row.
        row: usize,
    },

    /// A feature row is so large that its projection or squared norm overflows `f32`.
    #[error("feature row {row} is too large: its projection or squared norm overflows f32")]
    Overflow {
        /// The offending row.
        row: usize,
    },

    /// The ratio selects no row at all for this number of features.
    #[error("ratio {ratio} selects no row from {n} features (int({n} × {ratio}) = 0)")]
    NoSamples {
        /// The number of feature rows.
        n: usize,
        /// The sampling ratio.
        ratio: f64,
    },
}

/// Parameters of the approximate greedy coreset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreedyConfig {
    /// The fraction of rows to keep, in `(0, 1]`; `int(N · ratio)` rows are picked.
    pub ratio: f64,
    /// The dimension of the random projection (the original's 128).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// The number of random start points (the original's 10).
    #[serde(default = "default_start_points")]
    pub start_points: usize,
}

fn default_projection_dim() -> usize {
    GreedyConfig::PROJECTION_DIM
}

fn default_start_points() -> usize {
    GreedyConfig::START_POINTS
}

impl GreedyConfig {
    /// The original's projection dimension.
    pub const PROJECTION_DIM: usize = 128;
    /// The original's number of start points.
    pub const START_POINTS: usize = 10;

    /// The original's configuration for `ratio`: projection to 128 dimensions, 10 start points.
    pub fn new(ratio: f64) -> Self {
        GreedyConfig {
            ratio,
            projection_dim: Self::PROJECTION_DIM,
            start_points: Self::START_POINTS,
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    ///
    /// [`CoresetError::InvalidRatio`] when `ratio` is not in `(0, 1]`, and
    /// [`CoresetError::InvalidParameter`] when `projection_dim` or `start_points` is zero.
    pub fn validate(&self) -> Result<(), CoresetError> {
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(CoresetError::InvalidRatio { ratio: self.ratio });
        }
        if self.projection_dim == 0 {
            return Err(CoresetError::InvalidParameter {
                name: "projection_dim",
                value: 0,
            });
        }
        if self.start_points == 0 {
            return Err(CoresetError::InvalidParameter {
                name: "start_points",
                value: 0,
            });
        }
        Ok(())
    }
}

/// How to subsample the memory bank.
///
/// Serialised with a `kind` tag, e.g. `{"kind": "approximate-greedy", "ratio": 0.1}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Sampler {
    /// Keep every row, in order.
    KeepAll,
    /// The original's approximate greedy coreset.
    ApproximateGreedy(GreedyConfig),
}

impl Sampler {
    /// Selects rows of `features` (row-major, `dim` columns) and returns their indices in pick
    /// order ([`Sampler::KeepAll`] and a ratio of 1: `0..N`).
    ///
    /// `seed` determines the projection and the start points. `progress(done, total)` is called
    /// after every pick.
    ///
    /// # Errors
    ///
    /// [`CoresetError::ZeroDimension`], [`CoresetError::RaggedInput`],
    /// [`CoresetError::EmptyInput`] and [`CoresetError::NonFinite`] for malformed features; the
    /// errors of [`GreedyConfig::validate`]; [`CoresetError::NoSamples`] when `int(N · ratio)` is
    /// 0; and [`CoresetError::Overflow`] when a projected row overflows `f32`.
    pub fn select(
        &self,
        features: &[f32],
        dim: usize,
        seed: u64,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<usize>, CoresetError> {
        let n = check_features(features, dim)?;
        let config = match self {
            Sampler::KeepAll => return Ok((0..n).collect()),
            Sampler::ApproximateGreedy(config) => config,
        };
        config.validate()?;
        if config.ratio == 1.0 {
            // The original returns the features unchanged for a percentage of exactly 1.
            return Ok((0..n).collect());
        }
        let count = coreset_size(n, config.ratio);
        if count == 0 {
            return Err(CoresetError::NoSamples {
                n,
                ratio: config.ratio,
            });
        }
        let out_dim = config.projection_dim;
        let projected;
        let reduced = if dim == out_dim {
            // The original skips the projection when the features already have this dimension.
            features
        } else {
            let p = random_projection(dim, out_dim, seed);
            projected = project(features, dim, &p, out_dim);
            &projected[..]
        };
        if let Some(row) = reduced.chunks_exact(out_dim).position(|r| {
            let norm = dot(r, r);
            !norm.is_finite()
        }) {
            return Err(CoresetError::Overflow { row });
        }
        let starts = start_points(n, config.start_points.min(n), seed);
        Ok(greedy_select(reduced, out_dim, &starts, count, progress))
    }
}

/// Validates a feature buffer and returns its number of rows.
fn check_features(features: &[f32], dim: usize) -> Result<usize, CoresetError> {
    if dim == 0 {
        return Err(CoresetError::ZeroDimension);
    }
    if features.len() % dim != 0 {
        return Err(CoresetError::RaggedInput {
            len: features.len(),
            dim,
        });
    }
    if features.is_empty() {
        return Err(CoresetError::EmptyInput);
    }
    if let Some(row) = features
        .chunks_exact(dim)
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(CoresetError::NonFinite { row });
    }
    Ok(features.len() / dim)
}

/// The number of rows the original picks from `n` rows: `int(n * ratio)` as Python computes it
/// (the `f64` product, truncated), e.g. `coreset_size(2352, 0.1) == 235`.
pub fn coreset_size(n: usize, ratio: f64) -> usize {
    // Python's `len(features) * percentage` is an f64 product; `int` truncates toward zero. The
    // cast saturates, so NaN and negative ratios give 0.
    (n as f64 * ratio) as usize
}

/// A uniform `f32` in `[0, 1)` from the top 24 bits of one 32-bit draw.
fn unit_f32(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// A uniform integer in `0..bound` (`bound > 0`), by Lemire's multiply-and-reject method.
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(bound);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The random projection matrix, `out_dim × in_dim` row-major (like the weight of
/// `torch.nn.Linear(in_dim, out_dim, bias=False)`), uniform in `[−1/√in_dim, 1/√in_dim)` as that
/// layer's default initialisation.
///
/// Named deviation: torch's RNG cannot be replicated, so the values come from ChaCha8 seeded with
/// `seed` (`seed_from_u64`, stream 0), one 32-bit draw per value in row-major order; the stream is
/// stable across `rand` versions.
pub fn random_projection(in_dim: usize, out_dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0);
    let bound = (1.0 / (in_dim.max(1) as f64).sqrt()) as f32;
    (0..in_dim * out_dim)
        .map(|_| bound * (2.0 * unit_f32(&mut rng) - 1.0))
        .collect()
}

/// The start points: `amount` distinct row indices of `0..n`, uniformly without replacement, in
/// draw order.
///
/// Named deviation: the original uses NumPy's global RNG (`np.random.choice(n, amount,
/// replace=False)`); here ChaCha8 seeded with `seed` (`seed_from_u64`, stream 1) drives a partial
/// Fisher–Yates shuffle.
///
/// # Panics
///
/// Panics if `amount > n`.
pub fn start_points(n: usize, amount: usize, seed: u64) -> Vec<usize> {
    assert!(
        amount <= n,
        "cannot draw {amount} start points from {n} rows"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    // A sparse partial Fisher–Yates shuffle: `moved` holds the positions that differ from the
    // identity permutation.
    let mut moved: HashMap<usize, usize> = HashMap::new();
    (0..amount)
        .map(|i| {
            let j = i + below(&mut rng, (n - i) as u64) as usize;
            let at_j = moved.get(&j).copied().unwrap_or(j);
            let at_i = moved.get(&i).copied().unwrap_or(i);
            moved.insert(j, at_i);
            at_j
        })
        .collect()
}

/// Projects `features` (row-major, `dim` columns) with `projection` (`out_dim × dim`, row-major):
/// returns `features · projectionᵀ`, row-major with `out_dim` columns.
///
/// Uses `gemm` on fixed blocks of rows, in parallel on the current rayon pool.
///
/// # Panics
///
/// Panics if `dim` or `out_dim` is zero, `features.len()` is not a multiple of `dim`, or
/// `projection.len() != out_dim * dim`.
pub fn project(features: &[f32], dim: usize, projection: &[f32], out_dim: usize) -> Vec<f32> {
    assert!(dim > 0 && out_dim > 0, "dimensions must be positive");
    assert_eq!(features.len() % dim, 0, "ragged feature buffer");
    assert_eq!(projection.len(), out_dim * dim, "projection shape");
    let n = features.len() / dim;
    let mut out = vec![0f32; n * out_dim];
    out.par_chunks_mut(ROW_BLOCK * out_dim)
        .zip(features.par_chunks(ROW_BLOCK * dim))
        .for_each(|(dst, src)| {
            let m = src.len() / dim;
            // SAFETY: `dst` holds `m × out_dim` values written row-major (row stride `out_dim`,
            // column stride 1); `src` holds `m × dim` values read row-major (row stride `dim`);
            // the right-hand side is the `dim × out_dim` transpose of `projection`, element
            // `(k, o)` at `projection[o·dim + k]` (row stride 1, column stride `dim`). The output
            // does not overlap the inputs and `read_dst` is false.
            unsafe {
                gemm::gemm(
                    m,
                    out_dim,
                    dim,
                    dst.as_mut_ptr(),
                    1,
                    out_dim as isize,
                    false,
                    src.as_ptr(),
                    1,
                    dim as isize,
                    projection.as_ptr(),
                    dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    out
}

/// The `f32` dot product, summed in a fixed order (32 interleaved partial sums, then a fixed
/// tree), so the same inputs always give the same bits.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// The original's distance: `sqrt(clamp(−2·a·b + ‖a‖² + ‖b‖², 0))` in `f32`.
#[inline(always)]
fn distance(a_dot_b: f32, a_norm: f32, b_norm: f32) -> f32 {
    (-2.0 * a_dot_b + a_norm + b_norm).max(0.0).sqrt()
}

/// The greedy core of the approximate greedy coreset, on already projected features.
///
/// `reduced` is row-major with `dim` columns; `start_points` are row indices. Returns `count` row
/// indices in pick order: first the row with the largest mean distance to the start points, then
/// repeatedly the row farthest from everything picked so far (first index on ties). Picks are
/// unique (see the crate's named deviations). `progress(done, count)` is called after every pick.
///
/// # Panics
///
/// Panics if `dim` is zero, `reduced.len()` is not a multiple of `dim`, `start_points` is empty
/// or holds an index out of range, or `count` exceeds the number of rows.
pub fn greedy_select(
    reduced: &[f32],
    dim: usize,
    start_points: &[usize],
    count: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<usize> {
    greedy(reduced, dim, start_points, count, progress, true).0
}

/// [`greedy_select`] with the pruning switchable (for tests); also returns how many row updates
/// the pruning skipped.
fn greedy(
    reduced: &[f32],
    dim: usize,
    start_points: &[usize],
    count: usize,
    progress: &mut dyn FnMut(usize, usize),
    prune: bool,
) -> (Vec<usize>, u64) {
    assert!(dim > 0, "dimension must be positive");
    assert_eq!(reduced.len() % dim, 0, "ragged feature buffer");
    let n = reduced.len() / dim;
    assert!(!start_points.is_empty(), "no start points");
    assert!(
        start_points.iter().all(|&s| s < n),
        "start point out of range"
    );
    assert!(count <= n, "cannot pick {count} of {n} rows");
    if count == 0 {
        return (Vec::new(), 0);
    }
    let row = |i: usize| &reduced[i * dim..(i + 1) * dim];
    let norms: Vec<f32> = reduced.par_chunks(dim).map(|r| dot(r, r)).collect();

    // The mean distance to the start points, as torch.mean over the last axis (sum, then divide).
    let starts: Vec<(&[f32], f32)> = start_points.iter().map(|&s| (row(s), norms[s])).collect();
    let divisor = start_points.len() as f32;
    let mut d = vec![0f32; n];
    let mut best = d
        .par_chunks_mut(ROW_BLOCK)
        .enumerate()
        .map(|(c, chunk)| {
            let mut best = (f32::NEG_INFINITY, usize::MAX);
            for (o, di) in chunk.iter_mut().enumerate() {
                let i = c * ROW_BLOCK + o;
                let r = row(i);
                let sum = starts.iter().fold(0f32, |acc, &(s, sn)| {
                    acc + distance(dot(r, s), norms[i], sn)
                });
                *di = sum / divisor;
                if *di > best.0 {
                    best = (*di, i);
                }
            }
            best
        })
        .reduce(|| (f32::NEG_INFINITY, usize::MAX), first_max);

    // Triangle-inequality pruning (exact; see `skip_margin`): `owner[i]` is the pick (by pick
    // number) whose distance last set `d[i]`, or `NO_OWNER` while `d[i]` is still the mean start
    // distance. When pick `p` is at least `2·d[i] + margin` from row `i`'s owner, the distance
    // from row `i` to `p` cannot be below `d[i]`, and the row is not read at all.
    let margin = if prune {
        skip_margin(&norms, dim)
    } else {
        f64::INFINITY
    };
    let mut skipped = 0u64;
    let mut owner = vec![NO_OWNER; n];
    let mut pick_rows: Vec<f32> = Vec::with_capacity(count * dim);
    let mut pick_norms: Vec<f32> = Vec::with_capacity(count);
    let mut picks: Vec<usize> = Vec::with_capacity(count);

    // Batched passes (see `Candidates`): `d` is exact for every pick applied by a pass. The
    // `CANDIDATES` rows that lead in (distance, lower index) order are then enough to find the next
    // picks one after another, as long as the best candidate, kept exact on the side, still leads
    // every row outside the set. Only then does a pass over all rows apply the batch of pending
    // picks, each row taking them in pick order, which is exactly what one pass per pick would do.
    let mut next = Candidates::select(&d, best, CANDIDATES);
    loop {
        let batch_start = picks.len();
        // Distances from each pending pick to every earlier pick, for the pruning test.
        let mut to_earlier: Vec<Vec<f32>> = Vec::new();
        let mut cand = next.gather(reduced, dim, &norms);
        while let Some(lead) = cand.lead() {
            if picks.len() > batch_start && !before(lead, next.boundary) {
                break;
            }
            let pick = lead.1;
            picks.push(pick);
            progress(picks.len(), count);
            if picks.len() == count {
                return (picks, skipped);
            }
            let (p, pn) = (row(pick), norms[pick]);
            // The distances from this pick to every earlier pick, with the same formula.
            let mut to_pick = Vec::with_capacity(pick_norms.len());
            to_pick.par_extend(
                pick_rows
                    .par_chunks(dim)
                    .zip(pick_norms.par_iter())
                    .map(|(q, &qn)| distance(dot(q, p), qn, pn)),
            );
            to_earlier.push(to_pick);
            pick_rows.extend_from_slice(p);
            pick_norms.push(pn);
            cand.apply(pick, p, pn);
            if picks.len() - batch_start == MAX_BATCH {
                break;
            }
        }
        // A picked row is never picked again (its own distance would be 0 in the original).
        for &pick in &picks[batch_start..] {
            d[pick] = f32::NEG_INFINITY;
        }
        // The pick-to-pick distances as a matrix with one row per earlier pick and one column per
        // batch pick, so that a row's pruning tests read its owner's distances contiguously.
        let width = picks.len() - batch_start;
        let mut owner_to_batch = vec![f32::INFINITY; picks.len() * width];
        for (m, to) in to_earlier.iter().enumerate() {
            for (a, &v) in to.iter().enumerate() {
                owner_to_batch[a * width + m] = v;
            }
        }
        let batch: Vec<BatchPick<'_>> = picks[batch_start..]
            .iter()
            .enumerate()
            .map(|(m, &pick)| ((batch_start + m) as u32, row(pick), norms[pick]))
            .collect();
        let kernel = RowKernel {
            reduced,
            norms: &norms,
            dim,
            batch: &batch,
            owner_to_batch: &owner_to_batch,
            margin,
        };
        skipped += d
            .par_chunks_mut(ROW_BLOCK)
            .zip(owner.par_chunks_mut(ROW_BLOCK))
            .enumerate()
            .map(|(c, (chunk, owners))| kernel.run(c * ROW_BLOCK, chunk, owners))
            .sum::<u64>();
        best = d
            .par_chunks(ROW_BLOCK)
            .enumerate()
            .map(|(c, chunk)| {
                let mut best = (f32::NEG_INFINITY, usize::MAX);
                for (o, &di) in chunk.iter().enumerate() {
                    if di > best.0 {
                        best = (di, c * ROW_BLOCK + o);
                    }
                }
                best
            })
            .reduce(|| (f32::NEG_INFINITY, usize::MAX), first_max);
        next = Candidates::select(&d, best, CANDIDATES);
    }
}

/// One pick of a batch: its number, row and squared norm.
type BatchPick<'a> = (u32, &'a [f32], f32);

/// The work of a pass on a block of rows: each row takes the batch's picks in pick order, with
/// the pruning test before each distance.
struct RowKernel<'a> {
    reduced: &'a [f32],
    norms: &'a [f32],
    dim: usize,
    batch: &'a [BatchPick<'a>],
    /// Entry `a · batch.len() + m`: the distance from pick `a` to the batch's pick `m`, for every
    /// pick `a` made before pick `m`.
    owner_to_batch: &'a [f32],
    margin: f64,
}

impl RowKernel<'_> {
    /// Updates rows `first..first + d.len()`; returns how many row updates the pruning skipped.
    ///
    /// On x86-64 processors with AVX-512 the same code is compiled a second time with those
    /// instructions enabled and chosen at run time. Floating-point operations are never reordered
    /// or fused by the compiler, so both versions give the same bits.
    fn run(&self, first: usize, d: &mut [f32], owner: &mut [u32]) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the processor supports AVX-512F, checked just above.
                return unsafe { self.run_avx512(first, d, owner) };
            }
        }
        self.run_portable(first, d, owner)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, first: usize, d: &mut [f32], owner: &mut [u32]) -> u64 {
        self.run_portable(first, d, owner)
    }

    #[inline(always)]
    fn run_portable(&self, first: usize, d: &mut [f32], owner: &mut [u32]) -> u64 {
        let dim = self.dim;
        let mut skips = 0u64;
        for (o, (di, owner)) in d.iter_mut().zip(owner).enumerate() {
            if *di == f32::NEG_INFINITY {
                continue;
            }
            let i = first + o;
            let r = &self.reduced[i * dim..(i + 1) * dim];
            let norm = self.norms[i];
            let width = self.batch.len();
            for (m, &(number, p, pn)) in self.batch.iter().enumerate() {
                let far = *owner != NO_OWNER
                    && f64::from(self.owner_to_batch[*owner as usize * width + m])
                        >= 2.0 * f64::from(*di) + self.margin;
                if far {
                    skips += 1;
                } else {
                    let new = distance(dot(r, p), norm, pn);
                    if new < *di {
                        *di = new;
                        *owner = number;
                    }
                }
            }
        }
        skips
    }
}

/// How many leading rows [`greedy`] keeps exact between passes.
const CANDIDATES: usize = 2048;
/// The most picks one pass applies.
const MAX_BATCH: usize = 256;

/// Whether `(value, index)` `a` comes before `b` in pick order: larger value first, then lower
/// index (the order of [`first_max`]).
#[inline]
fn before(a: (f32, usize), b: (f32, usize)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// The rows that lead in pick order after a pass, and the first row behind them.
struct Candidates {
    /// The leading rows' (distance, index), at most the requested number.
    rows: Vec<(f32, usize)>,
    /// The first row behind them in pick order, or `(−∞, usize::MAX)` when there is none; every
    /// row outside `rows` comes at or after it.
    boundary: (f32, usize),
}

impl Candidates {
    /// Selects the `amount` rows of `d` that lead in pick order (picked rows, at `−∞`, excluded);
    /// `best` is the overall leader.
    fn select(d: &[f32], best: (f32, usize), amount: usize) -> Self {
        let none = (f32::NEG_INFINITY, usize::MAX);
        if best.0 == f32::NEG_INFINITY {
            return Self {
                rows: Vec::new(),
                boundary: none,
            };
        }
        // Most rows are far behind the leaders: a cheap pass keeps those at or above a threshold,
        // chosen from a sample so that a few times `amount` rows survive, and lowers it if too few
        // do.
        let stride = (d.len() / (64 * amount)).max(1);
        let mut sample: Vec<f32> = d
            .iter()
            .step_by(stride)
            .copied()
            .filter(|&v| v != f32::NEG_INFINITY)
            .collect();
        let keep = ((4 * amount) / stride).max(1);
        let mut threshold = if sample.len() > keep {
            let (_, &mut t, _) = sample.select_nth_unstable_by(keep, |a, b| b.total_cmp(a));
            t
        } else {
            f32::NEG_INFINITY
        };
        loop {
            let mut rows: Vec<(f32, usize)> = d
                .par_iter()
                .enumerate()
                .filter(|&(_, &v)| v != f32::NEG_INFINITY && v >= threshold)
                .map(|(i, &v)| (v, i))
                .collect();
            if rows.len() > amount || threshold == f32::NEG_INFINITY {
                let order = |a: &(f32, usize), b: &(f32, usize)| {
                    if before(*a, *b) {
                        std::cmp::Ordering::Less
                    } else if before(*b, *a) {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                };
                if rows.len() > amount {
                    rows.select_nth_unstable_by(amount, order);
                    let boundary = rows[amount];
                    rows.truncate(amount);
                    return Self { rows, boundary };
                }
                return Self {
                    rows,
                    boundary: none,
                };
            }
            threshold = if threshold > 0.0 {
                threshold * 0.5
            } else {
                f32::NEG_INFINITY
            };
        }
    }

    /// Copies the candidates' rows and norms into a compact working set.
    fn gather(&self, reduced: &[f32], dim: usize, norms: &[f32]) -> Working {
        let mut rows = Vec::with_capacity(self.rows.len() * dim);
        for &(_, i) in &self.rows {
            rows.extend_from_slice(&reduced[i * dim..(i + 1) * dim]);
        }
        Working {
            dim,
            d: self.rows.clone(),
            norms: self.rows.iter().map(|&(_, i)| norms[i]).collect(),
            rows,
        }
    }
}

/// The candidates' exact distances, kept up to date pick by pick between passes.
struct Working {
    dim: usize,
    /// (distance, row index) per candidate; `−∞` once picked.
    d: Vec<(f32, usize)>,
    norms: Vec<f32>,
    rows: Vec<f32>,
}

impl Working {
    /// The candidate that leads in pick order, if any is left.
    fn lead(&self) -> Option<(f32, usize)> {
        self.d
            .iter()
            .copied()
            .filter(|&(v, _)| v != f32::NEG_INFINITY)
            .reduce(first_max)
    }

    /// Applies pick `pick` (row `p`, squared norm `pn`) to every candidate, with the formula and
    /// comparison of a pass.
    fn apply(&mut self, pick: usize, p: &[f32], pn: f32) {
        let dim = self.dim;
        self.d
            .par_iter_mut()
            .zip(self.norms.par_iter())
            .zip(self.rows.par_chunks(dim))
            .with_min_len(64)
            .for_each(|((entry, &norm), r)| {
                if entry.1 == pick {
                    entry.0 = f32::NEG_INFINITY;
                } else if entry.0 != f32::NEG_INFINITY {
                    let new = distance(dot(r, p), norm, pn);
                    if new < entry.0 {
                        entry.0 = new;
                    }
                }
            });
    }
}

/// Marks a row whose distance is still the mean distance to the start points.
const NO_OWNER: u32 = u32::MAX;

/// The margin that makes the triangle-inequality pruning exact.
///
/// Write `c(x, y)` for the computed distance (`f32`, the original's formula) and `t(x, y)` for
/// the true one. With all true norms at most `R`, each computed dot product of length `n` is off
/// by at most `γₙR²` (`γₙ = n·u / (1 − n·u)`, `u = 2⁻²⁴`, any summation order), and the two
/// additions by at most `8uR²` together, so the squared distance is off by at most
/// `δ = (4γₙ + 8u)·R²`; clamping does not increase that, the square root turns it into at most
/// `√δ`, and its rounding adds `u·(2R + √δ)`. So `|c − t| ≤ E = √δ·(1 + u) + 2uR` for every pair.
/// For row `i` with owner `a` (so `d[i] = c(i, a)`) and new pick `p`:
/// `c(i, p) ≥ t(i, p) − E ≥ t(a, p) − t(i, a) − E ≥ c(a, p) − d[i] − 3E`, so `c(a, p) ≥ 2·d[i] + 3E`
/// guarantees `c(i, p) ≥ d[i]`: the update could not change `d[i]`. The margin is `3E` with
/// slack for the `f64` comparison.
fn skip_margin(norms: &[f32], dim: usize) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    let nu = dim as f64 * u;
    let gamma = nu / (1.0 - nu).max(0.5);
    let max_norm = norms.iter().fold(0f32, |a, &b| a.max(b));
    // The computed squared norm may understate the true one by a factor of up to `1 − γ`.
    let r2 = f64::from(max_norm) * (1.0 + 2.0 * gamma) + f64::from(f32::MIN_POSITIVE);
    let r = r2.sqrt();
    let delta = (4.0 * gamma + 8.0 * u) * r2;
    let e = delta.sqrt() * (1.0 + u) + 2.0 * u * r;
    // Gradual underflow can add absolute errors of about 2⁻¹⁴⁹ per operation.
    3.0 * e * 1.01 + 1e-30
}

/// The larger of two `(value, index)` maxima, the lower index on ties; associative, so the
/// parallel reduction does not depend on how rayon splits the work.
fn first_max(a: (f32, usize), b: (f32, usize)) -> (f32, usize) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clustered data: `clusters` tight Gaussian-like blobs, the kind of data where pruning
    /// triggers.
    fn blobs(n: usize, dim: usize, clusters: usize, spread: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let centres: Vec<f32> = (0..clusters * dim)
            .map(|_| 10.0 * (2.0 * unit_f32(&mut rng) - 1.0))
            .collect();
        (0..n)
            .flat_map(|i| {
                let c = i % clusters;
                (0..dim)
                    .map(|k| {
                        let noise: f32 = (0..4).map(|_| unit_f32(&mut rng) - 0.5).sum();
                        centres[c * dim + k] + spread * noise
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn pruning_skips_work_without_changing_the_picks() {
        for (dim, spread) in [(128, 0.5), (16, 0.05), (3, 1.0)] {
            let x = blobs(6000, dim, 40, spread);
            let starts = start_points(6000, 10, 1);
            let (plain, none) = greedy(&x, dim, &starts, 600, &mut |_, _| {}, false);
            let (pruned, skipped) = greedy(&x, dim, &starts, 600, &mut |_, _| {}, true);
            assert_eq!(none, 0);
            assert_eq!(plain, pruned, "dim {dim}");
            let rate = skipped as f64 / (6000.0 * 599.0);
            println!(
                "dim {dim}: pruning skipped {:.1} % of row updates",
                100.0 * rate
            );
            assert!(rate > 0.2, "dim {dim}: skipped only {rate}");
        }
    }

    /// The algorithm written the plain way: one full update and one argmax per pick.
    fn plain_greedy(x: &[f32], dim: usize, starts: &[usize], count: usize) -> Vec<usize> {
        let n = x.len() / dim;
        let row = |i: usize| &x[i * dim..(i + 1) * dim];
        let norms: Vec<f32> = (0..n).map(|i| dot(row(i), row(i))).collect();
        let mut d: Vec<f32> = (0..n)
            .map(|i| {
                let sum = starts.iter().fold(0f32, |acc, &s| {
                    acc + distance(dot(row(i), row(s)), norms[i], norms[s])
                });
                sum / starts.len() as f32
            })
            .collect();
        let mut picks = Vec::new();
        while picks.len() < count {
            let pick = (0..n).map(|i| (d[i], i)).reduce(first_max).expect("rows").1;
            picks.push(pick);
            d[pick] = f32::NEG_INFINITY;
            for i in 0..n {
                let new = distance(dot(row(i), row(pick)), norms[i], norms[pick]);
                if d[i] != f32::NEG_INFINITY && new < d[i] {
                    d[i] = new;
                }
            }
        }
        picks
    }

    #[test]
    fn batched_passes_pick_as_one_pass_per_pick() {
        // More rows than candidates, duplicated rows for ties, and enough picks for several passes.
        let mut x = blobs(5000, 8, 30, 0.3);
        let copy = x[..800 * 8].to_vec();
        x.extend_from_slice(&copy);
        let starts = start_points(5800, 10, 3);
        for count in [1, 2, 300, 2500, 5800] {
            let (batched, _) = greedy(&x, 8, &starts, count, &mut |_, _| {}, true);
            assert_eq!(
                batched,
                plain_greedy(&x, 8, &starts, count),
                "{count} picks"
            );
        }
    }

    #[test]
    fn margin_bounds_the_formula_error() {
        // Nearly identical large rows: the formula's cancellation error must stay within E.
        let dim = 128;
        let a: Vec<f32> = (0..dim).map(|k| 1000.0 + k as f32 * 0.37).collect();
        let b: Vec<f32> = a.iter().map(|v| v + 0.001).collect();
        let norms = [dot(&a, &a), dot(&b, &b)];
        let e = skip_margin(&norms, dim) / 3.0;
        let computed = f64::from(distance(dot(&a, &b), norms[0], norms[1]));
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (computed - exact).abs() <= e,
            "{computed} vs {exact}, E = {e}"
        );
    }
}
