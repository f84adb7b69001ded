//! The exact, pure-Rust backend: a GEMM shortlist guarded by a rigorous error bound, then exact
//! `f64` rescoring.
//!
//! # Why the shortlist is exact
//!
//! Let `d(y) = ‖x − y‖²` be the exact distance of query `x` to bank row `y` and `d̃(y)` its GEMM
//! value `‖x'‖² + ‖y'‖² − 2·x'·y'`, computed in `f32` from the centred rows `x' = x − μ`,
//! `y' = y − μ`. If `|d̃(y) − d(y)| ≤ e` for every `y`, and `d̃ₖ` is the `k`-th smallest GEMM
//! value, then the `k` rows achieving `d̃ₖ` have exact distances at most `d̃ₖ + e`, so the exact
//! `k`-th distance is `dₖ ≤ d̃ₖ + e`, and every row `y` with `d(y) ≤ dₖ` (including all ties) has
//! `d̃(y) ≤ dₖ + e ≤ d̃ₖ + 2e`. Keeping every row with `d̃(y) ≤ d̃ₖ + 2e` and rescoring those
//! exactly therefore finds the exact `k` nearest rows.
//!
//! The bound `e` for one query: with `u = 2⁻²⁴` and `γ_D = D·u / (1 − D·u)`, a dot product of
//! length `D` in any summation order has error at most `γ_D·‖x'‖·‖y'‖`, each squared norm (computed
//! in `f64`, rounded once) at most `u·‖·‖²`, and the two final `f32` operations at most
//! `u·(‖x'‖ + ‖y'‖)²` each. Rounding during centring perturbs each row by at most `u` relative per
//! component, which moves the distance by at most about `2u·S²`. With `S = ‖x'‖ + max‖y'‖` all of
//! this is below `(2γ_D + 24u)·S²`, plus an absolute term for gradual underflow. When `S²` is so
//! large that `f32` could overflow, the query is rescored against the whole bank instead.
//!
//! With the bfloat16 shortlist ([`ShortlistArithmetic::Bf16`]) the dot product is computed from
//! the rows rounded to bfloat16, and `e` grows by the rounding error of those roundings (see
//! `ExactIndex::bf16_bound`); the argument above is unchanged, so the results are too.

use std::fmt;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernel::{self, NR};
use crate::{format, ExactConfig, IndexSpec, KnnError, KnnIndex, Neighbors, ShortlistArithmetic};

/// The most queries per GEMM tile of the portable path.
const QUERY_BLOCK: usize = 128;
/// The most queries per block of the AVX-512 kernel: a multiple of [`kernel::MR`] whose packed
/// rows (896 KiB at 1024 dimensions in `f32`, half that in bfloat16) stay in a core's L2 cache
/// while the bank streams past.
const KERNEL_QUERY_BLOCK: usize = 16 * kernel::MR;
/// Bank rows per GEMM tile.
const BANK_BLOCK: usize = 4096;
/// Fewest bank rows worth giving a separate work item when splitting the bank across threads.
const MIN_BANK_PART: usize = 4096;
/// `S²` above which the `f32` GEMM path could overflow; such queries are rescored exhaustively.
const MAX_SAFE_SQUARED: f64 = 1e36;
/// The unit roundoff of `f32`.
const U: f64 = f32::EPSILON as f64 / 2.0;
/// The unit roundoff of bfloat16 (8 significant bits).
const U_BF16: f64 = 1.0 / 256.0;

/// The exact backend's index.
pub(crate) struct ExactIndex {
    config: ExactConfig,
    dim: usize,
    n: usize,
    /// The original rows, for exact rescoring and serialisation.
    bank: Vec<f32>,
    /// The rows minus `mean` in the layout of the kernel that computes the shortlist.
    layout: Layout,
    /// The bank mean (rounded to `f32`).
    mean: Vec<f32>,
    /// Squared norms of the centred rows.
    norms: Vec<f32>,
    /// The largest Euclidean norm of a centred row.
    max_norm: f64,
    /// Whether `max_norm` is so large that the GEMM path could overflow for every query.
    exhaustive: bool,
    pool: rayon::ThreadPool,
}

