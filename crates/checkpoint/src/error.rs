//! The checkpoint crate's error type.

/// A model directory that cannot be read or served.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
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
    /// A model variant, preset or option this build does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl CheckpointError {
    /// A malformed or inconsistent file.
    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config { file: file.into(), message: message.into() }
    }

    /// An OS error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().display().to_string(), source }
    }
}
