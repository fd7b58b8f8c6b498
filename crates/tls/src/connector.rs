//! tonic channels over TLS.
//!
//! The channel connects to the address in its endpoint (for a Kubernetes headless service, one
//! pod's address) but verifies the server's certificate for the name the tier was configured
//! with (`dsvl-vision`, say): pod addresses are not in certificates, service names are.

use std::io;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::{Reloading, TlsError};

/// The name to verify a server's certificate for: a DNS name or an IP address, as configured
/// (`host` or `host:port`, IPv6 in brackets).
///
/// # Errors
/// Not a DNS name or an IP address.
pub fn server_name(configured: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match configured.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.is_empty() => h,
        _ => configured,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Other(format!("`{host}` cannot be a TLS server name: {e}")))
}

/// A lazily connected channel to `endpoint` over TLS, verifying the server as `name`; every
/// new connection uses the current client configuration.
pub fn lazy_channel(
    endpoint: Endpoint,
    tls: Reloading<ClientConfig>,
    name: ServerName<'static>,
) -> Channel {
    let connect = tower::service_fn(move |uri: http::Uri| {
        let (tls, name) = (tls.current(), name.clone());
        async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS with {host}:{port}: {e}")))?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector_lazy(connect)
}

/// A lazily connected channel to `addr` (`host:port`), over TLS verified for `addr`'s host
/// with `tls`, in plain text without: for clients and tools that reach one service directly.
///
/// # Errors
/// `addr` is not a valid endpoint, or the TLS files are unusable.
pub fn channel_to(
    addr: &str,
    tls: Option<&crate::ClientFiles>,
    connect_timeout: std::time::Duration,
) -> Result<Channel, TlsError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TlsError::Other(format!("`{addr}`: {e}")))?
        .connect_timeout(connect_timeout);
    Ok(match tls {
        Some(files) => lazy_channel(
            endpoint,
            Reloading::fixed(crate::client_config(files, &[crate::ALPN_H2])?),
            server_name(addr)?,
        ),
        None => endpoint.connect_lazy(),
    })
}