/// Which kernel computes the shortlist's dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelChoice {
    /// The bfloat16 kernel if the configuration asks for it and the CPU has AVX512-BF16, else the
    /// `f32` AVX-512 kernel where the CPU has AVX-512F, else the portable one.
    Auto,
    /// The `gemm` crate on row-major data, on every CPU.
    #[cfg(test)]
    Portable,
}

/// The centred bank, laid out for one kernel.
enum Layout {
    /// Row-major rows for the `gemm` crate.
    RowMajor(Vec<f32>),
    /// Panels of [`NR`] rows for the AVX-512 kernel (see [`kernel`]), with one squared norm per
    /// packed row: the rows' norms, then NaN for the padding.
    Packed { panels: Vec<f32>, norms: Vec<f32> },
    /// The same panels of bfloat16 pairs for the AVX512-BF16 kernel, with the norms of the `f32`
    /// centred rows.
    PackedBf16 { panels: Vec<u32>, norms: Vec<f32> },
}

impl fmt::Debug for ExactIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExactIndex")
            .field("config", &self.config)
            .field("dim", &self.dim)
            .field("len", &self.n)
            .field("threads", &self.pool.current_num_threads())
            .field(
                "kernel",
                &match self.layout {
                    Layout::RowMajor(_) => "portable",
                    Layout::Packed { .. } => "avx512",
                    Layout::PackedBf16 { .. } => "avx512-bf16",
                },
            )
            .finish_non_exhaustive()
    }
}

/// Returns the first row of `data` holding a NaN or an infinity.
fn first_non_finite(data: &[f32], dim: usize) -> Option<usize> {
    data.chunks_exact(dim)
        .position(|row| row.iter().any(|v| !v.is_finite()))
}

/// `Σ v²` accumulated in `f64`.
fn squared_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// The exact squared distance `Σ(a − b)²`, accumulated in `f64`.
fn exact_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

impl ExactIndex {
    pub(crate) fn new(config: ExactConfig, bank: Vec<f32>, dim: usize) -> Result<Self, KnnError> {
        Self::with_kernel(config, bank, dim, KernelChoice::Auto)
    }

