//! The public HTTP server loop, with the timeouts a slow client must not outlast (the classic
//! slow-loris defences `axum::serve` does not offer):
//!
//! * **header read**: a connection has [`HttpTimeouts::header_read`] to deliver a request's
//!   headers (HTTP/1; hyper closes it otherwise);
//! * **body idle**: once a request is admitted, its body may pause at most
//!   [`HttpTimeouts::body_idle`] between chunks ([`IdleTimeoutBody`]); the request then fails
//!   and its buffers are freed;
//! * HTTP/2 keep-alive pings on idle connections.
//!
//! Shutdown: stop accepting when `stopped` resolves, ask every connection to finish its
//! in-flight requests (graceful shutdown), and return once all have.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Time bounds of the public HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// Longest a connection may take to send a request's headers.
    pub header_read: Duration,
    /// Longest a request body may pause between chunks.
    pub body_idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self { header_read: Duration::from_secs(10), body_idle: Duration::from_secs(30) }
    }
}

/// A request body that fails when no chunk arrives for `idle`.
pub struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeoutBody {
    /// Wraps `inner`.
    pub fn new(inner: Body, idle: Duration) -> Self {
        Self { inner, idle, timer: Box::pin(tokio::time::sleep(idle)) }
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
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the request body sent nothing for {:.0}s",
                    this.idle.as_secs_f64()
                )
                .into()))),
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

/// Middleware: every request body gets the idle timeout.
pub async fn body_idle_timeout(
    axum::extract::State(idle): axum::extract::State<Duration>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    next.run(Request::from_parts(parts, Body::new(IdleTimeoutBody::new(body, idle)))).await
}

/// Serves `app` on `listener` until `stopped` resolves, then lets every connection finish.
///
/// # Errors
/// Never today (accept errors are logged and retried); the signature leaves room.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    timeouts: HttpTimeouts,
    stopped: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stopped);
    loop {
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
        let (builder, app, mut stop) = (builder.clone(), app.clone(), stop_rx.clone());
        connections.spawn(async move {
            let service = TowerToHyperService::new(app);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
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
