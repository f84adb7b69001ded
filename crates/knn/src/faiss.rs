//! FAISS backends: exact flat L2 on the CPU (`IndexFlatL2`) and on a GPU (`GpuIndexFlatL2`), and
//! approximate IVFPQ (`IndexIVFPQ`), as the original's `FaissNN`, its GPU variant and
//! `ApproximateFaissNN`.
//!
//! # Centring
//!
//! Every FAISS backend stores the bank minus its mean `μ` and searches queries minus `μ`. Squared
//! distances do not change under translation, but FAISS computes them as `‖x‖² + ‖y‖² − 2·x·y` in
//! `f32`, whose error grows with the norms; centring removes the part of the norms that a common
//! offset contributes. The mean is stored next to the FAISS index in the serialised form.
//!
//! # Exact backends: rescoring with a certificate
//!
//! The flat backends ask FAISS for `k' = min(n, 2k + 8)` candidates, rescore them as `Σ(x' − y')²`
//! in `f64` on the centred values and sort by distance, then bank index. With
//! `S = ‖x'‖ + max‖y'‖` and `e = (2γ_D + 32u)·S²` (`u = 2⁻²⁴`, `γ_D = D·u / (1 − D·u)`), every
//! FAISS distance lies within `e` of the exact one whatever the order of summation (dot products
//! and norms each within `γ_D·S²`, the final operations within a few `u·S²`). If FAISS's `k'`-th
//! distance minus `e` exceeds the `k`-th rescored distance, no row outside the candidates can be
//! among the `k` nearest, and the answer is exact. Otherwise the query is searched again with
//! eight times as many candidates, and once that would reach a quarter of the bank (or when the
//! bound could overflow `f32`) it is rescored against the whole bank in `f64`. So the result is
//! exact up to the rounding of the centring (at most `2⁻²⁴` relative per component, and none where
//! a value and the mean are within a factor of two), never negative, exactly zero for duplicates, and FAISS's `-1` labels and `3.4e38`
//! padding distances cannot leak out. The bound assumes FAISS computes in `f32` with correctly
//! rounded operations, as its CPU and GPU kernels do.
//!
//! # IVFPQ
//!
//! Distances are FAISS's product-quantisation estimates, as in the original; they are clamped at
//! zero and sorted by distance, then bank index. A query whose `nprobe` lists hold fewer than `k`
//! rows (FAISS pads with label `-1`) is searched again with `nprobe` doubled, up to all lists, so
//! every result has `k` real rows.
//!
//! # Threads
//!
//! FAISS parallelises with OpenMP, whose thread count (`nthreads-var`) is an internal control
//! variable of the *calling thread*: `omp_set_num_threads` only affects parallel regions that the
//! calling thread starts afterwards. Each FAISS call of a backend whose configuration names a
//! thread count sets it on the calling thread and restores the previous value afterwards, so two
//! backends with different counts can be used concurrently from different threads without
//! affecting each other or the rest of the process. What this cannot isolate: FAISS calls made
//! from inside an OpenMP parallel region, and the total number of threads when several threads
//! search at once (each brings its own OpenMP team).

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::io::{Read, Write};

use byteorder::{LittleEndian, ReadBytesExt, WriteBytesExt};
use faiss::index::{FromInnerPtr, IndexImpl, NativeIndex};
use faiss::{FlatIndex, Index, MetricType};
use faiss_sys as sys;

use crate::format::{truncated, Checksum};
use crate::{IndexSpec, IvfPqConfig, KnnError, KnnIndex, Neighbors, OnTooSmall};

const MAGIC: [u8; 8] = *b"PCKNNFA1";
const VERSION: u32 = 1;
/// The stream holds a FAISS `IndexFlatL2`.
const KIND_FLAT: u8 = 1;
/// The stream holds a FAISS `IndexIVFPQ`.
const KIND_IVFPQ: u8 = 2;
/// The unit roundoff of `f32`.
const U: f64 = f32::EPSILON as f64 / 2.0;
/// `S²` above which `f32` distances could overflow; such queries are rescored exhaustively.
const MAX_SAFE_SQUARED: f64 = 1e36;

#[link(name = "gomp")]
extern "C" {
    fn omp_get_max_threads() -> c_int;
    fn omp_set_num_threads(n: c_int);
}

/// Sets the calling thread's OpenMP thread count while it lives and restores the previous one.
struct OmpThreads(Option<c_int>);

impl OmpThreads {
    fn set(threads: Option<usize>) -> Self {
        match threads {
            Some(t) if t > 0 => {
                let t = c_int::try_from(t).unwrap_or(c_int::MAX);
                // SAFETY: these libgomp calls read and write the calling thread's control
                // variables only.
                let previous = unsafe { omp_get_max_threads() };
                unsafe { omp_set_num_threads(t) };
                OmpThreads(Some(previous))
            }
            _ => OmpThreads(None),
        }
    }
}

impl Drop for OmpThreads {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            // SAFETY: as in `set`.
            unsafe { omp_set_num_threads(previous) };
        }
    }
}