    pub(crate) fn with_kernel(
        config: ExactConfig,
        bank: Vec<f32>,
        dim: usize,
        choice: KernelChoice,
    ) -> Result<Self, KnnError> {
        if dim == 0 {
            return Err(KnnError::ZeroDimension);
        }
        if bank.len() % dim != 0 {
            return Err(KnnError::RaggedInput {
                len: bank.len(),
                dim,
            });
        }
        let n = bank.len() / dim;
        if n == 0 {
            return Err(KnnError::EmptyBank);
        }
        if u32::try_from(n).is_err() {
            return Err(KnnError::BankTooLarge { len: n });
        }
        if let Some(row) = first_non_finite(&bank, dim) {
            return Err(KnnError::NonFinite { row, what: "bank" });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.unwrap_or(0))
            .thread_name(|i| format!("patchcore-knn-{i}"))
            .build()
            .map_err(|e| KnnError::Config(format!("cannot create the thread pool: {e}")))?;

        let auto = choice == KernelChoice::Auto;
        let bf16 =
            auto && config.shortlist == ShortlistArithmetic::Bf16 && kernel::available_bf16();
        let packed = auto && kernel::available();
        let (mean, layout, norms) = pool.install(|| {
            // Column sums in f64, accumulated per block of rows in parallel.
            let sums = bank
                .par_chunks(dim * 256)
                .map(|rows| {
                    let mut s = vec![0f64; dim];
                    for row in rows.chunks_exact(dim) {
                        for (acc, &v) in s.iter_mut().zip(row) {
                            *acc += f64::from(v);
                        }
                    }
                    s
                })
                .reduce(
                    || vec![0f64; dim],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                        a
                    },
                );
            let mean: Vec<f32> = sums.iter().map(|s| (s / n as f64) as f32).collect();
            if bf16 {
                let (panels, norms) =
                    centre_and_pack(&bank, &mean, dim.div_ceil(2), |panel, rows| {
                        kernel::pack_bf16_into(panel, rows, dim, NR)
                    });
                let rows = norms[..n].to_vec();
                (mean, Layout::PackedBf16 { panels, norms }, rows)
            } else if packed {
                let (panels, norms) = centre_and_pack(&bank, &mean, dim, |panel, rows| {
                    kernel::pack_into(panel, rows, dim, NR)
                });
                let rows = norms[..n].to_vec();
                (mean, Layout::Packed { panels, norms }, rows)
            } else {
                let mut centred = bank.clone();
                let norms: Vec<f32> = centred
                    .par_chunks_mut(dim)
                    .map(|row| {
                        row.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m);
                        squared_norm(row) as f32
                    })
                    .collect();
                (mean, Layout::RowMajor(centred), norms)
            }
        });
        let max_squared = norms.iter().fold(0f32, |a, &b| a.max(b));
        let max_norm = f64::from(max_squared).sqrt() * (1.0 + 4.0 * U);
        Ok(ExactIndex {
            config,
            dim,
            n,
            exhaustive: max_norm.is_nan() || max_norm * max_norm > MAX_SAFE_SQUARED,
            bank,
            layout,
            mean,
            norms,
            max_norm,
            pool,
        })
    }

    /// The error bound `e` of the GEMM distances of a query with centred norm `query_norm`, or
    /// `None` when the GEMM path is unsafe for it.
    fn bound(&self, query_norm: f64) -> Option<f64> {
        if self.exhaustive {
            return None;
        }
        let s = query_norm * (1.0 + 4.0 * U) + self.max_norm;
        let s2 = s * s;
        if s2.is_nan() || s2 > MAX_SAFE_SQUARED {
            return None;
        }
        let du = self.dim as f64 * U;
        let gamma = du / (1.0 - du).max(0.5);
        // The absolute term covers gradual underflow: each of the ~2D + 8 operations may lose up
        // to half the smallest subnormal.
        let underflow = (2 * self.dim + 8) as f64 * 2f64.powi(-149);
        let bound = (2.0 * gamma + 24.0 * U) * s2 + underflow;
        Some(match self.layout {
            Layout::PackedBf16 { .. } => bound + self.bf16_bound(query_norm, s, gamma),
            Layout::Packed { .. } | Layout::RowMajor(_) => bound,
        })
    }

    /// The extra error of a distance whose dot product `x'·y'` is computed from bfloat16 roundings
    /// `x̂ᵢ = x'ᵢ(1 + δᵢ) + αᵢ`, `|δᵢ| ≤ u_b = 2⁻⁸`, `|αᵢ| < 2⁻¹²⁶` (flushed tiny values), with
    /// exact products summed in `f32` (`vdpbf16ps`, whose subnormal results are flushed to zero).
    ///
    /// The rounding moves the exact dot product by at most `(2u_b + u_b²)·Σ|x'ᵢy'ᵢ|` plus the
    /// flushed terms, and the `f32` sum of the rounded products errs by at most
    /// `γ_D·Σ|x̂ᵢŷᵢ| ≤ γ_D·(1 + u_b)²·Σ|x'ᵢy'ᵢ|` (the `f32` bound already covers one `γ_D`) plus
    /// one flushed result of magnitude below 2⁻¹²⁶ per step. With `Σ|x'ᵢy'ᵢ| ≤ ‖x'‖·max‖y'‖` and
    /// the distance carrying twice the dot product, this is below
    /// `2·(2u_b + u_b² + 2γ_D)·‖x'‖·max‖y'‖ + 2·2⁻¹²⁵·(√D·S + D)`.
    fn bf16_bound(&self, query_norm: f64, s: f64, gamma: f64) -> f64 {
        let relative = 2.0 * U_BF16 + U_BF16 * U_BF16 + 2.0 * gamma;
        let norms = query_norm * (1.0 + 4.0 * U) * self.max_norm;
        let flushed = 2f64.powi(-125) * ((self.dim as f64).sqrt() * s + self.dim as f64);
        2.0 * (relative * norms + flushed) * (1.0 + 1e-6)
    }

    /// Shortlists candidates for queries `q0..q1` against bank rows `b0..b1`.
    ///
    /// With the AVX-512 kernel, `b0` must be a multiple of [`NR`] and `b1` either a multiple of
    /// [`NR`] or the bank size.
    fn shortlist(
        &self,
        queries: &[f32],
        k: usize,
        q0: usize,
        q1: usize,
        b0: usize,
        b1: usize,
    ) -> Block {
        let dim = self.dim;
        let m = q1 - q0;
        let mut centred = queries[q0 * dim..q1 * dim].to_vec();
        let mut query_norms = Vec::with_capacity(m);
        let mut lists = Vec::with_capacity(m);
        for row in centred.chunks_exact_mut(dim) {
            row.iter_mut().zip(&self.mean).for_each(|(v, m)| *v -= m);
            let sq = squared_norm(row);
            query_norms.push(sq as f32);
            lists.push(self.bound(sq.sqrt()).map(|e| Shortlist::new(e, k)));
        }
        if lists.iter().all(Option::is_none) || b0 >= b1 {
            return Block { lists };
        }
        match &self.layout {
            Layout::PackedBf16 { panels, norms } => {
                let packed = kernel::pack_bf16(&centred, dim, kernel::MR);
                let bank = kernel::Panels {
                    values: panels,
                    norms,
                };
                // SAFETY: the bf16 layout is only built when `kernel::available_bf16()` reported
                // AVX-512F and AVX512-BF16; `packed` and `bank` hold `dim.div_ceil(2)` pairs per
                // row.
                unsafe {
                    scan_packed::<kernel::Bf16>(
                        &packed,
                        &query_norms,
                        &mut lists,
                        bank,
                        dim.div_ceil(2),
                        b0..b1,
                    )
                };
            }
            Layout::Packed { panels, norms } => {
                let packed = kernel::pack(&centred, dim, kernel::MR);
                let bank = kernel::Panels {
                    values: panels,
                    norms,
                };
                // SAFETY: the packed layout is only built when `kernel::available()` reported
                // AVX-512F; `packed` and `bank` hold `dim` values per row.
                unsafe {
                    scan_packed::<kernel::F32>(&packed, &query_norms, &mut lists, bank, dim, b0..b1)
                };
            }
            Layout::RowMajor(bank) => {
                self.shortlist_portable(bank, &centred, &query_norms, &mut lists, b0, b1);
            }
        }
        Block { lists }
    }

    /// The portable shortlist: tiles of dot products from the `gemm` crate, then a scalar scan.
    fn shortlist_portable(
        &self,
        bank: &[f32],
        centred: &[f32],
        query_norms: &[f32],
        lists: &mut [Option<Shortlist>],
        b0: usize,
        b1: usize,
    ) {
        let dim = self.dim;
        let m = lists.len();
        let mut dots = vec![0f32; m * BANK_BLOCK.min(b1 - b0)];
        let mut t0 = b0;
        while t0 < b1 {
            let t1 = (t0 + BANK_BLOCK).min(b1);
            let nb = t1 - t0;
            let dots = &mut dots[..m * nb];
            // SAFETY: `dots` holds `m × nb` values written row-major (row stride `nb`, column
            // stride 1); `centred` holds `m × dim` values read row-major (row stride `dim`); the
            // right-hand side is the `dim × nb` transpose of bank rows `t0..t1`, i.e. element
            // `(kk, j)` at `bank[(t0 + j)·dim + kk]` (row stride 1, column stride `dim`), all
            // inside `bank`. The buffers do not overlap and `read_dst` is false.
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    dim,
                    dots.as_mut_ptr(),
                    1,
                    nb as isize,
                    false,
                    centred.as_ptr(),
                    1,
                    dim as isize,
                    bank[t0 * dim..t1 * dim].as_ptr(),
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
            let norms = &self.norms[t0..t1];
            for ((list, &qn), row) in lists.iter_mut().zip(query_norms).zip(dots.chunks_exact(nb)) {
                if let Some(list) = list {
                    list.scan(qn, norms, row, t0 as u32);
                }
            }
            t0 = t1;
        }
    }
}

