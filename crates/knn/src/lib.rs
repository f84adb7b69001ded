//! Nearest-neighbour search over PatchCore memory banks.
//!
//! A memory bank is a flat, row-major `&[f32]` of `n × dim` values. An [`IndexSpec`] describes a
//! backend and its configuration; [`IndexSpec::build`] turns a bank into a boxed [`KnnIndex`], and
//! [`KnnIndex::search`] returns the `k` nearest bank rows of every query as [`Neighbors`], with
//! **squared** Euclidean distances (what FAISS `IndexFlatL2` returns) sorted ascending.
//!
//! ```
//! use patchcore_knn::{ExactConfig, IndexSpec};
//!
//! let bank = [0.0, 0.0, 1.0, 0.0, 0.0, 3.0];
//! let index = IndexSpec::Exact(ExactConfig::default()).build(&bank, 2)?;
//! let found = index.search(&[0.9, 0.1], 2)?;
//! let (distances, indices) = found.row(0);
//! assert_eq!(indices, &[1, 0]);
//! assert!((distances[0] - 0.02).abs() < 1e-6);
//! # Ok::<(), patchcore_knn::KnnError>(())
//! ```
//!
//! ## Design
//!
//! * **One trait, many backends.** [`KnnIndex`] is object safe and `Send + Sync`, so the exact
//!   pure-Rust backend and the FAISS backends (flat CPU, flat GPU, IVFPQ; behind cargo features,
//!   see below) are interchangeable behind `Box<dyn KnnIndex>`. [`IndexSpec`] is the serialisable
//!   description (`{"backend": "exact", "threads": null}`) that builds or reads an index, in the
//!   style of linfa-nn.
//! * **Exact backend.** Distances are first computed for tiles of queries × bank rows as
//!   `‖x‖² + ‖y‖² − 2·x·y`, on data centred on the bank mean, in parallel on a per-index rayon
//!   thread pool (never the global one). Where the CPU has AVX-512F (detected at run time), a
//!   fused kernel multiplies query panels with a bank packed into panels once at build time and
//!   filters the distances in registers, so the distance matrix is never written to memory;
//!   elsewhere the portable `gemm` crate computes tiles of dot products. With
//!   [`ShortlistArithmetic::Bf16`] (the default) on a CPU with AVX512-BF16, the packed bank holds
//!   bfloat16 pairs multiplied with `vdpbf16ps` at twice the `f32` rate, and the band below widens
//!   by the bfloat16 rounding error. All kernels give bit-identical results. That formulation
//!   cancels catastrophically when distances are small next to the norms, so it is only used to
//!   *shortlist*: every bank row whose GEMM distance is within a rigorous floating-point error
//!   bound of the running `k`-th best is kept, and the shortlist is then rescored exactly as
//!   `Σ(x − y)²` in `f64` on the original values and re-selected. The result is exact up to the
//!   final rounding to `f32`: never negative, exactly zero for duplicates, and ties are broken by
//!   the lower bank index. The index keeps both the original and the centred (packed) bank, about
//!   twice the bank's memory (1.5 times with bfloat16 panels), so that rescoring uses the
//!   original values.
//! * **Errors, not panics.** Every invalid input (empty bank, ragged buffers, `k` out of range,
//!   NaN or infinite values, corrupt streams) is a [`KnnError`] carrying the offending values.
//! * **Serialisation.** [`KnnIndex::write_to`] writes the backend's own format; for the exact
//!   backend a small versioned binary format (magic, version, dimension, row count, little-endian
//!   data, checksum), so truncated or corrupted streams are reported as [`KnnError::Corrupt`].
//!
//! `k` must satisfy `1 ≤ k ≤ bank size`; unlike FAISS, which pads with index `-1`, a larger `k` is
//! an error ([`KnnError::InvalidK`]).
//!
//! ## FAISS backends
//!
//! With the cargo feature `faiss` (which builds the vendored FAISS C++ library and its C API, and
//! needs cmake, BLAS and LAPACK: `apt-get install cmake libopenblas-dev liblapack-dev` on Debian),
//! [`IndexSpec::FaissFlat`] and [`IndexSpec::IvfPq`] are available; `faiss-gpu` adds
//! [`IndexSpec::FaissGpuFlat`] (it needs CUDA). Without the feature these specifications still
//! parse, and building or reading one is [`KnnError::Unavailable`].
//!
//! * All FAISS backends index the bank minus its mean and search queries minus the mean, which
//!   leaves distances unchanged and removes most of `f32`'s cancellation in FAISS's
//!   `‖x‖² + ‖y‖² − 2·x·y`.
//! * **Exact FAISS backends** ask FAISS for `2k + 8` candidates, rescore them in `f64` and check a
//!   floating-point error bound on FAISS's last candidate; a query whose candidates cannot be
//!   certified to contain the true `k` nearest is rescored against the whole bank. Results thus
//!   match the pure-Rust backend: never negative, zero for duplicates, ties broken by the lower
//!   index, never FAISS's `-1` labels or `3.4e38` padding. The guarantee rests on FAISS computing
//!   in `f32` with correctly rounded operations; the pure-Rust backend's rests on its own code.
//! * **IVFPQ** (`IndexIVFPQ`, by default the original's 512 lists, 64 sub-quantizers of 8 bits,
//!   `nprobe` 1) returns FAISS's approximate distances, clamped at zero. It is trained on the bank
//!   and refuses banks with fewer than 39 rows per centroid of either quantizer
//!   ([`KnnError::TooFewToTrain`]) unless [`OnTooSmall::Exact`] asks for exact search instead; a
//!   dimension that the sub-quantizers do not divide is [`KnnError::SubQuantizers`]. Queries whose
//!   probed lists hold fewer than `k` rows are searched again with more lists.
//! * **Threads.** FAISS runs on OpenMP. A backend's `threads` is set with `omp_set_num_threads` on
//!   the calling thread around each FAISS call and restored afterwards; OpenMP keeps that count per
//!   thread, so backends with different counts do not affect each other or the rest of the
//!   process. Not isolated: BLAS's own threads (FAISS's flat search of 20 or more queries is one
//!   BLAS matrix product; OpenBLAS takes its thread count from `OPENBLAS_NUM_THREADS`, process
//!   wide), and the total when several threads search at once.
//! * **Serialisation.** FAISS's own format (written to memory through its C API's custom writer)
//!   inside a small header with magic `PCKNNFA1`, version, index kind, dimension, row count, bank
//!   mean, payload length and a checksum, so truncated or corrupted streams are
//!   [`KnnError::Corrupt`]. The GPU backend writes its CPU equivalent and copies it to the device
//!   when read.
#![deny(missing_docs)]

