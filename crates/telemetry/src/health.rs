//! `grpc.health.v1.Health` as the gRPC health-checking protocol describes it, which
//! `tonic-health` 0.14 departs from in two ways clients notice: its `Watch` sends the status
//! again each time it is set, changed or not, and it ends the call with NOT_FOUND for a service
//! it does not know. Here `Watch` sends the current status first and then only changes, and a
//! watch on an unknown service streams SERVICE_UNKNOWN and stays open (the service may be
//! registered later, as the protocol allows). `Check` on an unknown service is NOT_FOUND.
//!
//! The protocol types are `tonic-health`'s; only the server side is ours.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{watch, RwLock};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::ServingStatus;

type Statuses = Arc<RwLock<HashMap<String, watch::Sender<Wire>>>>;

fn wire(status: ServingStatus) -> Wire {
    match status {
        ServingStatus::Unknown => Wire::Unknown,
        ServingStatus::Serving => Wire::Serving,
        ServingStatus::NotServing => Wire::NotServing,
    }
}

/// Sets the status of named services; cheap to clone, shared with the [`HealthService`].
#[derive(Debug, Clone, Default)]
pub struct HealthReporter {
    statuses: Statuses,
}

impl HealthReporter {
    /// No service registered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (registers) `service`'s status; watchers hear of it only if it changed.
    pub async fn set_service_status(&self, service: impl AsRef<str>, status: ServingStatus) {
        self.set(service.as_ref(), wire(status)).await;
    }

    async fn set(&self, service: &str, status: Wire) {
        let mut map = self.statuses.write().await;
        match map.get(service) {
            Some(tx) => {
                tx.send_if_modified(|s| std::mem::replace(s, status) != status);
            }
            None => {
                map.insert(service.to_string(), watch::channel(status).0);
            }
        }
    }
}

/// The `grpc.health.v1.Health` server over a [`HealthReporter`]'s statuses.
#[derive(Debug, Clone)]
pub struct HealthService {
    statuses: Statuses,
}

/// A reporter and the gRPC service that answers from it.
pub fn health_reporter() -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    let service = HealthService { statuses: reporter.statuses.clone() };
    (reporter, HealthServer::new(service))
}

impl HealthService {
    /// The service answering from `reporter`'s statuses.
    pub fn from_reporter(reporter: &HealthReporter) -> Self {
        Self { statuses: reporter.statuses.clone() }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let map = self.statuses.read().await;
        match map.get(&request.get_ref().service).map(|tx| *tx.borrow()) {
            Some(status) if status != Wire::ServiceUnknown => {
                Ok(Response::new(HealthCheckResponse { status: status as i32 }))
            }
            _ => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let mut rx = {
            let mut map = self.statuses.write().await;
            // An unknown service is watched as SERVICE_UNKNOWN until it is registered.
            map.entry(service).or_insert_with(|| watch::channel(Wire::ServiceUnknown).0).subscribe()
        };
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                let status = *rx.borrow_and_update();
                if last != Some(status) {
                    last = Some(status);
                    let msg = HealthCheckResponse { status: status as i32 };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by `producer` through a small channel; the producer stops when the client goes.
fn async_stream<F, Fut>(producer: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<HealthCheckResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;

    async fn next(s: &mut WatchStream) -> Option<i32> {
        tokio::time::timeout(Duration::from_millis(300), s.next())
            .await
            .ok()
            .flatten()
            .map(|r| r.expect("a status").status)
    }

    fn req(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest { service: service.into() })
    }

    #[tokio::test]
    async fn watch_sends_changes_only_and_waits_on_unknown_services() {
        let reporter = HealthReporter::new();
        let svc = HealthService::from_reporter(&reporter);
        reporter.set_service_status("a", ServingStatus::NotServing).await;
        let mut a = svc.watch(req("a")).await.expect("watch").into_inner();
        assert_eq!(next(&mut a).await, Some(Wire::NotServing as i32), "the current status");
        reporter.set_service_status("a", ServingStatus::NotServing).await;
        assert_eq!(next(&mut a).await, None, "no message without a change");
        reporter.set_service_status("a", ServingStatus::Serving).await;
        assert_eq!(next(&mut a).await, Some(Wire::Serving as i32));

        // Unknown: SERVICE_UNKNOWN, the call stays open, and registration is heard.
        let mut b = svc.watch(req("b")).await.expect("watch").into_inner();
        assert_eq!(next(&mut b).await, Some(Wire::ServiceUnknown as i32));
        assert_eq!(next(&mut b).await, None, "still open, nothing new");
        assert_eq!(svc.check(req("b")).await.expect_err("unknown").code(), tonic::Code::NotFound);
        reporter.set_service_status("b", ServingStatus::Serving).await;
        assert_eq!(next(&mut b).await, Some(Wire::Serving as i32));
        assert_eq!(svc.check(req("b")).await.expect("known").into_inner().status, 1);
    }
}