/// Centres the rows of `bank` on `mean` and packs them panel by panel (panels of [`NR`] rows of
/// `steps` elements each, written by `pack`), in parallel and without a row-major centred copy of
/// the bank. Returns the panels and one squared norm per packed row: the centred rows' norms, then
/// NaN for the padding.
fn centre_and_pack<T: Copy + Default + Send>(
    bank: &[f32],
    mean: &[f32],
    steps: usize,
    pack: impl Fn(&mut [T], &[f32]) + Sync,
) -> (Vec<T>, Vec<f32>) {
    let dim = mean.len();
    let n = bank.len() / dim;
    let mut panels = vec![T::default(); n.div_ceil(NR) * NR * steps];
    let norms: Vec<Vec<f32>> = panels
        .par_chunks_mut(NR * steps)
        .zip(bank.par_chunks(NR * dim))
        .map(|(panel, rows)| {
            let centred: Vec<f32> = rows
                .chunks_exact(dim)
                .flat_map(|row| row.iter().zip(mean).map(|(v, m)| v - m))
                .collect();
            pack(panel, &centred);
            let mut norms = vec![f32::NAN; NR];
            for (norm, row) in norms.iter_mut().zip(centred.chunks_exact(dim)) {
                *norm = squared_norm(row) as f32;
            }
            norms
        })
        .collect();
    (panels, norms.concat())
}