mod error;
mod exact;
#[cfg(feature = "faiss")]
mod faiss;
mod format;
mod kernel;
mod neighbors;

use serde::{Deserialize, Serialize};

pub use error::KnnError;
pub use neighbors::Neighbors;

/// A built nearest-neighbour index over a memory bank.
///
/// Implementations are thread safe: `search` may be called concurrently from several threads.
pub trait KnnIndex: Send + Sync + std::fmt::Debug {
    /// The specification that builds (or reads) an equivalent index.
    fn spec(&self) -> IndexSpec;

    /// The dimension of the bank rows and of the queries.
    fn dim(&self) -> usize;

    /// The number of bank rows.
    fn len(&self) -> usize;

    /// Whether the bank has no rows (never true for a successfully built index).
    fn is_empty(&self) -> bool;

    /// Finds the `k` nearest bank rows of every query.
    ///
    /// `queries` is row-major with [`KnnIndex::dim`] columns; it may be empty. Distances are
    /// squared Euclidean distances, sorted ascending per query; ties are broken by the lower bank
    /// index. A squared distance beyond `f32::MAX` is reported as infinity, never NaN.
    ///
    /// # Errors
    ///
    /// [`KnnError::DimensionMismatch`] when `queries.len()` is not a multiple of the dimension,
    /// [`KnnError::InvalidK`] when `k == 0` or `k > self.len()`, and [`KnnError::NonFinite`] when
    /// a query holds NaN or an infinity.
    fn search(&self, queries: &[f32], k: usize) -> Result<Neighbors, KnnError>;

    /// Writes the index in the backend's own serialisation format.
    ///
    /// # Errors
    ///
    /// [`KnnError::Io`] when the writer fails.
    fn write_to(&self, w: &mut dyn std::io::Write) -> Result<(), KnnError>;
}

/// Configuration of the exact, pure-Rust backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExactConfig {
    /// Worker threads of the index's own rayon thread pool; `None` (or `Some(0)`) uses all cores
    /// (rayon's default, which honours `RAYON_NUM_THREADS`). The process-wide global pool is never
    /// touched.
    pub threads: Option<usize>,
    /// The arithmetic of the shortlist's dot products. It changes only the speed, never the
    /// results: every choice is followed by the same exact rescoring inside a rigorous error band.
    /// Not written when it is the default, so configurations with the default read the same as
    /// before the option existed.
    #[serde(skip_serializing_if = "ShortlistArithmetic::is_default")]
    pub shortlist: ShortlistArithmetic,
}

