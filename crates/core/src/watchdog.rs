//! How long a worker thread has been inside its current unit of work (a model batch, an engine
//! step): the input of the `liveness` health probe. An idle thread (blocked on its queue) counts
//! as alive; only one stuck inside a unit for too long does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether (and since when) a model thread is inside one unit of work.
#[derive(Debug)]
pub struct Watchdog {
    name: &'static str,
    epoch: Instant,
    /// Milliseconds since `epoch` + 1 when the current unit started; 0 when idle.
    busy_since: AtomicU64,
}

/// Marks its [`Watchdog`] busy until dropped.
pub struct Busy<'a>(&'a Watchdog);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Release);
    }
}

impl Watchdog {
    /// A watchdog for the thread called `name` (used in logs).
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self { name, epoch: Instant::now(), busy_since: AtomicU64::new(0) })
    }

    /// Marks the start of a unit of work; it ends when the guard drops.
    pub fn busy(&self) -> Busy<'_> {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(now, Ordering::Release);
        Busy(self)
    }

    /// The thread's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How long the current unit of work has run (`None` when idle).
    pub fn busy_for(&self) -> Option<Duration> {
        match self.busy_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.epoch.elapsed().saturating_sub(Duration::from_millis(since - 1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_measured_only_inside_a_unit_of_work() {
        let w = Watchdog::new("model");
        assert_eq!(w.busy_for(), None);
        {
            let _b = w.busy();
            std::thread::sleep(Duration::from_millis(20));
            assert!(w.busy_for().unwrap() >= Duration::from_millis(20));
        }
        assert_eq!(w.busy_for(), None, "the guard ends the unit");
    }
}
