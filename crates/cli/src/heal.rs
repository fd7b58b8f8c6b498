//! `dsvl up`'s supervisor, doing locally what Kubernetes does for the cluster: a vision-encoder
//! or decoder group that exited, or whose `liveness` health has failed three checks in a row (a
//! NOT_SERVING answer, a refused connection or no answer within 2 s; not in the first 10 s
//! after a start, while the process binds its port), is restarted with the same arguments and
//! ports (the gateway finds it again by its health poll). The first restart is immediate; more
//! of the same service back off (2 s, 4 s, ... at most 30 s), and the back-off resets once the
//! service has run for a minute. The gateway is the front door: if it exits, the cluster stops.

use std::time::{Duration, Instant};

use crate::procs::Service;

/// Failed liveness checks in a row that restart a service.
const FAILURE_THRESHOLD: u32 = 3;
/// No liveness checks this long after a (re)start.
const START_GRACE: Duration = Duration::from_secs(10);

/// Restart bookkeeping of one service.
pub struct Restarts {
    count: u32,
    last: Option<Instant>,
    started: Instant,
    failed_probes: u32,
}

impl Default for Restarts {
    fn default() -> Self {
        Self { count: 0, last: None, started: Instant::now(), failed_probes: 0 }
    }
}

impl Restarts {
    fn backoff(&self) -> Duration {
        Duration::from_secs(1 << self.count.min(5)).min(Duration::from_secs(30))
    }

    fn may_restart(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t) if now.duration_since(t) >= Duration::from_secs(60) => {
                self.count = 0;
                true
            }
            Some(t) => now.duration_since(t) >= self.backoff(),
            None => true,
        }
    }
}

/// Checks `svc` once: restarts it if it exited or its liveness failed twice in a row (and its
/// back-off allows). Returns what it did, for the log.
pub async fn heal(svc: &mut Service, restarts: &mut Restarts) -> Option<String> {
    let why = match svc.exited() {
        Some(status) => format!("{} exited ({status})", svc.name),
        None => {
            if restarts.started.elapsed() < START_GRACE {
                return None;
            }
            match svc.serving(dsvl_telemetry::probes::LIVENESS).await {
                Some(true) => restarts.failed_probes = 0,
                Some(false) | None => restarts.failed_probes += 1,
            }
            if restarts.failed_probes < FAILURE_THRESHOLD {
                return None;
            }
            format!("{} failed its liveness probe {FAILURE_THRESHOLD} times", svc.name)
        }
    };
    let now = Instant::now();
    if !restarts.may_restart(now) {
        return None;
    }
    restarts.failed_probes = 0;
    restarts.count += 1;
    restarts.last = Some(now);
    restarts.started = now;
    Some(match svc.restart(Duration::from_secs(5)) {
        Ok(()) => format!("{why}: restarted it (restart {} in a row)", restarts.count),
        Err(e) => format!("{why}: restarting it failed: {e:#}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_reset_after_a_minute_up() {
        let t0 = Instant::now();
        let mut r = Restarts { started: t0, ..Restarts::default() };
        assert!(r.may_restart(t0));
        r.count = 3;
        r.last = Some(t0);
        assert_eq!(r.backoff(), Duration::from_secs(8));
        assert!(!r.may_restart(t0 + Duration::from_secs(7)));
        assert!(r.may_restart(t0 + Duration::from_secs(8)));
        r.count = 9;
        assert_eq!(r.backoff(), Duration::from_secs(30), "capped");
        assert!(r.may_restart(t0 + Duration::from_secs(61)));
        assert_eq!(r.count, 0, "a minute up resets the back-off");
    }
}