/// The arithmetic in which the exact backend computes the dot products of its shortlist.
///
/// The shortlist keeps every bank row whose approximate distance lies within a rigorous bound of
/// the rounding error of the chosen arithmetic, and the survivors are rescored exactly in `f64`, so
/// the search results are identical (bit for bit) whatever is chosen here. A coarser arithmetic is
/// faster per dot product but has a wider band, so more rows are rescored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShortlistArithmetic {
    /// `f32` fused multiply-adds: the AVX-512F kernel, or the portable `gemm` crate.
    F32,
    /// bfloat16 products accumulated in `f32` (`vdpbf16ps`) where the CPU has AVX512-BF16, twice
    /// the `f32` kernel's arithmetic rate; `f32` on other CPUs. The band widens by the bfloat16
    /// rounding error (relative 2⁻⁸ per element).
    #[default]
    Bf16,
}

impl ShortlistArithmetic {
    /// Whether this is the default arithmetic.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Configuration of the exact FAISS backend on the CPU (`IndexFlatL2`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaissFlatConfig {
    /// OpenMP threads of this backend's FAISS calls; `None` (or `Some(0)`) keeps the calling
    /// thread's OpenMP setting (by default all cores, or `OMP_NUM_THREADS`). The count is set on
    /// the calling thread around each FAISS call and restored afterwards; see the crate
    /// documentation for what this does and does not isolate.
    pub threads: Option<usize>,
}

/// Configuration of the exact FAISS backend on a GPU (`GpuIndexFlatL2`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaissGpuConfig {
    /// The CUDA device the index lives on.
    pub device: u32,
}

/// What the IVFPQ backend does with a bank too small to train its quantizers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnTooSmall {
    /// Fail with [`KnnError::TooFewToTrain`].
    #[default]
    Error,
    /// Log a warning and search the bank exactly (as the `faiss-flat` backend does) instead.
    Exact,
}

/// Configuration of the approximate FAISS backend (`IndexIVFPQ` over an `IndexFlatL2` coarse
/// quantizer), as the original's `ApproximateFaissNN`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IvfPqConfig {
    /// Inverted lists (coarse k-means centroids); the original uses 512.
    pub lists: usize,
    /// Product-quantizer sub-vectors per row; must divide the dimension. The original uses 64.
    pub sub_quantizers: usize,
    /// Bits per sub-quantizer code, 1 to 16; the original uses 8 (256-entry code books).
    pub bits: usize,
    /// Lists visited per query, 1 to `lists`; FAISS's default (and the original's) is 1.
    pub nprobe: usize,
    /// OpenMP threads of this backend's FAISS calls, as [`FaissFlatConfig::threads`].
    pub threads: Option<usize>,
    /// What to do when the bank is too small to train on.
    pub on_too_small: OnTooSmall,
}

impl IvfPqConfig {
    /// Training points FAISS wants per centroid of a quantizer (its `min_points_per_centroid`):
    /// a bank needs `39 × lists` rows for the coarse quantizer and `39 × 2^bits` for the PQ code
    /// books.
    pub const MIN_POINTS_PER_CENTROID: usize = 39;
}

impl Default for IvfPqConfig {
    fn default() -> Self {
        IvfPqConfig {
            lists: 512,
            sub_quantizers: 64,
            bits: 8,
            nprobe: 1,
            threads: None,
            on_too_small: OnTooSmall::Error,
        }
    }
}

/// Which backend to use and how to configure it.
///
/// Serialised with a `backend` tag, e.g. `{"backend": "exact", "threads": 4}` or
/// `{"backend": "ivfpq", "lists": 512, "sub_quantizers": 64, "bits": 8, "nprobe": 8, ...}`. The FAISS
/// variants exist in every build so that configurations and model files always parse; building or
/// reading one in a build without the cargo feature it needs is [`KnnError::Unavailable`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum IndexSpec {
    /// Exact search in pure Rust (GEMM shortlist plus exact `f64` rescoring); always available.
    Exact(ExactConfig),
    /// Exact search with FAISS `IndexFlatL2` on the CPU, candidates rescored in `f64`; needs the
    /// cargo feature `faiss`.
    FaissFlat(FaissFlatConfig),
    /// Exact search with FAISS `GpuIndexFlatL2`, candidates rescored in `f64` on the CPU; needs
    /// the cargo feature `faiss-gpu`.
    #[serde(rename = "faiss-gpu")]
    FaissGpuFlat(FaissGpuConfig),
    /// Approximate search with FAISS `IndexIVFPQ`; needs the cargo feature `faiss`.
    #[serde(rename = "ivfpq")]
    IvfPq(IvfPqConfig),
}

