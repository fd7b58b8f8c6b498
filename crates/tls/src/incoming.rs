//! Accepting TLS connections for servers.
//!
//! [`incoming`] turns a listener into the stream of connections that
//! `tonic::transport::Server::serve_with_incoming_shutdown` takes. Each handshake runs on its
//! own task, within a time limit, and at most [`MAX_HANDSHAKES`] run at once: a client that
//! opens a connection and sends nothing neither blocks the accept loop nor holds memory for
//! long. Failed handshakes (no client certificate, one from another authority, plain text) are
//! counted in `dsvl_tls_handshake_failures_total` and logged at debug level.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;

use crate::Reloading;

/// Most TLS handshakes in progress at once per listener.
pub const MAX_HANDSHAKES: usize = 256;

/// A TLS connection accepted by [`incoming`].
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    remote: SocketAddr,
}

impl TlsConn {
    /// The address of the peer.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The certificate chain the client presented (mutual TLS), leaf first.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.stream.get_ref().1.peer_certificates()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.stream.get_ref().0.local_addr().ok(),
            remote_addr: Some(self.remote),
        }
    }
}

/// One server-side handshake on `tcp` with the current configuration, within `limit`.
///
/// # Errors
/// The handshake fails or takes longer than `limit`.
pub async fn accept(
    tls: &Reloading<ServerConfig>,
    tcp: TcpStream,
    limit: Duration,
) -> io::Result<TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            metrics::counter!("dsvl_tls_handshake_failures_total").increment(1);
            Err(e)
        }
        Err(_) => {
            metrics::counter!("dsvl_tls_handshake_failures_total").increment(1);
            Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))
        }
    }
}

/// The TLS connections accepted on `listener`, each handshake within `limit`; the accept loop
/// ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Reloading<ServerConfig>,
    limit: Duration,
) -> impl futures::Stream<Item = io::Result<TlsConn>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limit, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Reloading<ServerConfig>,
    limit: Duration,
    tx: mpsc::Sender<io::Result<TlsConn>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match accept(&tls, tcp, limit).await {
                Ok(stream) => {
                    let _ = tx.send(Ok(TlsConn { stream, remote })).await;
                }
                Err(e) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
            }
        });
    }
}

/// Longest TLS handshake a server waits for.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// A connection of a server that speaks TLS or plain text, as configured.
pub enum Conn {
    /// Plain TCP (`--insecure` or no certificate configured).
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsConn>),
}

/// The connections of `listener` for a tonic server: TLS ones with `tls`, plain TCP ones
/// (no Nagle delay) without.
pub fn connections(
    listener: TcpListener,
    tls: Option<Reloading<ServerConfig>>,
) -> Pin<Box<dyn futures::Stream<Item = io::Result<Conn>> + Send>> {
    use futures::StreamExt;
    match tls {
        Some(tls) => Box::pin(
            incoming(listener, tls, HANDSHAKE_LIMIT).map(|c| c.map(|c| Conn::Tls(Box::new(c)))),
        ),
        None => Box::pin(tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
            c.map(|c| {
                let _ = c.set_nodelay(true);
                Conn::Plain(c)
            })
        })),
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.connect_info(),
        }
    }
}
