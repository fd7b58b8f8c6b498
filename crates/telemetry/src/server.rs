//! The one gRPC server skeleton of the three services, and their one drain mechanism.
//!
//! [`GrpcBase::new`] sets up `grpc.health.v1` with the probe names ([`crate::probes`]: the API
//! service and `""` NOT_SERVING, `startup` NOT_SERVING, `liveness` SERVING) and reflection for
//! exactly the packages the server serves; [`GrpcBase::router`] is a tonic router with both, to
//! which a service adds its API and serves with [`incoming_nodelay`](crate::incoming_nodelay)
//! until [`Drain::stopped`].
//!
//! Draining ([`Drain::drain`]), the same in every service: new work is refused
//! ([`Drain::is_draining`], answered UNAVAILABLE by the service), readiness turns NOT_SERVING,
//! requests in flight (each holds an [`InFlight`] guard from [`Drain::track`]) get up to the
//! drain time to finish, then the listeners stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::health::HealthReporter;

use crate::{probes, TelemetryError};

/// Draining state shared by a service's handlers and its `run` function.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Counts one request (or stream) in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    /// Not draining, nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            stop: tokio::sync::watch::channel(false).0,
        })
    }

    /// Whether new work must be refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Marks a request in flight until the guard is dropped (hold it for a stream's lifetime).
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once the listeners should stop (pass to `serve_with_incoming_shutdown` and to
    /// axum's graceful shutdown).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Stops the listeners now (no drain: the service is failing).
    pub fn stop(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stop.send_replace(true);
    }

    /// Drains: refuses new work, readiness of `S` NOT_SERVING, waits up to `within` for the
    /// requests in flight, then stops the listeners and waits a little for `server` to close
    /// its connections. Returns the server's own result if it ended first.
    pub async fn drain<S, F, E>(
        &self,
        health: &HealthReporter,
        mut server: Pin<&mut F>,
        within: Duration,
    ) -> Option<Result<(), E>>
    where
        S: tonic::server::NamedService,
        F: Future<Output = Result<(), E>>,
    {
        tracing::info!(in_flight = self.in_flight(), "draining");
        self.draining.store(true, Ordering::SeqCst);
        probes::set_ready::<S>(health, false).await;
        let deadline = Instant::now() + within;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::select! {
                r = &mut server => return Some(r),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if self.in_flight() > 0 {
            tracing::warn!(
                in_flight = self.in_flight(),
                "drain time over; stopping with requests in flight"
            );
        }
        self.stop.send_replace(true);
        // Graceful close of the connections; a client that holds one open cannot delay exit.
        tokio::time::timeout(Duration::from_secs(5), server).await.ok()
    }
}

/// The main port's router: every response passes [`crate::oversize::OversizeLayer`].
pub type ApiRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<crate::oversize::OversizeLayer, tower::layer::util::Identity>,
>;

/// Health and reflection of one gRPC server, set up the same way in every service.
pub struct GrpcBase {
    /// The health reporter (readiness, `startup`, `liveness`).
    pub health: HealthReporter,
    /// The server's drain state.
    pub drain: Arc<Drain>,
    /// A router for the main port, serving health and reflection unless built with
    /// `health_on_main` false: add the API service and serve it until [`Drain::stopped`].
    pub router: ApiRouter,
    /// Health and reflection alone, in plain text, for an internal port (`--health-listen`):
    /// kubelet's gRPC probes present no client certificate, and the public port of the gateway
    /// should not carry health watches or reflection. Serve it with [`serve_internal`].
    pub internal: tonic::transport::server::Router,
}

/// Serves `internal` (from [`GrpcBase`]) on `addr` until `stopped`; nothing without an address.
///
/// # Errors
/// The address cannot be bound or the server fails.
pub async fn serve_internal(
    internal: tonic::transport::server::Router,
    addr: Option<std::net::SocketAddr>,
    stopped: impl Future<Output = ()>,
) -> Result<(), TelemetryError> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| TelemetryError::Listen(format!("--health-listen {addr}: {e}")))?;
    tracing::info!(%addr, "health and reflection on the internal port");
    let connections = dsvl_tls::connections(listener, None, dsvl_tls::ConnectionLimits::INTERNAL);
    internal
        .serve_with_incoming_shutdown(connections, stopped)
        .await
        .map_err(|e| TelemetryError::Listen(format!("--health-listen {addr}: {e}")))
}

/// Connection limits of a gRPC server (HTTP/2 and TCP).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most concurrent streams a client may open on one connection (advertised in SETTINGS).
    pub max_concurrent_streams: u32,
    /// HTTP/2 PING interval on idle connections, and how long to wait for the answer before
    /// closing (dead peers and half-open connections go away).
    pub keepalive: (Duration, Duration),
    /// TCP keep-alive.
    pub tcp_keepalive: Duration,
    /// Oldest a connection may get before the server asks the client to reconnect (GOAWAY,
    /// then close once its open streams end, which the request timeout bounds): a client that
    /// only answers keep-alive pings cannot hold a connection slot forever (`None`: no limit).
    /// No grace period is set on purpose: tonic 0.14 with a grace skips the graceful GOAWAY at
    /// the age and only cuts the connection at age + grace.
    pub max_connection_age: Option<Duration>,
}

