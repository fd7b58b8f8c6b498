//! The public HTTP server loop, with the timeouts a slow client must not outlast (the classic
//! slow-loris defences `axum::serve` does not offer):
//!
//! * **header read**: a connection has [`HttpTimeouts::header_read`] to deliver a request's
//!   headers (HTTP/1; hyper closes it otherwise);
//! * **body idle**: once a request is admitted, its body may pause at most
//!   [`HttpTimeouts::body_idle`] between chunks ([`IdleTimeoutBody`]); the request then fails
//!   with 408 in the OpenAI error shape and its buffers are freed;
//! * HTTP/2 keep-alive pings on idle connections.
//!
//! Shutdown: stop accepting when `stopped` resolves, ask every connection to finish its
//! in-flight requests (graceful shutdown), and return once all have.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Bounds of the public HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// Longest a connection may take to send a request's headers (from the moment it opens,
    /// and again for each request on a kept-alive connection).
    pub header_read: Duration,
    /// Longest a request body may pause between chunks.
    pub body_idle: Duration,
    /// Most open connections; beyond it the listener stops accepting until one closes.
    pub max_connections: usize,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_idle: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// A request body that fails when no chunk arrives for `idle` while it is being read (the
/// clock starts when the handler first waits for it, so `Expect: 100-continue` is not
/// penalised).
pub struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the body timed out (the middleware then answers 408).
    stalled: Arc<AtomicBool>,
}

impl IdleTimeoutBody {
    /// Wraps `inner`; `stalled` is set if the body times out.
    pub fn new(inner: Body, idle: Duration, stalled: Arc<AtomicBool>) -> Self {
        Self { inner, idle, timer: None, stalled }
    }
}

impl HttpBody for IdleTimeoutBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.idle)))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    this.stalled.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(format!(
                        "the request body sent nothing for {:.0}s",
                        this.idle.as_secs_f64()
                    )
                    .into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: every request body gets the idle timeout; a request that failed because its
/// body stalled is answered 408 in OpenAI's error shape.
pub async fn body_idle_timeout(
    axum::extract::State(idle): axum::extract::State<Duration>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let stalled = Arc::new(AtomicBool::new(false));
    let body = Body::new(IdleTimeoutBody::new(body, idle, stalled.clone()));
    let response = next.run(Request::from_parts(parts, body)).await;
    if stalled.load(Ordering::Relaxed) && response.status().is_client_error() {
        return crate::http_errors::body_stalled(idle);
    }
    response
}

/// Serves `app` on `listener` until `stopped` resolves, then lets every connection finish.
///
/// HTTP/1.1 only (the OpenAI-compatible API; gRPC has its own port), so no protocol sniffing
/// runs without a timeout; a connection that sends nothing is closed after the header timeout
/// too. An idle kept-alive connection between requests is bounded only by `max_connections`.
///
/// # Errors
/// Never today (accept errors are logged and retried); the signature leaves room.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    timeouts: HttpTimeouts,
    tls: Option<dsvl_tls::Reloading<rustls::ServerConfig>>,
    stopped: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header_read);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(timeouts.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stopped);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            () = &mut stopped => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, app, stop) = (builder.clone(), app.clone(), stop_rx.clone());
        let first_byte = timeouts.header_read;
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            // hyper's header timer starts with the first bytes: a connection that sends
            // nothing at all gets the same time to start.
            let opened = tokio::time::Instant::now();
            let mut probe = [0u8; 1];
            if !matches!(tokio::time::timeout(first_byte, stream.peek(&mut probe)).await, Ok(Ok(1)))
            {
                return;
            }
            match tls {
                // The handshake gets what is left of the header time.
                Some(tls) => match dsvl_tls::accept(
                    &tls,
                    stream,
                    first_byte.saturating_sub(opened.elapsed()),
                )
                .await
                {
                    Ok(stream) => serve_connection(&builder, stream, app, stop).await,
                    Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                },
                None => serve_connection(&builder, stream, app, stop).await,
            }
        });
        // Reap finished connections so the set does not grow with the server's lifetime.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One HTTP connection until it ends, or until `stop` changes and its last request is done.
async fn serve_connection<IO>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
