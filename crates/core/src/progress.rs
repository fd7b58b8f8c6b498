//! What a checkpoint loader reports while it loads, so that any front end (a progress bar, a
//! log line every few seconds) can show it without knowing the loader.

use std::sync::Arc;

/// Progress of loading a checkpoint's tensors, reported after each tensor.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress<'a> {
    /// Tensors loaded so far.
    pub tensors_done: usize,
    /// Tensors to load.
    pub tensors_total: usize,
    /// Bytes (as stored in the checkpoint) loaded so far.
    pub bytes_done: u64,
    /// Bytes to load.
    pub bytes_total: u64,
    /// The file the last tensor came from (`model-00001-of-00002.safetensors`).
    pub shard: &'a str,
    /// Its position among the checkpoint's files, from 1.
    pub shard_index: usize,
    /// How many files the checkpoint has.
    pub shards: usize,
}

/// A callback receiving [`LoadProgress`]; shared between loader threads.
pub type LoadProgressFn = Arc<dyn Fn(&LoadProgress<'_>) + Send + Sync>;