/// The calling thread's OpenMP thread count (for tests of the isolation above).
#[cfg(test)]
fn omp_max_threads() -> c_int {
    // SAFETY: as in `OmpThreads::set`.
    unsafe { omp_get_max_threads() }
}

/// Turns a FAISS C API return code into a result, with FAISS's message.
fn check(code: c_int, context: &'static str) -> Result<(), KnnError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: FAISS returns a pointer to its thread-local last error message, or null.
    let message = unsafe {
        let p = sys::faiss_get_last_error();
        if p.is_null() {
            format!("error code {code}")
        } else {
            CStr::from_ptr(p).to_string_lossy().trim().to_string()
        }
    };
    Err(KnnError::Faiss { context, message })
}

/// Maps an error of the `faiss` crate.
fn crate_error(context: &'static str) -> impl FnOnce(faiss::error::Error) -> KnnError {
    move |e| KnnError::Faiss {
        context,
        message: e.to_string(),
    }
}

/// A bank checked, centred and measured for FAISS.
struct Prepared {
    n: usize,
    mean: Vec<f32>,
    centred: Vec<f32>,
    max_norm: f64,
}

/// Checks a bank as [`IndexSpec::build`] documents and centres it.
fn prepare(bank: &[f32], dim: usize) -> Result<Prepared, KnnError> {
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
    if c_int::try_from(dim).is_err() {
        return Err(KnnError::Config(format!(
            "dimension {dim} exceeds FAISS's limit of {}",
            c_int::MAX
        )));
    }
    if let Some(row) = bank
        .chunks_exact(dim)
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(KnnError::NonFinite { row, what: "bank" });
    }
    let mut sums = vec![0f64; dim];
    for row in bank.chunks_exact(dim) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let mean: Vec<f32> = sums.iter().map(|s| (s / n as f64) as f32).collect();
    let mut centred = Vec::with_capacity(bank.len());
    let mut max_norm = 0f64;
    for row in bank.chunks_exact(dim) {
        let start = centred.len();
        centred.extend(row.iter().zip(&mean).map(|(v, m)| v - m));
        max_norm = max_norm.max(squared_norm(&centred[start..]).sqrt());
    }
    Ok(Prepared {
        n,
        mean,
        centred,
        max_norm,
    })
}

/// `Σ v²` in `f64`.
fn squared_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// `Σ(a − b)²` in `f64`.
fn exact_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// Orders `(distance, index)` pairs by distance, then index.
fn by_distance_then_index(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// What computes the candidates.
enum Engine {
    /// `IndexFlatL2` on the CPU (also the IVFPQ backend's exact fallback).
    Flat(FlatIndex),
    /// `GpuIndexFlatL2`, with the CPU index it was copied from (for rescoring and writing).
    #[cfg(feature = "faiss-gpu")]
    Gpu { host: FlatIndex, gpu: gpu::GpuFlat },
    /// `IndexIVFPQ`.
    IvfPq { index: IndexImpl, lists: usize },
}

/// A FAISS backend's index.
pub(crate) struct FaissIndex {
    spec: IndexSpec,
    dim: usize,
    n: usize,
    /// The bank mean subtracted from the bank and from queries.
    mean: Vec<f32>,
    /// The largest Euclidean norm of a centred bank row.
    max_norm: f64,
    engine: Engine,
}

impl fmt::Debug for FaissIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = match &self.engine {
            Engine::Flat(_) => "IndexFlatL2",
            #[cfg(feature = "faiss-gpu")]
            Engine::Gpu { .. } => "GpuIndexFlatL2",
            Engine::IvfPq { .. } => "IndexIVFPQ",
        };
        f.debug_struct("FaissIndex")
            .field("spec", &self.spec)
            .field("dim", &self.dim)
            .field("len", &self.n)
            .field("engine", &engine)
            .finish_non_exhaustive()
    }
}

/// The thread count a specification asks for.
fn threads_of(spec: &IndexSpec) -> Option<usize> {
    match spec {
        IndexSpec::FaissFlat(c) => c.threads,
        IndexSpec::IvfPq(c) => c.threads,
        _ => None,
    }
}

/// Checks IVFPQ parameters that do not depend on the bank size.
fn check_ivfpq(config: &IvfPqConfig, dim: usize) -> Result<(), KnnError> {
    if config.lists == 0 || c_int::try_from(config.lists).is_err() {
        return Err(KnnError::Config(format!(
            "ivfpq lists = {} must be between 1 and {}",
            config.lists,
            c_int::MAX
        )));
    }
    if !(1..=16).contains(&config.bits) {
        return Err(KnnError::Config(format!(
            "ivfpq bits = {} must be between 1 and 16",
            config.bits
        )));
    }
    if config.nprobe == 0 || config.nprobe > config.lists {
        return Err(KnnError::Config(format!(
            "ivfpq nprobe = {} must be between 1 and lists = {}",
            config.nprobe, config.lists
        )));
    }
    if config.sub_quantizers == 0 || dim % config.sub_quantizers != 0 {
        return Err(KnnError::SubQuantizers {
            dim,
            sub_quantizers: config.sub_quantizers,
        });
    }
    Ok(())
}

