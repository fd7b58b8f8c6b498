//! A circuit breaker for the shared cache: after `failure_threshold` consecutive failures it
//! opens and short-circuits calls for `open_for`; then one probe call is let through
//! (half-open); success closes it, failure re-opens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Breaker tuning.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before probing.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 3, open_for: Duration::from_secs(2) }
    }
}

/// Observable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One probe call is in flight.
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open (for a gauge).
    pub fn as_gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
}

/// The breaker; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("breaker lock poisoned. This is a bug.")
    }

    /// Whether a call may proceed now (an open breaker past its cool-down admits one probe).
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        match s.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => false,
            BreakerState::Open if s.opened_at.elapsed() >= self.config.open_for => {
                s.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open => false,
        }
    }

    /// Whether a call would be allowed, without claiming the half-open probe.
    pub fn allow_peek(&self) -> bool {
        let s = self.lock();
        match s.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => false,
            BreakerState::Open => s.opened_at.elapsed() >= self.config.open_for,
        }
    }

    /// Records a successful call.
    pub fn success(&self) {
        let mut s = self.lock();
        s.state = BreakerState::Closed;
        s.failures = 0;
    }

    /// Records a failed call.
    pub fn failure(&self) {
        let mut s = self.lock();
        s.failures += 1;
        if s.state == BreakerState::HalfOpen || s.failures >= self.config.failure_threshold {
            s.state = BreakerState::Open;
            s.opened_at = Instant::now();
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_and_recloses() {
        let b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_millis(30),
        });
        assert!(b.allow());
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one probe");
        b.failure();
        assert_eq!(b.state(), BreakerState::Open, "failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
    }
}