impl Default for IndexSpec {
    fn default() -> Self {
        IndexSpec::Exact(ExactConfig::default())
    }
}

impl IndexSpec {
    /// Builds an index over `bank`, a row-major buffer of rows with `dim` columns.
    ///
    /// The bank is copied; the caller keeps ownership of `bank`.
    ///
    /// # Errors
    ///
    /// [`KnnError::ZeroDimension`] when `dim == 0`, [`KnnError::RaggedInput`] when `bank.len()` is
    /// not a multiple of `dim`, [`KnnError::EmptyBank`] when it has no rows,
    /// [`KnnError::BankTooLarge`] above `u32::MAX` rows, [`KnnError::NonFinite`] when a value is
    /// NaN or infinite, and [`KnnError::Config`] when the thread pool cannot be created.
    pub fn build(&self, bank: &[f32], dim: usize) -> Result<Box<dyn KnnIndex>, KnnError> {
        match self {
            IndexSpec::Exact(config) => Ok(Box::new(exact::ExactIndex::new(
                config.clone(),
                bank.to_vec(),
                dim,
            )?)),
            #[cfg(feature = "faiss")]
            IndexSpec::FaissFlat(_) | IndexSpec::IvfPq(_) => {
                Ok(Box::new(faiss::FaissIndex::build(self, bank, dim)?))
            }
            #[cfg(feature = "faiss-gpu")]
            IndexSpec::FaissGpuFlat(_) => Ok(Box::new(faiss::FaissIndex::build(self, bank, dim)?)),
            #[allow(unreachable_patterns)]
            _ => Err(self.unavailable()),
        }
    }

    /// The backend's name as written in the `backend` tag.
    pub fn backend_name(&self) -> &'static str {
        match self {
            IndexSpec::Exact(_) => "exact",
            IndexSpec::FaissFlat(_) => "faiss-flat",
            IndexSpec::FaissGpuFlat(_) => "faiss-gpu",
            IndexSpec::IvfPq(_) => "ivfpq",
        }
    }

    /// The cargo feature of this crate that the backend needs, if any.
    pub fn required_feature(&self) -> Option<&'static str> {
        match self {
            IndexSpec::Exact(_) => None,
            IndexSpec::FaissFlat(_) | IndexSpec::IvfPq(_) => Some("faiss"),
            IndexSpec::FaissGpuFlat(_) => Some("faiss-gpu"),
        }
    }

    /// Whether this build of the crate includes the backend.
    pub fn is_available(&self) -> bool {
        match self {
            IndexSpec::Exact(_) => true,
            IndexSpec::FaissFlat(_) | IndexSpec::IvfPq(_) => cfg!(feature = "faiss"),
            IndexSpec::FaissGpuFlat(_) => cfg!(feature = "faiss-gpu"),
        }
    }

    /// The error for a backend this build lacks.
    #[cfg_attr(feature = "faiss-gpu", allow(dead_code))]
    fn unavailable(&self) -> KnnError {
        KnnError::Unavailable {
            backend: self.backend_name(),
            feature: self.required_feature().unwrap_or("none"),
        }
    }

    /// Reads an index written by [`KnnIndex::write_to`] of the same backend.
    ///
    /// The configuration (e.g. thread count) comes from `self`, the data from the stream.
    ///
    /// # Errors
    ///
    /// [`KnnError::Corrupt`] for a stream of another format, version or backend, a truncated
    /// stream or a checksum mismatch; [`KnnError::Io`] when reading fails otherwise; and the
    /// errors of [`IndexSpec::build`] for the data read.
    pub fn read_from(&self, r: &mut dyn std::io::Read) -> Result<Box<dyn KnnIndex>, KnnError> {
        match self {
            IndexSpec::Exact(config) => {
                let (dim, data) = format::read_exact(r)?;
                Ok(Box::new(exact::ExactIndex::new(config.clone(), data, dim)?))
            }
            #[cfg(feature = "faiss")]
            IndexSpec::FaissFlat(_) | IndexSpec::IvfPq(_) => {
                Ok(Box::new(faiss::FaissIndex::read(self, r)?))
            }
            #[cfg(feature = "faiss-gpu")]
            IndexSpec::FaissGpuFlat(_) => Ok(Box::new(faiss::FaissIndex::read(self, r)?)),
            #[allow(unreachable_patterns)]
            _ => Err(self.unavailable()),
        }
    }
}