/// The error for a bank of `n` rows if it is too small to train `config`, else `None`.
///
/// The limits are FAISS's own: below them FAISS prints "please provide at least ... training
/// points" and trains poorly populated centroids (or fails outright below one point per centroid).
fn too_few(config: &IvfPqConfig, n: usize) -> Option<KnnError> {
    let per_centroid = IvfPqConfig::MIN_POINTS_PER_CENTROID;
    let needed_for_lists = per_centroid.saturating_mul(config.lists);
    let codebook = 1usize << config.bits;
    let needed_for_codebooks = per_centroid.saturating_mul(codebook);
    (n < needed_for_lists || n < needed_for_codebooks).then_some(KnnError::TooFewToTrain {
        bank_size: n,
        per_centroid,
        lists: config.lists,
        needed_for_lists,
        bits: config.bits,
        codebook,
        needed_for_codebooks,
    })
}

/// Builds a CPU `IndexFlatL2` over centred rows.
fn flat_index(centred: &[f32], dim: usize, threads: Option<usize>) -> Result<FlatIndex, KnnError> {
    let mut index = FlatIndex::new_l2(dim as u32).map_err(crate_error("creating IndexFlatL2"))?;
    let _threads = OmpThreads::set(threads);
    index
        .add(centred)
        .map_err(crate_error("adding the bank to IndexFlatL2"))?;
    Ok(index)
}

impl FaissIndex {
    /// Builds the index that `spec` (a FAISS variant) describes over `bank`.
    pub(crate) fn build(spec: &IndexSpec, bank: &[f32], dim: usize) -> Result<Self, KnnError> {
        if let IndexSpec::IvfPq(config) = spec {
            if dim > 0 {
                check_ivfpq(config, dim)?;
            }
        }
        let prepared = prepare(bank, dim)?;
        let threads = threads_of(spec);
        let engine = match spec {
            IndexSpec::FaissFlat(_) => Engine::Flat(flat_index(&prepared.centred, dim, threads)?),
            #[cfg(feature = "faiss-gpu")]
            IndexSpec::FaissGpuFlat(config) => {
                let host = flat_index(&prepared.centred, dim, None)?;
                let gpu = gpu::GpuFlat::new(&host, config.device)?;
                Engine::Gpu { host, gpu }
            }
            IndexSpec::IvfPq(config) => match too_few(config, prepared.n) {
                Some(err) if config.on_too_small == OnTooSmall::Error => return Err(err),
                Some(err) => {
                    log::warn!("{err}; falling back to exact search (on_too_small = exact)");
                    Engine::Flat(flat_index(&prepared.centred, dim, threads)?)
                }
                None => {
                    let description = format!(
                        "IVF{},PQ{}x{}np",
                        config.lists, config.sub_quantizers, config.bits
                    );
                    let mut index = faiss::index_factory(dim as u32, description, MetricType::L2)
                        .map_err(crate_error("creating IndexIVFPQ"))?;
                    let _threads = OmpThreads::set(threads);
                    index
                        .train(&prepared.centred)
                        .map_err(crate_error("training IndexIVFPQ"))?;
                    index
                        .add(&prepared.centred)
                        .map_err(crate_error("adding the bank to IndexIVFPQ"))?;
                    Engine::IvfPq {
                        index,
                        lists: config.lists,
                    }
                }
            },
            other => {
                return Err(KnnError::Config(format!(
                    "{other:?} is not a FAISS backend"
                )))
            }
        };
        Ok(FaissIndex {
            spec: spec.clone(),
            dim,
            n: prepared.n,
            mean: prepared.mean,
            max_norm: prepared.max_norm,
            engine,
        })
    }

    /// The FAISS index that is serialised (the CPU one for the GPU backend).
    fn native(&self) -> *mut sys::FaissIndex {
        match &self.engine {
            Engine::Flat(index) => index.inner_ptr(),
            #[cfg(feature = "faiss-gpu")]
            Engine::Gpu { host, .. } => host.inner_ptr(),
            Engine::IvfPq { index, .. } => index.inner_ptr(),
        }
    }

