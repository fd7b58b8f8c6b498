//! Telling operators that the shared cache is gone, without flooding the log.
//!
//! Requests survive a Redis outage (they re-encode, uncached), so the log is the only place a
//! person learns of it. [`OutageLog`] turns the stream of per-call outcomes into:
//! * one WARN with the cause at the first failure after a healthy period,
//! * then at most one WARN per [`OutageLog::every`] (10 s in services) with the number of
//!   calls that failed since the previous line,
//! * one INFO when a call succeeds again, with how long the outage lasted and how many calls
//!   failed in all.
//!
//! Calls refused by the open circuit breaker count as failures: they are requests that went
//! without the cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a continuing outage is logged in services.
pub const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum State {
    Healthy,
    Down { since: Instant, failures: u64, unlogged: u64, logged_at: Instant },
}

/// The outage log of one cache client; see the module docs.
#[derive(Debug)]
pub struct OutageLog {
    what: &'static str,
    every: Duration,
    state: Mutex<State>,
    /// Whether `state` is `Down`: a success while healthy (every call, normally) takes no lock.
    down: AtomicBool,
}

impl OutageLog {
    /// A log for the cache named `what` (e.g. "Redis") that repeats at most once per `every`.
    pub fn new(what: &'static str, every: Duration) -> Self {
        Self { what, every, state: Mutex::new(State::Healthy), down: AtomicBool::new(false) }
    }

    /// The repeat interval.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Records a failed call of operation `op` (`get`, `put`, ...) with its cause.
    pub fn failure(&self, op: &str, cause: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut state = self.state.lock().expect("outage log lock");
        match &mut *state {
            State::Healthy => {
                tracing::warn!(
                    op,
                    error = %cause,
                    "{} is unavailable: requests go on without the shared cache (next report in {} s at most)",
                    self.what,
                    self.every.as_secs()
                );
                *state = State::Down { since: now, failures: 1, unlogged: 0, logged_at: now };
                self.down.store(true, Ordering::Release);
            }
            State::Down { since, failures, unlogged, logged_at } => {
                *failures += 1;
                *unlogged += 1;
                if now.duration_since(*logged_at) >= self.every {
                    tracing::warn!(
                        op,
                        error = %cause,
                        failed_calls = *unlogged,
                        down_seconds = now.duration_since(*since).as_secs(),
                        "{} is still unavailable: {} calls failed since the last report",
                        self.what,
                        *unlogged
                    );
                    *unlogged = 0;
                    *logged_at = now;
                }
            }
        }
    }

    /// Records a successful call; ends an outage.
    pub fn success(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock().expect("outage log lock");
        if let State::Down { since, failures, .. } = &*state {
            tracing::info!(
                failed_calls = *failures,
                down_seconds = since.elapsed().as_secs_f64(),
                "{} is available again after {:.1} s ({} calls failed meanwhile)",
                self.what,
                since.elapsed().as_secs_f64(),
                failures
            );
            *state = State::Healthy;
            self.down.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use dsvl_testkit::CapturedLog;

    use super::*;

    /// The log lines written while `f` runs.
    fn captured(f: impl FnOnce()) -> Vec<String> {
        let out = CapturedLog::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        out.text().lines().map(str::to_string).collect()
    }

    #[test]
    fn an_outage_is_one_warning_then_a_rate_limited_count_then_one_recovery() {
        let every = Duration::from_millis(300);
        let log = OutageLog::new("Redis", every);
        let lines = captured(|| {
            log.success(); // healthy: nothing to say
            log.failure("get", &"Connection refused (os error 111)");
            for _ in 0..50 {
                log.failure("put", &"Connection refused (os error 111)");
            }
            std::thread::sleep(every + Duration::from_millis(50));
            log.failure("get", &"breaker open");
            log.failure("get", &"breaker open");
            log.success();
            log.success();
            log.failure("exists", &"response timed out");
        });
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with(" WARN") || lines[0].contains("WARN"), "{}", lines[0]);
        assert!(lines[0].contains("Redis is unavailable"), "{}", lines[0]);
        assert!(lines[0].contains("Connection refused"), "the cause: {}", lines[0]);
        assert!(lines[0].contains("op=\"get\"") || lines[0].contains("op=get"), "{}", lines[0]);
        assert!(lines[1].contains("WARN") && lines[1].contains("still unavailable"));
        assert!(lines[1].contains("51 calls failed"), "50 puts and one get: {}", lines[1]);
        assert!(lines[2].contains("INFO") && lines[2].contains("available again"));
        assert!(lines[2].contains("53 calls failed meanwhile"), "{}", lines[2]);
        assert!(lines[3].contains("WARN") && lines[3].contains("response timed out"));
    }
}
