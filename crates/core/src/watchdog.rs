//! How long a worker thread has been inside its current unit of work (a model batch, an engine
//! step), and whether it has died: the input of the `liveness` health probe. An idle thread
//! (blocked on its queue) counts as alive; one stuck inside a unit for too long does not, nor
//! one that ended by panicking ([`Watchdog::guard_thread`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether (and since when) a model thread is inside one unit of work.
#[derive(Debug)]
pub struct Watchdog {
    name: &'static str,
    epoch: Instant,
    /// Milliseconds since `epoch` + 1 when the current unit started; 0 when idle.
    busy_since: AtomicU64,
    /// The thread ended by panicking.
    dead: AtomicBool,
}

/// Marks its [`Watchdog`] dead if the thread holding it unwinds (see [`Watchdog::guard_thread`]).
pub struct ThreadGuard<'a>(&'a Watchdog);

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.dead.store(true, Ordering::Release);
        }
    }
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
        Arc::new(Self {
            name,
            epoch: Instant::now(),
            busy_since: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        })
    }

    /// Held for the life of the watched thread: if the thread panics, the watchdog reports it
    /// dead from then on.
    pub fn guard_thread(&self) -> ThreadGuard<'_> {
        ThreadGuard(self)
    }

    /// Whether the watched thread ended by panicking.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
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

    #[test]
    fn a_thread_that_panics_is_dead_and_one_that_returns_is_not() {
        let w = Watchdog::new("model");
        let w2 = w.clone();
        std::thread::spawn(move || {
            let _g = w2.guard_thread();
        })
        .join()
        .unwrap();
        assert!(!w.is_dead());
        let w2 = w.clone();
        let r = std::thread::spawn(move || {
            let _g = w2.guard_thread();
            panic!("model bug");
        })
        .join();
        assert!(r.is_err());
        assert!(w.is_dead());
    }
}