    /// Exact search on a flat engine: FAISS candidates, rescored and certified (module docs).
    ///
    /// `raw(queries, k', distances, labels)` runs one FAISS search. Queries whose candidates cannot
    /// be certified are searched again with eight times as many candidates; once that would be a
    /// quarter of the bank or more (or the error bound is unusable), they are rescored against the
    /// whole bank instead.
    fn search_flat(
        &self,
        host: &FlatIndex,
        centred: &[f32],
        k: usize,
        raw: impl Fn(&[f32], usize, &mut [f32], &mut [i64]) -> Result<(), KnnError>,
    ) -> Result<Neighbors, KnnError> {
        let dim = self.dim;
        let n = self.n;
        let nq = centred.len() / dim;
        let bank = host.xb();
        let gamma = dim as f64 * U / (1.0 - dim as f64 * U);
        let mut distances = vec![0f32; nq * k];
        let mut indices = vec![0u32; nq * k];
        let mut candidates: Vec<(f64, u32)> = Vec::new();
        let mut pending: Vec<usize> = (0..nq).collect();
        let mut exhaustive: Vec<usize> = Vec::new();
        let mut kk = n.min(2 * k + 8);
        let mut rows: Vec<f32> = Vec::new();
        while !pending.is_empty() {
            let subset: &[f32] = if pending.len() == nq {
                centred
            } else {
                rows.clear();
                for &q in &pending {
                    rows.extend_from_slice(&centred[q * dim..(q + 1) * dim]);
                }
                &rows
            };
            let m = pending.len();
            let mut faiss_d = vec![0f32; m * kk];
            let mut faiss_i = vec![0i64; m * kk];
            raw(subset, kk, &mut faiss_d, &mut faiss_i)?;
            let mut failed = Vec::new();
            for (p, &q) in pending.iter().enumerate() {
                let x = &centred[q * dim..(q + 1) * dim];
                let s = squared_norm(x).sqrt() + self.max_norm;
                let s2 = s * s;
                if !(gamma > 0.0 && gamma < 1.0 && s2 <= MAX_SAFE_SQUARED) {
                    exhaustive.push(q);
                    continue;
                }
                let labels = &faiss_i[p * kk..(p + 1) * kk];
                if labels.iter().any(|&l| l < 0 || l as usize >= n) {
                    failed.push(q);
                    continue;
                }
                candidates.clear();
                candidates.extend(labels.iter().map(|&l| {
                    let j = l as usize;
                    (exact_distance(x, &bank[j * dim..(j + 1) * dim]), j as u32)
                }));
                candidates.sort_unstable_by(by_distance_then_index);
                let bound = (2.0 * gamma + 32.0 * U) * s2 + f64::from(f32::MIN_POSITIVE);
                let last = f64::from(faiss_d[(p + 1) * kk - 1]);
                let certified = kk == n || (last.is_finite() && last - bound > candidates[k - 1].0);
                if !certified {
                    failed.push(q);
                    continue;
                }
                for (r, &(d, j)) in candidates[..k].iter().enumerate() {
                    // Casting rounds to nearest and saturates to infinity beyond `f32::MAX`.
                    distances[q * k + r] = d as f32;
                    indices[q * k + r] = j;
                }
            }
            let wider = kk.saturating_mul(8).min(n);
            if wider < n.div_ceil(4) {
                kk = wider;
                pending = failed;
            } else {
                exhaustive.extend(failed);
                pending = Vec::new();
            }
        }
        for q in exhaustive {
            let x = &centred[q * dim..(q + 1) * dim];
            candidates.clear();
            candidates.extend(
                bank.chunks_exact(dim)
                    .enumerate()
                    .map(|(j, y)| (exact_distance(x, y), j as u32)),
            );
            if k < candidates.len() {
                candidates.select_nth_unstable_by(k - 1, by_distance_then_index);
                candidates.truncate(k);
            }
            candidates.sort_unstable_by(by_distance_then_index);
            for (r, &(d, j)) in candidates[..k].iter().enumerate() {
                distances[q * k + r] = d as f32;
                indices[q * k + r] = j;
            }
        }
        Ok(Neighbors::new(k, distances, indices))
    }

    /// Approximate IVFPQ search; queries with padded results are repeated with more lists.
    fn search_ivfpq(
        &self,
        index: &IndexImpl,
        lists: usize,
        nprobe: usize,
        centred: &[f32],
        k: usize,
    ) -> Result<Neighbors, KnnError> {
        let dim = self.dim;
        let nq = centred.len() / dim;
        let mut distances = vec![0f32; nq * k];
        let mut indices = vec![0u32; nq * k];
        let mut pending: Vec<usize> = (0..nq).collect();
        let mut nprobe = nprobe;
        let mut rows: Vec<f32> = Vec::new();
        let mut row: Vec<(f32, u32)> = Vec::with_capacity(k);
        while !pending.is_empty() {
            let subset: &[f32] = if pending.len() == nq {
                centred
            } else {
                rows.clear();
                for &q in &pending {
                    rows.extend_from_slice(&centred[q * dim..(q + 1) * dim]);
                }
                &rows
            };
            let m = pending.len();
            let mut d = vec![0f32; m * k];
            let mut l = vec![0i64; m * k];
            ivf_search(
                index,
                nprobe,
                threads_of(&self.spec),
                subset,
                k,
                &mut d,
                &mut l,
            )?;
            let mut still = Vec::new();
            for (p, &q) in pending.iter().enumerate() {
                let labels = &l[p * k..(p + 1) * k];
                if labels.iter().any(|&j| j < 0 || j as usize >= self.n) {
                    still.push(q);
                    continue;
                }
                row.clear();
                row.extend(
                    d[p * k..(p + 1) * k]
                        .iter()
                        .zip(labels)
                        .map(|(&dist, &j)| (if dist > 0.0 { dist } else { 0.0 }, j as u32)),
                );
                row.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                for (r, &(dist, j)) in row.iter().enumerate() {
                    distances[q * k + r] = dist;
                    indices[q * k + r] = j;
                }
            }
            if !still.is_empty() && nprobe >= lists {
                return Err(KnnError::Faiss {
                    context: "searching IndexIVFPQ",
                    message: format!(
                        "fewer than k = {k} results for {} queries although all {lists} lists \
                         were visited",
                        still.len()
                    ),
                });
            }
            pending = still;
            nprobe = (nprobe * 2).min(lists);
        }
        Ok(Neighbors::new(k, distances, indices))
    }

