//! The error type of this crate.

/// Everything that can go wrong when building, searching, writing or reading an index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KnnError {
    /// The memory bank has no rows.
    #[error("the memory bank is empty")]
    EmptyBank,

    /// The row dimension is zero.
    #[error("the row dimension must be positive, got 0")]
    ZeroDimension,

    /// A query buffer of length `got` is not a whole number of rows of the index dimension
    /// `expected` (the queries have another dimension than the bank).
    #[error(
        "query buffer of length {got} is not a whole number of rows of the index dimension {expected}"
    )]
    DimensionMismatch {
        /// The index dimension.
        expected: usize,
        /// The length of the query buffer.
        got: usize,
    },

    /// A bank buffer of length `len` is not a whole number of rows of dimension `dim`.
    #[error("buffer of length {len} is not a whole number of rows of dimension {dim}")]
    RaggedInput {
        /// The length of the buffer.
        len: usize,
        /// The row dimension.
        dim: usize,
    },

    /// `k` is zero or larger than the bank (FAISS would pad with index -1; this crate refuses).
    #[error("k = {k} is invalid for a bank of {bank_size} rows (need 1 <= k <= {bank_size})")]
    InvalidK {
        /// The requested number of neighbours.
        k: usize,
        /// The number of bank rows.
        bank_size: usize,
    },

    /// A row holds NaN or an infinity.
    #[error("{what} row {row} holds a NaN or infinite value")]
    NonFinite {
        /// The row index within its buffer.
        row: usize,
        /// Which buffer: `"query"` or `"bank"`.
        what: &'static str,
    },

    /// The bank has more rows than `u32` indices can address.
    #[error("the memory bank has {len} rows, more than u32 indices can address")]
    BankTooLarge {
        /// The number of bank rows.
        len: usize,
    },

    /// The backend configuration cannot be honoured (e.g. the thread pool cannot be created).
    #[error("invalid index configuration: {0}")]
    Config(String),

    /// The backend is not compiled into this build.
    #[error(
        "the `{backend}` nearest-neighbour backend is not available: this build was made \
         without the cargo feature `{feature}` of patchcore-knn"
    )]
    Unavailable {
        /// The backend's name, as in the configuration's `backend` tag.
        backend: &'static str,
        /// The cargo feature that enables it.
        feature: &'static str,
    },

    /// The bank has too few rows to train the IVFPQ quantizers: FAISS wants `per_centroid`
    /// training points per centroid of the coarse quantizer (one per list) and of each PQ code
    /// book (`2^bits` entries).
    #[error(
        "the memory bank has {bank_size} rows, too few to train IVFPQ: FAISS wants at least \
         {per_centroid} points per centroid, i.e. {needed_for_lists} for the {lists} lists and \
         {needed_for_codebooks} for the {codebook}-entry ({bits}-bit) PQ code books; use fewer \
         lists or bits, a larger bank, or `on_too_small: exact`"
    )]
    TooFewToTrain {
        /// The number of bank rows.
        bank_size: usize,
        /// Training points wanted per centroid (FAISS's `min_points_per_centroid`, 39).
        per_centroid: usize,
        /// The configured number of inverted lists.
        lists: usize,
        /// `per_centroid × lists`.
        needed_for_lists: usize,
        /// Bits per PQ code.
        bits: usize,
        /// Entries of each PQ code book, `2^bits`.
        codebook: usize,
        /// `per_centroid × codebook`.
        needed_for_codebooks: usize,
    },

    /// The dimension is not a multiple of the number of PQ sub-quantizers.
    #[error(
        "the dimension {dim} is not divisible by the {sub_quantizers} PQ sub-quantizers \
         (choose a divisor of {dim})"
    )]
    SubQuantizers {
        /// The row dimension.
        dim: usize,
        /// The configured number of sub-quantizers.
        sub_quantizers: usize,
    },

    /// FAISS reported an error.
    #[error("FAISS failed while {context}: {message}")]
    Faiss {
        /// What this crate asked FAISS to do.
        context: &'static str,
        /// FAISS's own message.
        message: String,
    },

    /// A serialised index is malformed: wrong magic, unsupported version, truncated or corrupted.
    #[error("corrupt index stream: {0}")]
    Corrupt(String),

    /// Reading or writing failed.
    #[error("index I/O failed: {0}")]
    Io(#[from] std::io::Error),
}
