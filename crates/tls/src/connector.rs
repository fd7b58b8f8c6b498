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
