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

    /// A serialised index is malformed: wrong magic, unsupported version, truncated or corrupted.
    #[error("corrupt index stream: {0}")]
    Corrupt(String),

    /// Reading or writing failed.
    #[error("index I/O failed: {0}")]
    Io(#[from] std::io::Error),
}