    /// Reads an index written by [`KnnIndex::write_to`] for a FAISS `spec`.
    pub(crate) fn read(spec: &IndexSpec, r: &mut dyn Read) -> Result<Self, KnnError> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(truncated("magic"))?;
        if magic != MAGIC {
            return Err(KnnError::Corrupt(format!(
                "bad magic {magic:02x?}: not a patchcore-knn FAISS index (expected {MAGIC:02x?})"
            )));
        }
        let version = r.read_u32::<LittleEndian>().map_err(truncated("version"))?;
        if version != VERSION {
            return Err(KnnError::Corrupt(format!(
                "unsupported FAISS index format version {version} (this build reads version \
                 {VERSION})"
            )));
        }
        let kind = r.read_u8().map_err(truncated("index kind"))?;
        let dim = r
            .read_u64::<LittleEndian>()
            .map_err(truncated("dimension"))?;
        let n = r
            .read_u64::<LittleEndian>()
            .map_err(truncated("row count"))?;
        if dim == 0 || n == 0 || dim > c_int::MAX as u64 || n > u64::from(u32::MAX) {
            return Err(KnnError::Corrupt(format!(
                "header declares {n} rows of dimension {dim}; both must be positive and \
                 addressable"
            )));
        }
        let mut sum = Checksum::new();
        sum.word(u64::from(version));
        sum.word(u64::from(kind));
        sum.word(dim);
        sum.word(n);
        let mut mean_bytes = Vec::new();
        let want = 4 * dim;
        r.take(want).read_to_end(&mut mean_bytes)?;
        if (mean_bytes.len() as u64) < want {
            return Err(KnnError::Corrupt(format!(
                "stream truncated while reading the bank mean: expected {want} bytes, got {}",
                mean_bytes.len()
            )));
        }
        let mean: Vec<f32> = mean_bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        sum.floats(&mean);
        let max_norm = r
            .read_f64::<LittleEndian>()
            .map_err(truncated("largest row norm"))?;
        sum.word(max_norm.to_bits());
        let len = r
            .read_u64::<LittleEndian>()
            .map_err(truncated("FAISS payload length"))?;
        let mut payload = Vec::new();
        r.take(len).read_to_end(&mut payload)?;
        if (payload.len() as u64) < len {
            return Err(KnnError::Corrupt(format!(
                "stream truncated: the FAISS index should have {len} bytes, got {}",
                payload.len()
            )));
        }
        sum.bytes(&payload);
        let stored = r
            .read_u64::<LittleEndian>()
            .map_err(truncated("checksum"))?;
        if stored != sum.0 {
            return Err(KnnError::Corrupt(format!(
                "checksum mismatch: stored {stored:#018x}, computed {:#018x}",
                sum.0
            )));
        }
        if !(max_norm.is_finite() && max_norm >= 0.0) || mean.iter().any(|m| !m.is_finite()) {
            return Err(KnnError::Corrupt(
                "the stored bank mean or norm is not finite".into(),
            ));
        }
        let (dim, n) = (dim as usize, n as usize);
        let native = read_native(&payload)?;
        // SAFETY: FAISS returns ownership of a valid, newly allocated index.
        let native = unsafe { IndexImpl::from_inner_ptr(native) };
        if native.d() as usize != dim || native.ntotal() != n as u64 || !native.is_trained() {
            return Err(KnnError::Corrupt(format!(
                "the FAISS index holds {} rows of dimension {} (trained: {}), the header \
                 declares {n} rows of dimension {dim}",
                native.ntotal(),
                native.d(),
                native.is_trained()
            )));
        }
        let engine = match (spec, kind) {
            (IndexSpec::FaissFlat(_), KIND_FLAT) => Engine::Flat(into_flat(native)?),
            (
                IndexSpec::IvfPq(IvfPqConfig {
                    on_too_small: OnTooSmall::Exact,
                    ..
                }),
                KIND_FLAT,
            ) => Engine::Flat(into_flat(native)?),
            #[cfg(feature = "faiss-gpu")]
            (IndexSpec::FaissGpuFlat(config), KIND_FLAT) => {
                let host = into_flat(native)?;
                let gpu = gpu::GpuFlat::new(&host, config.device)?;
                Engine::Gpu { host, gpu }
            }
            (IndexSpec::IvfPq(config), KIND_IVFPQ) => {
                check_ivfpq(config, dim)?;
                // SAFETY: the pointer is a valid index; the cast returns null for other types.
                let ivf = unsafe { sys::faiss_IndexIVF_cast(native.inner_ptr()) };
                if ivf.is_null() {
                    return Err(KnnError::Corrupt(
                        "the stream declares an IVFPQ index but FAISS read another type".into(),
                    ));
                }
                // SAFETY: `ivf` is a valid `IndexIVF`.
                let lists = unsafe { sys::faiss_IndexIVF_nlist(ivf) };
                if lists != config.lists {
                    return Err(KnnError::Corrupt(format!(
                        "the stored IVFPQ index has {lists} lists, the configuration {}",
                        config.lists
                    )));
                }
                Engine::IvfPq {
                    index: native,
                    lists,
                }
            }
            (_, kind) => {
                return Err(KnnError::Corrupt(format!(
                    "the stream holds a FAISS index of kind {kind} ({}), which the `{}` backend \
                     with this configuration does not read",
                    match kind {
                        KIND_FLAT => "IndexFlatL2",
                        KIND_IVFPQ => "IndexIVFPQ",
                        _ => "unknown",
                    },
                    spec.backend_name()
                )))
            }
        };
        Ok(FaissIndex {
            spec: spec.clone(),
            dim,
            n,
            mean,
            max_norm,
            engine,
        })
    }
}

