//! The model crate's error type.

use crate::preprocess::ImageError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint could not be read or does not describe a supported model (I/O, a
    /// malformed config, an unsupported variant).
    #[error(transparent)]
    Checkpoint(#[from] dsvl_checkpoint::CheckpointError),
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
    /// A malformed or inconsistent config file.
    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Checkpoint(dsvl_checkpoint::CheckpointError::config(file, message))
    }

    /// An OS error on `path` (a file, a socket, a child process).
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Checkpoint(dsvl_checkpoint::CheckpointError::io(path, source))
    }

    /// A model variant, preset or option this build does not implement.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::Checkpoint(dsvl_checkpoint::CheckpointError::Unsupported(message.into()))
    }
}
