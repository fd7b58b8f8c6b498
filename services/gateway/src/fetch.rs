//! `image_url` values of the OpenAI API: base64 `data:` URLs always; remote `http://` and
//! `https://` URLs only for allow-listed hosts, because fetching arbitrary URLs would let any
//! caller make the cluster reach into its own network.
//!
//! A remote URL is checked twice. [`RemoteImage::parse`] needs no network and runs with the
//! other cheap refusals, before the tenant is charged: scheme, no user information, host on the
//! allow-list (exact after normalising case and a trailing dot; `*.suffix` entries match
//! subdomains), port on the port list. [`ImageFetcher::fetch`] runs once the request is
//! admitted: it resolves the host, refuses internal addresses ([`crate::address_policy`])
//! unless `--image-url-allow-internal`, connects to a vetted address itself (no second
//! resolution to rebind), speaks TLS with the system roots plus `--image-url-ca-file`, follows
//! no redirects, and bounds the size (`--max-image-bytes`) and time (`--image-url-timeout-secs`
//! and the request's deadline). A request's images are fetched concurrently.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::address_policy::{host_allowed, is_internal, normalize_host};
use crate::config::GatewayConfig;
use crate::error::GatewayError;

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// Longest remote image URL.
const MAX_REMOTE_URL: usize = 8192;

