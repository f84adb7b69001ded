//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading checkpoints, building a backbone or running it.
///
/// Every variant that stems from user input carries the data needed to act on it: the file, the
/// state-dict key, the expected and the actual shape, or the list of valid choices.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file is not a checkpoint this crate understands, or it is truncated or corrupt.
    #[error("{}: not a readable checkpoint: {reason}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What exactly was wrong.
        reason: String,
    },

    /// A tensor in a checkpoint uses a storage type (element type) this crate cannot load.
    #[error("{}: tensor `{key}` uses unsupported storage type `{storage_type}`", path.display())]
    UnsupportedStorage {
        /// The checkpoint file.
        path: PathBuf,
        /// The state-dict key of the tensor.
        key: String,
        /// The PyTorch storage class name, e.g. `CharStorage`.
        storage_type: String,
    },

    /// A weight the model needs is absent from the checkpoint.
    #[error(
        "{}: missing weight `{key}` (expected shape {expected:?})",
        path.display()
    )]
    MissingWeight {
        /// The checkpoint file.
        path: PathBuf,
        /// The state-dict key that was looked up.
        key: String,
        /// The shape the model expects for it.
        expected: Vec<usize>,
    },

    /// A weight in the checkpoint has a different shape from the one the model expects.
    #[error(
        "{}: weight `{key}` has shape {got:?}, expected {expected:?}",
        path.display()
    )]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The state-dict key of the weight.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape found in the checkpoint.
        got: Vec<usize>,
    },

    /// A requested tap does not name a layer of the architecture.
    #[error("unknown tap `{tap}` for {arch}; valid taps: {}", valid.join(", "))]
    UnknownTap {
        /// The requested tap name.
        tap: String,
        /// The architecture it was requested for.
        arch: crate::Arch,
        /// Every valid tap name of that architecture.
        valid: Vec<String>,
    },

    /// The same tap was requested more than once.
    #[error("tap `{0}` requested more than once")]
    DuplicateTap(String),

    /// No tap was requested at all.
    #[error("at least one tap must be requested")]
    NoTaps,

    /// An architecture name could not be parsed.
    #[error("unknown architecture `{name}`; valid: {}", valid.join(", "))]
    UnknownArch {
        /// The string that failed to parse.
        name: String,
        /// Every valid architecture name.
        valid: Vec<String>,
    },

    /// The input tensor given to a feature extractor has the wrong rank, channel count or type.
    #[error("invalid input: expected a (B, 3, H, W) f32 tensor with B, H, W > 0, got shape {shape:?} of type {dtype:?}")]
    InvalidInput {
        /// The shape of the tensor that was passed.
        shape: Vec<usize>,
        /// Its element type.
        dtype: candle_core::DType,
    },

    /// An error raised by candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, BackboneError>;
