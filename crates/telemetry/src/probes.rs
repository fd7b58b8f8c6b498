//! Kubernetes probe semantics on `grpc.health.v1`, one service name per probe:
//!
//! * `startup` ([`STARTUP`]): SERVING once the model is loaded and warmed (and every rank has
//!   joined), and it stays SERVING through a drain, so a long load is covered by the startup
//!   probe alone.
//! * `""` and the API service: readiness. NOT_SERVING until started, and again while draining or
//!   when the service cannot take work.
//! * `liveness` ([`LIVENESS`]): only "this process still makes progress": the async runtime
//!   answers (the probe itself) and no model thread has been stuck in one unit of work (a batch,
//!   a step) longer than the stall limit. Never tied to Redis or to another tier, and unaffected
//!   by a drain, so the kubelet does not kill a pod that is finishing its streams.
//!
//! A model thread holds a [`Watchdog`] and wraps each unit of work in [`Watchdog::busy`]; an
//! idle thread (blocked on its queue) is not stalled. [`watch_liveness`] turns the watchdogs
//! into the `liveness` status.

use std::sync::Arc;
use std::time::Duration;

use crate::health::HealthReporter;
use tonic_health::ServingStatus;

/// Health service name of the startup probe.
pub const STARTUP: &str = "startup";
/// Health service name of the liveness probe.
pub const LIVENESS: &str = "liveness";

pub use dsvl_core::watchdog::{Busy, Watchdog};

/// Readiness: sets the API service `S` and the overall status `""` together.
pub async fn set_ready<S: tonic::server::NamedService>(health: &HealthReporter, ready: bool) {
    let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
    health.set_service_status(S::NAME, status).await;
    health.set_service_status("", status).await;
}

/// Sets `startup` and `liveness` NOT_SERVING / SERVING for a service that is starting: not
/// started yet, alive.
pub async fn starting(health: &HealthReporter) {
    health.set_service_status(STARTUP, ServingStatus::NotServing).await;
    health.set_service_status(LIVENESS, ServingStatus::Serving).await;
}

/// Marks the start-up complete (model loaded and warmed).
pub async fn started(health: &HealthReporter) {
    health.set_service_status(STARTUP, ServingStatus::Serving).await;
}

/// The task running [`watch_liveness`]; stops it when dropped.
pub struct LivenessTask(tokio::task::JoinHandle<()>);

impl Drop for LivenessTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns [`watch_liveness`] on the current runtime for as long as the returned task lives.
pub fn spawn_liveness(
    health: HealthReporter,
    watchdogs: Vec<Arc<Watchdog>>,
    stall: Duration,
) -> LivenessTask {
    LivenessTask(tokio::spawn(watch_liveness(health, watchdogs, stall)))
}

/// Keeps `liveness` up to date from `watchdogs` (checked every second) until the task is
/// dropped or aborted: NOT_SERVING while any of them has been busy longer than `stall`, and for
/// good once one of them has died.
pub async fn watch_liveness(
    health: HealthReporter,
    watchdogs: Vec<Arc<Watchdog>>,
    stall: Duration,
) {
    let mut alive = true;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(w) = watchdogs.iter().find(|w| w.is_dead()) {
            if alive {
                tracing::error!(thread = w.name(), "model thread died: liveness NOT_SERVING");
                health.set_service_status(LIVENESS, ServingStatus::NotServing).await;
            }
            // A dead thread does not come back: the process must be restarted.
            return;
        }
        let stuck = watchdogs
            .iter()
            .find_map(|w| w.busy_for().filter(|d| *d > stall).map(|d| (w.name(), d)));
        match (alive, stuck) {
            (true, Some((name, d))) => {
                tracing::error!(
                    thread = name,
                    busy_secs = d.as_secs_f64(),
                    stall_secs = stall.as_secs_f64(),
                    "model thread stalled: liveness NOT_SERVING"
                );
                health.set_service_status(LIVENESS, ServingStatus::NotServing).await;
                alive = false;
            }
            (false, None) => {
                tracing::info!("model threads progress again: liveness SERVING");
                health.set_service_status(LIVENESS, ServingStatus::Serving).await;
                alive = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn status(health: &HealthReporter, service: &str) -> i32 {
        use tonic_health::pb::health_server::Health;
        let svc = crate::health::HealthService::from_reporter(health);
        let req =
            tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.into() });
        svc.check(req).await.expect("status is set").into_inner().status
    }

    const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    const NOT_SERVING: i32 =
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

    #[tokio::test]
    async fn a_stalled_thread_fails_liveness_and_recovers() {
        let health = HealthReporter::new();
        starting(&health).await;
        assert_eq!(
            (status(&health, STARTUP).await, status(&health, LIVENESS).await),
            (NOT_SERVING, SERVING)
        );
        started(&health).await;
        assert_eq!(status(&health, STARTUP).await, SERVING);

        let w = Watchdog::new("model");
        let watcher = tokio::spawn(watch_liveness(
            health.clone(),
            vec![w.clone()],
            Duration::from_millis(300),
        ));
        let guard = w.busy();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(status(&health, LIVENESS).await, NOT_SERVING, "busy 1.5 s > 0.3 s stall limit");
        drop(guard);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(status(&health, LIVENESS).await, SERVING, "idle again");
        assert_eq!(status(&health, STARTUP).await, SERVING, "liveness never touches startup");
        watcher.abort();
    }
}
