//! Accepting connections for servers, in TLS or plain text.
//!
//! [`connections`] turns a listener into the stream of connections that
//! `tonic::transport::Server::serve_with_incoming_shutdown` takes, bounded as
//! [`ConnectionLimits`] says: at most `max_connections` are open at once (more wait in the
//! listen backlog), and a new connection has `first_bytes` to finish its TLS handshake (with
//! TLS) and send the whole HTTP/2 preface, on its own task: a client that opens connections and
//! sends nothing, or a byte, neither blocks the accept loop nor holds a slot for long. Failed handshakes (no
//! client certificate, one from another authority, plain text) are counted in
//! `dsvl_tls_handshake_failures_total` and logged at debug level.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;

use crate::Reloading;

/// Bounds on a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most open connections (handshakes included); beyond it new ones wait in the backlog.
    pub max_connections: usize,
    /// Time a new connection has to finish its TLS handshake and send the HTTP/2 preface.
    pub first_bytes: Duration,
}

impl ConnectionLimits {
    /// Internal tiers: few callers (gateways), many streams each.
    pub const INTERNAL: Self =
        Self { max_connections: 16384, first_bytes: Duration::from_secs(10) };
    /// A public listener.
    pub const PUBLIC: Self = Self { max_connections: 4096, first_bytes: Duration::from_secs(10) };
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection accepted by [`connections`]; its slot frees when it is dropped.
pub struct Conn {
    io: Io,
    remote: SocketAddr,
    /// How much of the preface, already read to check it, the server has been given back.
    replayed: usize,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// The address of the peer.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The certificate chain the client presented (mutual TLS), leaf first.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.io {
            Io::Tls(s) => s.get_ref().1.peer_certificates(),
            Io::Plain(_) => None,
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

/// The connections of `listener` for a tonic server, TLS ones with `tls`, within `limits`; the
/// accept loop ends when the stream is dropped.
pub fn connections(
    listener: TcpListener,
    tls: Option<Reloading<ServerConfig>>,
    limits: ConnectionLimits,
) -> Pin<Box<dyn futures::Stream<Item = io::Result<Conn>> + Send>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limits, tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Reloading<ServerConfig>>,
    limits: ConnectionLimits,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
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
            // hyper starts no timer before the HTTP/2 preface: a connection that sends a byte,
            // or finishes its TLS handshake, and then nothing would hold its slot forever. So
            // the handshake and the whole preface must arrive within `first_bytes`; the preface
            // is then replayed to the server.
            let deadline = tokio::time::Instant::now() + limits.first_bytes;
            let mut preface = [0u8; 24];
            let io = match tls {
                Some(tls) => match accept(&tls, tcp, limits.first_bytes).await {
                    Ok(mut stream) => {
                        let read = stream.read_exact(&mut preface);
                        if !matches!(tokio::time::timeout_at(deadline, read).await, Ok(Ok(_))) {
                            return;
                        }
                        Io::Tls(Box::new(stream))
                    }
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    let mut tcp = tcp;
                    let read = tcp.read_exact(&mut preface);
                    if !matches!(tokio::time::timeout_at(deadline, read).await, Ok(Ok(_))) {
                        return;
                    }
                    Io::Plain(tcp)
                }
            };
            if &preface != HTTP2_PREFACE {
                tracing::debug!(%remote, "not HTTP/2: closed");
                return;
            }
            let _ = tx.send(Ok(Conn { io, remote, replayed: 0, _slot: slot })).await;
        });
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < HTTP2_PREFACE.len() {
            let rest = &HTTP2_PREFACE[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let local_addr = match &self.io {
            Io::Plain(s) => s.local_addr().ok(),
            Io::Tls(s) => s.get_ref().0.local_addr().ok(),
        };
        tonic::transport::server::TcpConnectInfo { local_addr, remote_addr: Some(self.remote) }
    }
}