/// Offers the distances of the packed queries to bank rows `rows` (whole panels of [`NR`] rows,
/// except at the end of the bank) to their shortlists, with the AVX-512 kernel of arithmetic `A`.
///
/// # Safety
///
/// The CPU must support `A`'s instructions; `queries` must hold `lists.len().div_ceil(MR)` query
/// panels and `bank` the whole packed bank, both with `steps` elements per row.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
unsafe fn scan_packed<A: kernel::Arithmetic>(
    queries: &[A::Elem],
    query_norms: &[f32],
    lists: &mut [Option<Shortlist>],
    bank: kernel::Panels<'_, A::Elem>,
    steps: usize,
    rows: std::ops::Range<usize>,
) {
    debug_assert!(rows.start % NR == 0 && rows.end.div_ceil(NR) * NR <= bank.norms.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; panels `rows.start / NR .. rows.end.div_ceil(NR)` exist.
    unsafe {
        kernel::scan_panels::<A>(
            queries,
            query_norms,
            lists,
            bank,
            steps,
            rows.start / NR..rows.end.div_ceil(NR),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed layouts are only built on x86_64");
}

/// Per-query shortlists of one work item; `None` marks a query to be rescored exhaustively.
struct Block {
    lists: Vec<Option<Shortlist>>,
}

/// The running shortlist of one query: every `(GEMM distance, index)` that may still be among the
/// `k` nearest.
pub(crate) struct Shortlist {
    /// `2e`, the width of the acceptance band above the `k`-th best GEMM distance.
    band: f64,
    /// Accept distances `≤ threshold`; starts at infinity and only decreases.
    threshold: f32,
    /// Prune when the list reaches this length.
    capacity: usize,
    k: usize,
    items: Vec<(f32, u32)>,
}

impl Shortlist {
    fn new(bound: f64, k: usize) -> Self {
        Shortlist {
            band: 2.0 * bound,
            threshold: f32::INFINITY,
            capacity: (4 * k).max(64),
            k,
            items: Vec::new(),
        }
    }

    /// The current acceptance threshold: GEMM distances above it can be dropped.
    pub(crate) fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Offers one GEMM distance `d` of bank row `index`.
    #[inline]
    pub(crate) fn offer(&mut self, d: f32, index: u32) {
        if d <= self.threshold {
            self.items.push((d, index));
            if self.items.len() >= self.capacity {
                self.prune();
            }
        }
    }

    /// Offers one tile row of GEMM dot products with bank rows `base..`.
    fn scan(&mut self, query_norm: f32, norms: &[f32], dots: &[f32], base: u32) {
        for (j, (&bn, &dot)) in norms.iter().zip(dots).enumerate() {
            self.offer((query_norm + bn) - 2.0 * dot, base + j as u32);
        }
    }

    /// Drops every item beyond `k`-th best + `2e` and lowers the threshold accordingly.
    fn prune(&mut self) {
        if self.items.len() < self.k {
            return;
        }
        let k = self.k;
        self.items
            .select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
        self.threshold = self.threshold.min(raise(self.items[k - 1].0, self.band));
        let threshold = self.threshold;
        self.items.retain(|c| c.0 <= threshold);
        if 2 * self.items.len() > self.capacity {
            self.capacity *= 2;
        }
    }
}

/// `kth + band`, rounded up to `f32`: the relative and absolute slack dominate the error of the
/// `f64` addition and of the rounding to `f32` (subnormals included).
fn raise(kth: f32, band: f64) -> f32 {
    ((f64::from(kth) + band) * (1.0 + 1e-6) + 1e-44) as f32
}

/// Orders exact candidates by distance, then by bank index.
fn by_distance_then_index(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

impl ExactIndex {
    /// Merges the shortlists of one query from all bank parts, rescores the survivors exactly and
    /// writes the `k` nearest into `distances` and `indices`.
    fn finish<'a>(
        &self,
        query: &[f32],
        lists: impl Iterator<Item = &'a Option<Shortlist>>,
        distances: &mut [f32],
        indices: &mut [u32],
    ) {
        let k = distances.len();
        let candidates = self.candidates(lists, k);
        let dim = self.dim;
        let mut scored: Vec<(f64, u32)> = candidates
            .into_iter()
            .map(|j| {
                let row = &self.bank[j as usize * dim..(j as usize + 1) * dim];
                (exact_distance(query, row), j)
            })
            .collect();
        if scored.len() > k {
            scored.select_nth_unstable_by(k - 1, by_distance_then_index);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_distance_then_index);
        for ((d, i), (dist, idx)) in distances.iter_mut().zip(indices.iter_mut()).zip(scored) {
            *d = dist as f32;
            *i = idx;
        }
    }
}

impl ExactIndex {
    /// The bank rows to rescore exactly for one query: those whose GEMM distance is within `2e`
    /// of the `k`-th best over all bank parts, or every row when the GEMM path was unsafe.
    fn candidates<'a>(
        &self,
        lists: impl Iterator<Item = &'a Option<Shortlist>>,
        k: usize,
    ) -> Vec<u32> {
        let mut items: Vec<(f32, u32)> = Vec::new();
        let mut band = 0.0;
        let mut exhaustive = false;
        for list in lists {
            match list {
                Some(list) => {
                    items.extend_from_slice(&list.items);
                    band = list.band;
                }
                None => exhaustive = true,
            }
        }
        if exhaustive || items.len() < k {
            return (0..self.n as u32).collect();
        }
        items.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
        let threshold = raise(items[k - 1].0, band);
        items
            .iter()
            .filter(|c| c.0 <= threshold)
            .map(|c| c.1)
            .collect()
    }
}

impl KnnIndex for ExactIndex {
    fn spec(&self) -> IndexSpec {
        IndexSpec::Exact(self.config.clone())
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.n
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Neighbors, KnnError> {
        let dim = self.dim;
        if queries.len() % dim != 0 {
            return Err(KnnError::DimensionMismatch {
                expected: dim,
                got: queries.len(),
            });
        }
        if k == 0 || k > self.n {
            return Err(KnnError::InvalidK {
                k,
                bank_size: self.n,
            });
        }
        if let Some(row) = first_non_finite(queries, dim) {
            return Err(KnnError::NonFinite { row, what: "query" });
        }
        let nq = queries.len() / dim;
        let mut distances = vec![0f32; nq * k];
        let mut indices = vec![0u32; nq * k];
        if nq == 0 {
            return Ok(Neighbors::new(k, distances, indices));
        }
        self.pool.install(|| {
            // Work items are (query block, bank part) pairs; the bank is split only when there are
            // too few query blocks to keep every thread busy.
            // Round the number of query blocks up to a multiple of the thread count and size the
            // blocks evenly, so that no thread is left with a lone short block at the end.
            // The AVX-512 kernel wants whole panels of queries and of bank rows.
            let (query_block, query_align, bank_align) = match self.layout {
                Layout::Packed { .. } | Layout::PackedBf16 { .. } => {
                    (KERNEL_QUERY_BLOCK, kernel::MR, NR)
                }
                Layout::RowMajor(_) => (QUERY_BLOCK, 1, 1),
            };
            let threads = rayon::current_num_threads();
            let blocks = nq.div_ceil(query_block).div_ceil(threads) * threads;
            let block = nq.div_ceil(blocks).next_multiple_of(query_align);
            let blocks = nq.div_ceil(block);
            let parts = if blocks >= 2 * threads {
                1
            } else {
                (2 * threads)
                    .div_ceil(blocks)
                    .min(self.n.div_ceil(MIN_BANK_PART))
                    .max(1)
            };
            let part_len = self.n.div_ceil(parts).next_multiple_of(bank_align);
            let shortlists: Vec<Block> = (0..blocks * parts)
                .into_par_iter()
                .map(|item| {
                    let (b, p) = (item / parts, item % parts);
                    let q0 = b * block;
                    let q1 = (q0 + block).min(nq);
                    let b0 = (p * part_len).min(self.n);
                    let b1 = (b0 + part_len).min(self.n);
                    self.shortlist(queries, k, q0, q1, b0, b1)
                })
                .collect();
            distances
                .par_chunks_mut(block * k)
                .zip(indices.par_chunks_mut(block * k))
                .enumerate()
                .for_each(|(b, (dist, idx))| {
                    let block_parts = &shortlists[b * parts..(b + 1) * parts];
                    let rows = dist.chunks_exact_mut(k).zip(idx.chunks_exact_mut(k));
                    for (i, (d, ix)) in rows.enumerate() {
                        let q = b * block + i;
                        let query = &queries[q * dim..(q + 1) * dim];
                        let lists = block_parts.iter().map(|p| &p.lists[i]);
                        self.finish(query, lists, d, ix);
                    }
                });
        });
        Ok(Neighbors::new(k, distances, indices))
    }

    fn write_to(&self, w: &mut dyn std::io::Write) -> Result<(), KnnError> {
        format::write_exact(w, self.dim, &self.bank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn values(n: usize, mut state: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    #[test]
    fn shortlist_stays_short_on_offset_data() {
        let dim = 64;
        let n = 3000;
        let bank: Vec<f32> = values(n * dim, 1).iter().map(|v| 1e3 + v).collect();
        let queries: Vec<f32> = values(20 * dim, 2).iter().map(|v| 1e3 + v).collect();
        let index = ExactIndex::new(
            ExactConfig {
                threads: Some(1),
                ..ExactConfig::default()
            },
            bank,
            dim,
        )
        .unwrap();
        for k in [1, 5] {
            let block = index.shortlist(&queries, k, 0, 20, 0, n);
            for (q, list) in block.lists.iter().enumerate() {
                let shortlisted = index.candidates(std::iter::once(list), k).len();
                assert!(
                    (k..=k + 10).contains(&shortlisted),
                    "query {q}, k {k}: {shortlisted} candidates"
                );
            }
        }
    }

    /// The AVX-512 kernels, `f32` and bfloat16 (where this CPU has them), and the portable `gemm`
    /// path must give bit-identical results, on shapes that leave partial query and bank panels.
    #[test]
    fn kernels_agree_bit_for_bit() {
        for (seed, (n, nq, dim, offset)) in [
            (1, 37, 3, 0.0),
            (33, 15, 7, 0.0),
            (1000, 29, 64, 50.0),
            (4097, 200, 48, 0.0),
            (9000, 250, 32, -3.0),
        ]
        .into_iter()
        .enumerate()
        {
            let bank: Vec<f32> = values(n * dim, 10 + seed as u64)
                .iter()
                .map(|v| offset + v)
                .collect();
            let mut queries: Vec<f32> = values(nq * dim, 20 + seed as u64)
                .iter()
                .map(|v| offset + v)
                .collect();
            // An exact duplicate of a bank row.
            queries[..dim].copy_from_slice(&bank[(n / 2) * dim..(n / 2 + 1) * dim]);
            for threads in [1, 3] {
                let config = ExactConfig {
                    threads: Some(threads),
                    ..ExactConfig::default()
                };
                let auto = ExactIndex::new(config.clone(), bank.clone(), dim).unwrap();
                let f32_kernel = ExactIndex::new(
                    ExactConfig {
                        shortlist: ShortlistArithmetic::F32,
                        ..config.clone()
                    },
                    bank.clone(),
                    dim,
                )
                .unwrap();
                let bf16_kernel = ExactIndex::new(
                    ExactConfig {
                        shortlist: ShortlistArithmetic::Bf16,
                        ..config.clone()
                    },
                    bank.clone(),
                    dim,
                )
                .unwrap();
                let portable =
                    ExactIndex::with_kernel(config, bank.clone(), dim, KernelChoice::Portable)
                        .unwrap();
                for k in [1, 3.min(n), 10.min(n)] {
                    let b = portable.search(&queries, k).unwrap();
                    for index in [&auto, &f32_kernel, &bf16_kernel] {
                        let a = index.search(&queries, k).unwrap();
                        let what = format!("{index:?}, n {n}, nq {nq}, k {k}");
                        assert_eq!(a.indices(), b.indices(), "{what}");
                        assert_eq!(a.distances(), b.distances(), "{what}");
                        assert_eq!(a.row(0).0[0], 0.0);
                    }
                }
            }
        }
    }

    /// The bfloat16 band is wider than the `f32` one, but on data whose nearest neighbours stand
    /// out from the rest it still leaves a handful of rows to rescore, never the whole bank.
    #[test]
    fn bf16_shortlist_stays_short_on_clustered_data() {
        if !kernel::available_bf16() {
            eprintln!("notice: this CPU lacks AVX512-BF16; the bf16 shortlist is not exercised");
            return;
        }
        let dim = 256;
        let n = 2000;
        // Rows around 100 centres; queries near bank rows, as test patches near training patches.
        let centres = values(100 * dim, 3);
        let noise = values(n * dim, 4);
        let bank: Vec<f32> = (0..n * dim)
            .map(|i| 10.0 + 4.0 * centres[(i / dim % 100) * dim + i % dim] + noise[i])
            .collect();
        let jitter = values(50 * dim, 5);
        let queries: Vec<f32> = (0..50 * dim)
            .map(|i| bank[(i / dim * 37 % n) * dim + i % dim] + 0.3 * jitter[i])
            .collect();
        let index = ExactIndex::new(
            ExactConfig {
                threads: Some(1),
                shortlist: ShortlistArithmetic::Bf16,
            },
            bank,
            dim,
        )
        .unwrap();
        assert!(matches!(index.layout, Layout::PackedBf16 { .. }));
        let block = index.shortlist(&queries, 1, 0, 50, 0, n);
        let total: usize = block
            .lists
            .iter()
            .map(|list| index.candidates(std::iter::once(list), 1).len())
            .sum();
        assert!(total <= 50 * 25, "{total} candidates for 50 queries");
    }

    #[test]
    fn huge_values_fall_back_to_exhaustive_rescoring() {
        let bank = [1e20f32, 0.0, -1e20, 0.0, 0.0, 1.0];
        let index = ExactIndex::new(ExactConfig::default(), bank.to_vec(), 2).unwrap();
        let found = index.search(&[1e20, 1.0], 3).unwrap();
        assert_eq!(found.indices(), &[0, 2, 1]);
        assert_eq!(found.distances()[0], 1.0);
        assert!(found.distances().iter().all(|d| !d.is_nan()));
    }
}