/// Converts an index read by FAISS into a flat index, or reports the mismatch.
fn into_flat(native: IndexImpl) -> Result<FlatIndex, KnnError> {
    native.into_flat().map_err(|e| {
        KnnError::Corrupt(format!(
            "the stream declares an IndexFlatL2 but FAISS read another type ({e})"
        ))
    })
}

/// One IVFPQ search with `nprobe` lists per query.
fn ivf_search(
    index: &IndexImpl,
    nprobe: usize,
    threads: Option<usize>,
    queries: &[f32],
    k: usize,
    distances: &mut [f32],
    labels: &mut [i64],
) -> Result<(), KnnError> {
    let nq = (queries.len() / index.d() as usize) as i64;
    let mut params: *mut sys::FaissSearchParametersIVF = std::ptr::null_mut();
    // SAFETY: creates a parameter object owned below; null selector, no code limit.
    check(
        unsafe {
            sys::faiss_SearchParametersIVF_new_with(&mut params, std::ptr::null_mut(), nprobe, 0)
        },
        "creating IVF search parameters",
    )?;
    struct Params(*mut sys::FaissSearchParametersIVF);
    impl Drop for Params {
        fn drop(&mut self) {
            // SAFETY: the object was created above and is freed once.
            unsafe { sys::faiss_SearchParametersIVF_free(self.0) };
        }
    }
    let params = Params(params);
    let _threads = OmpThreads::set(threads);
    // SAFETY: the buffers hold `nq × dim` queries and `nq × k` results; IVF search does not
    // modify the index, so concurrent searches are allowed.
    check(
        unsafe {
            sys::faiss_Index_search_with_params(
                index.inner_ptr(),
                nq,
                queries.as_ptr(),
                k as i64,
                params.0,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
            )
        },
        "searching IndexIVFPQ",
    )
}

/// One flat CPU search.
fn flat_search(
    index: &FlatIndex,
    threads: Option<usize>,
    queries: &[f32],
    k: usize,
    distances: &mut [f32],
    labels: &mut [i64],
) -> Result<(), KnnError> {
    let nq = (queries.len() / index.d() as usize) as i64;
    let _threads = OmpThreads::set(threads);
    // SAFETY: the buffers hold `nq × dim` queries and `nq × k` results; flat search does not
    // modify the index, so concurrent searches are allowed.
    check(
        unsafe {
            sys::faiss_Index_search(
                index.inner_ptr(),
                nq,
                queries.as_ptr(),
                k as i64,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
            )
        },
        "searching IndexFlatL2",
    )
}

impl KnnIndex for FaissIndex {
    fn spec(&self) -> IndexSpec {
        self.spec.clone()
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
        if let Some(row) = queries
            .chunks_exact(dim)
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(KnnError::NonFinite { row, what: "query" });
        }
        if queries.is_empty() {
            return Ok(Neighbors::new(k, Vec::new(), Vec::new()));
        }
        let centred: Vec<f32> = queries
            .chunks_exact(dim)
            .flat_map(|q| q.iter().zip(&self.mean).map(|(v, m)| v - m))
            .collect();
        let threads = threads_of(&self.spec);
        match &self.engine {
            Engine::Flat(index) => self.search_flat(index, &centred, k, |x, kk, d, l| {
                flat_search(index, threads, x, kk, d, l)
            }),
            #[cfg(feature = "faiss-gpu")]
            Engine::Gpu { host, gpu } => self.search_flat(host, &centred, k, |x, kk, d, l| {
                gpu.search(x, dim, kk, d, l)
            }),
            Engine::IvfPq { index, lists } => {
                let nprobe = match &self.spec {
                    IndexSpec::IvfPq(c) => c.nprobe,
                    _ => 1,
                };
                self.search_ivfpq(index, *lists, nprobe, &centred, k)
            }
        }
    }

    fn write_to(&self, w: &mut dyn Write) -> Result<(), KnnError> {
        let payload = write_native(self.native())?;
        let kind = match self.engine {
            Engine::IvfPq { .. } => KIND_IVFPQ,
            _ => KIND_FLAT,
        };
        let mut sum = Checksum::new();
        sum.word(u64::from(VERSION));
        sum.word(u64::from(kind));
        sum.word(self.dim as u64);
        sum.word(self.n as u64);
        sum.floats(&self.mean);
        sum.word(self.max_norm.to_bits());
        sum.bytes(&payload);
        w.write_all(&MAGIC)?;
        w.write_u32::<LittleEndian>(VERSION)?;
        w.write_u8(kind)?;
        w.write_u64::<LittleEndian>(self.dim as u64)?;
        w.write_u64::<LittleEndian>(self.n as u64)?;
        let mut bytes = Vec::with_capacity(4 * self.dim);
        for m in &self.mean {
            bytes.extend_from_slice(&m.to_le_bytes());
        }
        w.write_all(&bytes)?;
        w.write_f64::<LittleEndian>(self.max_norm)?;
        w.write_u64::<LittleEndian>(payload.len() as u64)?;
        w.write_all(&payload)?;
        w.write_u64::<LittleEndian>(sum.0)?;
        w.flush()?;
        Ok(())
    }
}