impl ServerLimits {
    /// Internal tiers: one gateway connection carries every request to a replica, so many
    /// streams.
    pub const INTERNAL: Self = Self {
        max_concurrent_streams: 4096,
        keepalive: (Duration::from_secs(30), Duration::from_secs(10)),
        tcp_keepalive: Duration::from_secs(60),
        max_connection_age: None,
    };
    /// The public edge (Envoy's default stream limit is 100; grpc-go's keep-alive and
    /// connection-age options): connections are recycled after 10 minutes, their open
    /// streams finishing first.
    pub const PUBLIC: Self = Self {
        max_concurrent_streams: 128,
        max_connection_age: Some(Duration::from_secs(600)),
        ..Self::INTERNAL
    };
}

impl GrpcBase {
    /// [`Self::with_limits`] with [`ServerLimits::INTERNAL`].
    ///
    /// # Errors
    /// A descriptor set that does not parse.
    pub async fn new<S: tonic::server::NamedService>(
        descriptors: &[&'static [u8]],
    ) -> Result<Self, TelemetryError> {
        Self::with_limits::<S>(descriptors, ServerLimits::INTERNAL, true).await
    }

    /// Health with `S` (the API service) and `""` NOT_SERVING, `startup` NOT_SERVING and
    /// `liveness` SERVING; reflection (v1) listing the services of `descriptors` and health,
    /// on the main router when `health_on_main` and always on [`Self::internal`]; the main
    /// router's connections bounded by `limits`.
    ///
    /// # Errors
    /// A descriptor set that does not parse.
    pub async fn with_limits<S: tonic::server::NamedService>(
        descriptors: &[&'static [u8]],
        limits: ServerLimits,
        health_on_main: bool,
    ) -> Result<Self, TelemetryError> {
        let (health, health_service) = crate::health::health_reporter();
        probes::set_ready::<S>(&health, false).await;
        probes::starting(&health).await;
        // Each port lists only what it serves: the main one its API, health and reflection;
        // the internal one health and reflection.
        let err = |e: tonic_reflection::server::Error| TelemetryError::Reflection(e.to_string());
        let reflection = reflection_builder(descriptors, Some(S::NAME)).build_v1().map_err(err)?;
        let reflection_alpha =
            reflection_builder(descriptors, Some(S::NAME)).build_v1alpha().map_err(err)?;
        let internal_reflection = reflection_builder(descriptors, None).build_v1().map_err(err)?;
        let internal_reflection_alpha =
            reflection_builder(descriptors, None).build_v1alpha().map_err(err)?;
        let main = || {
            let mut b = tonic::transport::Server::builder()
                .max_concurrent_streams(limits.max_concurrent_streams)
                .http2_keepalive_interval(Some(limits.keepalive.0))
                .http2_keepalive_timeout(Some(limits.keepalive.1))
                .tcp_keepalive(Some(limits.tcp_keepalive));
            if let Some(age) = limits.max_connection_age {
                b = b.max_connection_age(age);
            }
            b.layer(crate::oversize::OversizeLayer)
        };
        let router = if health_on_main {
            main()
                .add_service(health_service.clone())
                .add_service(reflection)
                .add_service(reflection_alpha)
        } else {
            // A router needs one service to exist; the API service is added next.
            main().add_optional_service(
                None::<tonic_health::pb::health_server::HealthServer<crate::health::HealthService>>,
            )
        };
        let internal = tonic::transport::Server::builder()
            .max_concurrent_streams(ServerLimits::INTERNAL.max_concurrent_streams)
            .http2_keepalive_interval(Some(ServerLimits::INTERNAL.keepalive.0))
            .http2_keepalive_timeout(Some(ServerLimits::INTERNAL.keepalive.1))
            .tcp_keepalive(Some(ServerLimits::INTERNAL.tcp_keepalive))
            .add_service(health_service)
            .add_service(internal_reflection)
            .add_service(internal_reflection_alpha);
        Ok(Self { health, drain: Drain::new(), router, internal })
    }
}

/// A reflection builder for one port, listing health, reflection (v1 and v1alpha: grpcurl asks
/// for v1, Python's `grpcio-reflection` and older tools for v1alpha) and `api` if given.
fn reflection_builder(
    descriptors: &[&'static [u8]],
    api: Option<&'static str>,
) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for d in descriptors {
        b = b.register_encoded_file_descriptor_set(d);
    }
    for name in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .chain(api)
    {
        b = b.with_service_name(name);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_work_in_flight_then_stops() {
        let drain = Drain::new();
        let (health, _) = crate::health::health_reporter();
        let guard = drain.track();
        let stopped = drain.stopped();
        let server = async move {
            stopped.await;
            Ok::<(), ()>(())
        };
        tokio::pin!(server);
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(guard);
        });
        let t = Instant::now();
        let r = drain
            .drain::<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>, _, _>(
                &health,
                server.as_mut(),
                Duration::from_secs(5),
            )
            .await;
        release.await.unwrap();
        assert!(drain.is_draining());
        assert_eq!(r, Some(Ok(())), "the server stopped once the work was done");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn drain_time_bounds_the_wait() {
        let drain = Drain::new();
        let (health, _) = crate::health::health_reporter();
        let _stuck = drain.track();
        let stopped = drain.stopped();
        let server = async move {
            stopped.await;
            Ok::<(), ()>(())
        };
        tokio::pin!(server);
        let t = Instant::now();
        let r = drain
            .drain::<tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>, _, _>(
                &health,
                server.as_mut(),
                Duration::from_millis(100),
            )
            .await;
        assert_eq!(r, Some(Ok(())));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(drain.in_flight(), 1, "still in flight: the drain time ran out");
    }
}
