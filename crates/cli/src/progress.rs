//! Load progress on stderr: a percentage line every 10 % for checkpoints worth waiting for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dsvl_models::checkpoint::ProgressFn;

/// Below this many bytes loading is instant and progress would only be noise.
const MIN_BYTES_FOR_PROGRESS: u64 = 64 << 20;

/// A progress callback for [`dsvl_models::checkpoint::Checkpoint::build`] labelled `what`.
pub fn loading(what: &'static str, checkpoint_bytes: u64) -> Option<ProgressFn> {
    if checkpoint_bytes < MIN_BYTES_FOR_PROGRESS {
        return None;
    }
    let last_decile = Arc::new(AtomicU64::new(0));
    Some(Arc::new(move |done: u64, total: u64| {
        let decile = done * 10 / total.max(1);
        if decile > last_decile.fetch_max(decile, Ordering::Relaxed) {
            eprintln!(
                "loading {what}: {:>3}% ({:.2} / {:.2} GB)",
                decile * 10,
                done as f64 / 1e9,
                total as f64 / 1e9
            );
        }
    }))
}