thread_local! {
    /// The buffer FAISS's custom writer appends to, or its custom reader reads from. FAISS's C
    /// API passes no context pointer to these callbacks, and it calls them on the thread that
    /// called `faiss_write_index_custom` or `faiss_read_index_custom`, so a thread-local buffer
    /// serves as the context.
    static IO_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The read position in [`IO_BUFFER`].
    static IO_POSITION: Cell<usize> = const { Cell::new(0) };
}

/// FAISS's custom writer: appends `size × nitems` bytes and reports `nitems` written.
unsafe extern "C" fn write_callback(ptr: *const c_void, size: usize, nitems: usize) -> usize {
    let Some(len) = size.checked_mul(nitems) else {
        return 0;
    };
    if len == 0 {
        return nitems;
    }
    // SAFETY: FAISS passes `size × nitems` readable bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    IO_BUFFER.with(|b| b.borrow_mut().extend_from_slice(bytes));
    nitems
}

/// FAISS's custom reader: copies as many whole items as remain and reports how many.
unsafe extern "C" fn read_callback(ptr: *mut c_void, size: usize, nitems: usize) -> usize {
    if size == 0 || nitems == 0 {
        return 0;
    }
    IO_BUFFER.with(|b| {
        let buffer = b.borrow();
        let position = IO_POSITION.with(Cell::get);
        let available = (buffer.len() - position) / size;
        let items = nitems.min(available);
        let len = items * size;
        // SAFETY: FAISS passes room for `size × nitems` bytes at `ptr`; `len` is no more.
        unsafe {
            std::ptr::copy_nonoverlapping(buffer[position..].as_ptr(), ptr.cast::<u8>(), len);
        }
        IO_POSITION.with(|p| p.set(position + len));
        items
    })
}

/// Serialises a FAISS CPU index with FAISS's own format into memory.
fn write_native(index: *mut sys::FaissIndex) -> Result<Vec<u8>, KnnError> {
    IO_BUFFER.with(|b| b.borrow_mut().clear());
    let mut writer: *mut sys::FaissCustomIOWriter = std::ptr::null_mut();
    // SAFETY: creates a writer object that is freed below.
    check(
        unsafe { sys::faiss_CustomIOWriter_new(&mut writer, Some(write_callback)) },
        "creating a FAISS writer",
    )?;
    // SAFETY: `index` is a valid CPU index; `writer` is a `CustomIOWriter`, an `IOWriter`.
    let code = unsafe { sys::faiss_write_index_custom(index, writer.cast(), 0) };
    // SAFETY: frees the writer created above.
    unsafe { sys::faiss_CustomIOWriter_free(writer) };
    let bytes = IO_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    check(code, "serialising the index")?;
    Ok(bytes)
}

/// Deserialises a FAISS index from FAISS's own format in memory.
fn read_native(bytes: &[u8]) -> Result<*mut sys::FaissIndex, KnnError> {
    IO_BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.extend_from_slice(bytes);
    });
    IO_POSITION.with(|p| p.set(0));
    let mut reader: *mut sys::FaissCustomIOReader = std::ptr::null_mut();
    // SAFETY: creates a reader object that is freed below.
    check(
        unsafe { sys::faiss_CustomIOReader_new(&mut reader, Some(read_callback)) },
        "creating a FAISS reader",
    )?;
    let mut index: *mut sys::FaissIndex = std::ptr::null_mut();
    // SAFETY: `reader` is a `CustomIOReader`, an `IOReader`; FAISS allocates the index.
    let code = unsafe { sys::faiss_read_index_custom(reader.cast(), 0, &mut index) };
    // SAFETY: frees the reader created above.
    unsafe { sys::faiss_CustomIOReader_free(reader) };
    let consumed = IO_POSITION.with(Cell::get);
    IO_BUFFER.with(|b| *b.borrow_mut() = Vec::new());
    if let Err(e) = check(code, "reading the index") {
        return Err(KnnError::Corrupt(format!(
            "FAISS could not read the stored index: {e}"
        )));
    }
    if index.is_null() {
        return Err(KnnError::Corrupt("FAISS read no index".into()));
    }
    if consumed != bytes.len() {
        // SAFETY: frees the index FAISS just allocated, which nothing else owns.
        unsafe { sys::faiss_Index_free(index) };
        return Err(KnnError::Corrupt(format!(
            "the FAISS index used {consumed} of its {} bytes",
            bytes.len()
        )));
    }
    Ok(index)
}

