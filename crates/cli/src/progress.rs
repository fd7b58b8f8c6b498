//! Load progress of the `dsvl` commands: a bar on a terminal, log lines otherwise
//! ([`dsvl_telemetry::progress`]), for checkpoints worth waiting for.

use dsvl_models::checkpoint::ProgressFn;

/// Below this many bytes loading is instant and progress would only be noise.
const MIN_BYTES_FOR_PROGRESS: u64 = 64 << 20;

/// Runs `load` for model part `what` of a checkpoint of `checkpoint_bytes`, with a progress
/// callback when the checkpoint is worth waiting for.
///
/// # Errors
/// Whatever `load` returns.
pub fn loading<T, E>(
    what: &str,
    checkpoint_bytes: u64,
    load: impl FnOnce(Option<ProgressFn>) -> Result<T, E>,
) -> Result<T, E> {
    if checkpoint_bytes < MIN_BYTES_FOR_PROGRESS {
        return load(None);
    }
    dsvl_telemetry::progress::loading(&format!("loading {what}"), |p| load(Some(p)))
}