/// Decodes a `data:[<mediatype>];base64,<data>` URL.
///
/// # Errors
/// Not base64, malformed, or over `max_bytes`.
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<Bytes, GatewayError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| invalid("not a data: URL"))?;
    let (meta, data) =
        rest.split_once(',').ok_or_else(|| invalid("malformed data: URL (no comma)"))?;
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(invalid("data: URLs must be base64-encoded (data:image/png;base64,...)"));
    }
    if data.len() / 4 * 3 > max_bytes + 3 {
        return Err(invalid(format!(
            "image is about {} bytes; the limit is {max_bytes}",
            data.len() / 4 * 3
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| invalid(format!("image data URL is not valid base64: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(invalid(format!("image is {} bytes; the limit is {max_bytes}", bytes.len())));
    }
    Ok(Bytes::from(bytes))
}

/// A remote image URL that passed every check that needs no network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteImage {
    /// The URL as given (for messages).
    pub url: String,
    /// `https://`.
    pub https: bool,
    /// Normalised host: a DNS name or an IP address.
    pub host: String,
    /// Port (the scheme's default when the URL has none).
    pub port: u16,
    /// `Host` header value.
    authority: String,
    /// Path and query.
    path: String,
}

impl RemoteImage {
    /// Checks `url` against the gateway's fetch policy without touching the network.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming what is refused.
    pub fn parse(url: &str, config: &GatewayConfig) -> Result<Self, GatewayError> {
        if url.len() > MAX_REMOTE_URL {
            return Err(invalid(format!(
                "image URL is {} bytes; at most {MAX_REMOTE_URL}",
                url.len()
            )));
        }
        let uri: http::Uri =
            url.parse().map_err(|_| invalid("image_url is neither a data: URL nor a valid URL"))?;
        let https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => return Err(invalid("image_url must be a data: URL or an http(s) URL")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("image URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("image URLs may not carry user information (`user@host`)"));
        }
        let host = normalize_host(authority.host()).map_err(invalid)?;
        let policy = &config.image_urls;
        if policy.allow.is_empty() || !host_allowed(&host, &policy.allow) {
            return Err(invalid(format!(
                "remote image URLs are not fetched from `{host}` (not on this gateway's allow-list); send the image as a base64 data: URL"
            )));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !policy.ports.contains(&port) {
            return Err(invalid(format!("image URLs may use port {:?}, not {port}", policy.ports)));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let authority = authority.as_str().to_string();
        Ok(Self { url: url.to_string(), https, host, port, authority, path })
    }
}

/// Fetches admitted remote images (see the module docs).
pub struct ImageFetcher {
    allow_internal: bool,
    max_bytes: usize,
    timeout: Duration,
    /// Built when the allow-list is not empty.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl ImageFetcher {
    /// The fetcher of `config`; reads the trust roots when remote URLs are allowed at all.
    ///
    /// # Errors
    /// `--image-url-ca-file` cannot be read or holds no certificate.
    pub fn new(config: &GatewayConfig) -> Result<Self, String> {
        let policy = &config.image_urls;
        let tls = if policy.allow.is_empty() {
            None
        } else {
            Some(tls_config(policy.ca_file.as_deref())?)
        };
        Ok(Self {
            allow_internal: policy.allow_internal,
            max_bytes: config.max_image_bytes,
            timeout: policy.timeout,
            tls,
        })
    }

    /// Fetches every image at once; the first failure fails them all.
    ///
    /// # Errors
    /// As [`Self::fetch`].
    pub async fn fetch_all(
        &self,
        images: &[RemoteImage],
        deadline: Instant,
    ) -> Result<Vec<Bytes>, GatewayError> {
        futures::future::try_join_all(images.iter().map(|i| self.fetch(i, deadline))).await
    }

    /// Fetches one image within the fetch timeout and the request's deadline.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when the URL cannot be fetched or its answer is refused;
    /// DEADLINE_EXCEEDED when the request's deadline passes first.
    pub async fn fetch(
        &self,
        image: &RemoteImage,
        deadline: Instant,
    ) -> Result<Bytes, GatewayError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(self.timeout), self.fetch_unbounded(image)).await {
            Ok(result) => result,
            Err(_) if left <= self.timeout => Err(GatewayError::DeadlineExceeded(format!(
                "fetching {} outlived the request's deadline",
                image.url
            ))),
            Err(_) => Err(invalid(format!(
                "fetching {} took longer than {} s",
                image.url,
                self.timeout.as_secs()
            ))),
        }
    }

    async fn fetch_unbounded(&self, image: &RemoteImage) -> Result<Bytes, GatewayError> {
        let mut last_error = None;
        let mut stream = None;
        for addr in self.resolve(image).await? {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = Some(format!("{addr}: {e}")),
            }
        }
        let tcp = stream.ok_or_else(|| {
            tracing::info!(host = %image.host, error = %last_error.unwrap_or_default(), "image URL unreachable");
            invalid(format!("cannot connect to {}", image.host))
        })?;
        if !image.https {
            return self.get(tcp, image).await;
        }
        let tls = self.tls.clone().ok_or_else(|| invalid("https image URLs are not allowed"))?;
        let name = rustls::pki_types::ServerName::try_from(image.host.clone())
            .map_err(|e| invalid(format!("`{}` cannot be a TLS server name: {e}", image.host)))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| invalid(format!("TLS with {}: {e}", image.host)))?;
        self.get(tls, image).await
    }

    /// The addresses of `image.host` a fetch may connect to.
    async fn resolve(&self, image: &RemoteImage) -> Result<Vec<SocketAddr>, GatewayError> {
        let all: Vec<SocketAddr> = match image.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, image.port)],
            Err(_) => tokio::net::lookup_host((image.host.as_str(), image.port))
                .await
                .map_err(|e| invalid(format!("cannot resolve `{}`: {e}", image.host)))?
                .collect(),
        };
        let usable: Vec<SocketAddr> =
            all.iter().copied().filter(|a| self.allow_internal || !is_internal(a.ip())).collect();
        if usable.is_empty() {
            // The addresses go to the log, not to the caller (no map of the internal network).
            let listed: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
            tracing::info!(host = %image.host, addresses = %listed.join(", "), "image URL refused: internal addresses only");
            return Err(invalid(format!(
                "`{}` resolves to internal addresses only; image URLs may not reach them",
                image.host
            )));
        }
        Ok(usable)
    }

    /// One HTTP/1.1 GET on `io`; no redirects, the body bounded by `max_bytes`.
    async fn get<S>(&self, io: S, image: &RemoteImage) -> Result<Bytes, GatewayError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let url = &image.url;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| invalid(format!("cannot fetch {url}: {e}")))?;
        // The connection ends with this call, whatever happens to it.
        let conn = AbortOnDrop(tokio::spawn(conn));
        let request = http::Request::get(image.path.as_str())
            .header(http::header::HOST, image.authority.as_str())
            .header(http::header::USER_AGENT, concat!("dsvl-gateway/", env!("CARGO_PKG_VERSION")))
            .header(http::header::ACCEPT, "image/*")
            .body(Empty::<Bytes>::new())
            .map_err(|e| invalid(format!("cannot fetch {url}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| invalid(format!("cannot fetch {url}: {e}")))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(invalid(format!(
                "fetching {url} gave HTTP {status}; redirects are not followed"
            )));
        }
        if !status.is_success() {
            return Err(invalid(format!("fetching {url} gave HTTP {status}")));
        }
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(invalid(format!(
                "{url} is {} bytes; the limit is {}",
                declared.unwrap_or_default(),
                self.max_bytes
            )));
        }
        let body = Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map_err(|e| {
                invalid(format!("cannot read {url}: {e} (limit {} bytes)", self.max_bytes))
            })?
            .to_bytes();
        drop(conn);
        if body.is_empty() {
            return Err(invalid(format!("{url} is empty")));
        }
        Ok(body)
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS client settings: the system's trust roots plus those of `ca_file`, HTTP/1.1 by ALPN.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--image-url-ca-file {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--image-url-ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("--image-url-ca-file {}: no certificate in it", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("--image-url-ca-file {}: {e}", path.display()))?;
        }
    } else if added == 0 {
        tracing::warn!(
            "no system trust roots found: https image URLs will fail (give --image-url-ca-file)"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_within_limits() {
        assert_eq!(&decode_data_url("data:image/png;base64,aGVsbG8=", 100).unwrap()[..], b"hello");
        assert!(decode_data_url("data:image/png,hello", 100).is_err());
        assert!(decode_data_url("data:image/png;base64,!!!", 100).is_err());
        assert!(decode_data_url("data:image/png;base64,aGVsbG8=", 3).is_err());
    }
}