#[cfg(feature = "faiss-gpu")]
mod gpu {
    //! `GpuIndexFlatL2` through FAISS's C API; compiled only with the `faiss-gpu` feature.

    use std::ffi::c_int;
    use std::sync::Mutex;

    use faiss::index::NativeIndex;
    use faiss::FlatIndex;
    use faiss_sys as sys;

    use super::check;
    use crate::KnnError;

    /// A flat index on one GPU with its resources; every call is serialised by a mutex because
    /// FAISS's GPU resources are not safe to use from several threads at once.
    pub(super) struct GpuFlat {
        lock: Mutex<()>,
        resources: *mut sys::FaissStandardGpuResources,
        index: *mut sys::FaissGpuIndex,
    }

    // SAFETY: the raw pointers are owned by this value and only used under `lock`.
    unsafe impl Send for GpuFlat {}
    // SAFETY: as above.
    unsafe impl Sync for GpuFlat {}

    impl GpuFlat {
        /// Copies `host` to GPU `device`.
        pub(super) fn new(host: &FlatIndex, device: u32) -> Result<Self, KnnError> {
            let device = c_int::try_from(device)
                .map_err(|_| KnnError::Config(format!("GPU device {device} is out of range")))?;
            let mut resources: *mut sys::FaissStandardGpuResources = std::ptr::null_mut();
            // SAFETY: creates resources owned by the returned value.
            check(
                unsafe { sys::faiss_StandardGpuResources_new(&mut resources) },
                "creating GPU resources",
            )?;
            let mut index: *mut sys::FaissGpuIndex = std::ptr::null_mut();
            // SAFETY: `resources` is valid, `host` a valid CPU flat index.
            let code = unsafe {
                sys::faiss_index_cpu_to_gpu(resources, device, host.inner_ptr(), &mut index)
            };
            if let Err(e) = check(code, "copying the index to the GPU") {
                // SAFETY: frees the resources created above.
                unsafe { sys::faiss_StandardGpuResources_free(resources) };
                return Err(e);
            }
            Ok(GpuFlat {
                lock: Mutex::new(()),
                resources,
                index,
            })
        }

        /// One search of `queries` (rows of `dim`) for `k` neighbours.
        pub(super) fn search(
            &self,
            queries: &[f32],
            dim: usize,
            k: usize,
            distances: &mut [f32],
            labels: &mut [i64],
        ) -> Result<(), KnnError> {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let nq = (queries.len() / dim) as i64;
            // SAFETY: the buffers hold `nq × dim` queries and `nq × k` results; calls are
            // serialised by the lock.
            check(
                unsafe {
                    sys::faiss_Index_search(
                        self.index,
                        nq,
                        queries.as_ptr(),
                        k as i64,
                        distances.as_mut_ptr(),
                        labels.as_mut_ptr(),
                    )
                },
                "searching GpuIndexFlatL2",
            )
        }
    }

    impl Drop for GpuFlat {
        fn drop(&mut self) {
            // SAFETY: both objects are owned by this value; the index goes before its resources.
            unsafe {
                sys::faiss_Index_free(self.index);
                sys::faiss_StandardGpuResources_free(self.resources);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmp_thread_counts_are_per_thread() {
        let outer = omp_max_threads();
        let inner = std::thread::spawn(|| {
            let before = omp_max_threads();
            let guard = OmpThreads::set(Some(3));
            let during = omp_max_threads();
            // Another thread does not see this thread's setting.
            let other = std::thread::spawn(omp_max_threads).join().unwrap();
            drop(guard);
            (before, during, other, omp_max_threads())
        })
        .join()
        .unwrap();
        let (before, during, other, after) = inner;
        assert_eq!(during, 3);
        assert_eq!(after, before);
        assert_eq!(other, before);
        assert_eq!(omp_max_threads(), outer);
        let guard = OmpThreads::set(None);
        assert_eq!(omp_max_threads(), outer);
        drop(guard);
    }

    #[test]
    fn too_few_names_both_numbers() {
        let config = IvfPqConfig::default();
        let err = too_few(&config, 16_384).unwrap();
        let text = err.to_string();
        for number in ["16384", "19968", "512", "9984", "256"] {
            assert!(text.contains(number), "{number} missing from: {text}");
        }
        assert!(too_few(&config, 19_968).is_none());
        let small = IvfPqConfig {
            lists: 2,
            ..IvfPqConfig::default()
        };
        assert!(matches!(
            too_few(&small, 9_983),
            Some(KnnError::TooFewToTrain {
                needed_for_lists: 78,
                needed_for_codebooks: 9_984,
                ..
            })
        ));
        assert!(too_few(&small, 9_984).is_none());
    }
}
