//! The model crate's error type.

use crate::preprocess::ImageError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A checkpoint file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A config file is malformed or inconsistent.
    #[error("invalid {file}: {message}")]
    Config {
        /// Which file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint lacks a tensor the model needs.
    #[error("checkpoint has no tensor `{name}` (the model expects shape {expected:?})")]
    MissingTensor {
        /// Full tensor name.
        name: String,
        /// Shape the model would have loaded.
        expected: Vec<usize>,
    },
    /// A tensor exists with the wrong shape.
    #[error(
        "tensor `{name}` has shape {found:?} in the checkpoint, but the model expects {expected:?}"
    )]
    ShapeMismatch {
        /// Full tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A model variant, preset or option this build does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The requested device cannot be used.
    #[error("device {device}: {reason}")]
    Device {
        /// The device asked for.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An input (pixels, token ids, embeddings) does not fit the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An image could not be decoded.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The tensor-parallel group or its engine stopped working (a rank or the engine thread
    /// died, or the engine stopped): it cannot serve anymore. Never a problem of the input.
    #[error("the decoder group failed: {0}")]
    GroupFailed(String),
    /// A collective or the group's control channel failed.
    #[error("tensor-parallel group failed: {0}")]
    Comm(#[from] dsvl_parallel::CommError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config { file: file.into(), message: message.into() }
    }
}

impl From<dsvl_checkpoint::CheckpointError> for ModelError {
    fn from(e: dsvl_checkpoint::CheckpointError) -> Self {
        use dsvl_checkpoint::CheckpointError as C;
        match e {
            C::Io { path, source } => Self::Io { path, source },
            C::Config { file, message } => Self::Config { file, message },
            C::Unsupported(m) => Self::Unsupported(m),
        }
    }
}
