//! Load progress of the `dsvl` commands: a bar on a terminal, log lines otherwise
//! ([`dsvl_telemetry::progress`]), for checkpoints worth waiting for.

use std::sync::Arc;

use dsvl_models::checkpoint::ProgressFn;
use dsvl_telemetry::progress::{checkpoint_progress, Progress, Unit};

/// Below this many bytes loading is instant and progress would only be noise.
const MIN_BYTES_FOR_PROGRESS: u64 = 64 << 20;

/// Progress of loading one model part; [`Loading::finish`] when it is built.
pub struct Loading(Option<Arc<Progress>>);

impl Loading {
    /// Reports loading `what` from a checkpoint of `checkpoint_bytes` (nothing when small).
    pub fn start(what: &str, checkpoint_bytes: u64) -> Self {
        Self(
            (checkpoint_bytes >= MIN_BYTES_FOR_PROGRESS)
                .then(|| Arc::new(Progress::new(format!("loading {what}"), Unit::Bytes))),
        )
    }

    /// The loader's callback.
    pub fn callback(&self) -> Option<ProgressFn> {
        self.0.clone().map(checkpoint_progress)
    }

    /// Loading is done.
    pub fn finish(&self) {
        if let Some(p) = &self.0 {
            p.finish();
        }
    }
}
