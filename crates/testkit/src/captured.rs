//! A log sink for tests that check what code logs: a cloneable writer into one shared buffer.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Everything written to any clone lands in one buffer. Hand `move || captured.clone()` to
/// `tracing_subscriber` as the writer.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("captured log lock")).into_owned()
    }
}

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("captured log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
