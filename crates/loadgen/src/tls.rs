//! `https://` and `grpcs://` targets: the gateway's public listeners behind TLS, as operators
//! run them. Trust is the system's roots, or only the authority of `--ca-file` when it is given
//! (a private cluster's); a client certificate is presented when the gateway asks for one.
//!
//! HTTP goes through hyper's pooled client with a connector that wraps each TCP connection in
//! rustls (ALPN `http/1.1`, as the gateway's HTTP listener speaks); gRPC goes through
//! `dsvl_tls::lazy_channel` (ALPN `h2`), the tiers' own TLS channels.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tower::Service;

/// What a TLS client trusts and presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate authorities the gateway's certificate must chain to (`None`: the
    /// system's trust roots).
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key, for a gateway that requires mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// Whether anything was given (which only a TLS target can use).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// A client configuration offering `alpn`.
    pub(crate) fn config(&self, alpn: &[u8]) -> Result<ClientConfig, String> {
        let mut config = match &self.ca {
            Some(ca) => dsvl_tls::client_config(
                &dsvl_tls::ClientFiles { ca: ca.clone(), identity: self.identity.clone() },
                &[alpn],
            )
            .map_err(|e| e.to_string())?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err("no system trust roots found: give --ca-file".into());
                }
                let builder = ClientConfig::builder_with_provider(dsvl_tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots);
                match &self.identity {
                    Some((cert, key)) => {
                        let certs =
                            dsvl_tls::files::certificates(cert).map_err(|e| e.to_string())?;
                        let key = rustls::pki_types::pem::PemObject::from_pem_file(key)
                            .map_err(|e| format!("{}: {e}", key.display()))?;
                        builder.with_client_auth_cert(certs, key).map_err(|e| e.to_string())?
                    }
                    None => builder.with_no_client_auth(),
                }
            }
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// The longest a TLS handshake may take once TCP is connected.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A TCP connection, wrapped in TLS for `https://`.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connects the HTTP client: TCP by `HttpConnector` (its timeouts and `TCP_NODELAY`), then TLS
/// verified for the URL's host when there is a configuration.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Connector {
    pub(crate) fn new(
        tcp: HttpConnector,
        tls: Option<(ClientConfig, ServerName<'static>)>,
    ) -> Self {
        Self { tcp, tls: tls.map(|(c, n)| (Arc::new(c), n)) }
    }
}

impl Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_ready(cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // The URI the pool hands over is the request's (`https://HOST:PORT/...` for a TLS
        // target, hence `enforce_http(false)` on the TCP connector): whether to speak TLS is
        // chosen once for the whole client.
        let tcp = self.tcp.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = tcp.await.map_err(io::Error::other)?.into_inner();
            Ok(TokioIo::new(match tls {
                None => Stream::Plain(tcp),
                Some((config, name)) => {
                    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
                    // TCP has its own connect timeout; a server that accepts and then stalls
                    // must not hold the handshake forever either.
                    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                        })?
                        .map_err(|e| io::Error::new(e.kind(), format!("TLS: {e}")))?;
                    Stream::Tls(Box::new(tls))
                }
            }))
        })
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(s) => s.connected(),
            Stream::Tls(s) => s.get_ref().0.connected(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
