//! The TLS flags every service shares (each with a `DSVL_*` environment fallback).

use std::path::PathBuf;

use crate::{client_config, server_config, ClientFiles, Reloading, ServerFiles, TlsError, ALPN_H2};

/// How a server's listener speaks TLS.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of this server's gRPC listener (with --tls-key-file: TLS; the
    /// files are re-read when they change).
    #[arg(long, env = "DSVL_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "DSVL_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificate authority that clients must present a certificate from (mutual TLS).
    #[arg(long, env = "DSVL_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Names a client certificate must be valid for (one of them, comma-separated DNS names):
    /// `dsvl-gateway` lets only the gateway call an internal tier, not every holder of a
    /// certificate from the same authority.
    #[arg(
        long,
        env = "DSVL_TLS_CLIENT_NAMES",
        value_delimiter = ',',
        requires = "tls_client_ca_file"
    )]
    pub tls_client_names: Vec<String>,
}

impl ServerTlsArgs {
    /// The files, when TLS is configured.
    pub fn files(&self) -> Option<ServerFiles> {
        Some(ServerFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            client_ca: self.tls_client_ca_file.clone(),
            client_names: self
                .tls_client_names
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
        })
    }

    /// The files of an internal tier's listener: mutual TLS (a client certificate authority is
    /// required), or plain text only with `insecure`. The error is the reason to show.
    ///
    /// # Errors
    /// No TLS without `insecure`, or TLS without client authentication.
    pub fn internal(&self, insecure: bool) -> Result<Option<ServerFiles>, String> {
        match self.files() {
            Some(f) if f.client_ca.is_none() => Err("an internal tier authenticates its clients: give the certificate authority of their certificates (--tls-client-ca-file, mutual TLS)".into()),
            Some(f) => Ok(Some(f)),
            None if insecure => Ok(None),
            None => Err("an internal tier serves mutual TLS: give --tls-cert-file, --tls-key-file and --tls-client-ca-file, or pass --insecure to serve plain text".into()),
        }
    }

    /// The gRPC (HTTP/2) server configuration, reloaded on change; `None` for plain text.
    ///
    /// # Errors
    /// The files are unusable.
    pub fn grpc(&self) -> Result<Option<Reloading<rustls::ServerConfig>>, TlsError> {
        self.files().map(|f| watch_server(f, &[ALPN_H2])).transpose()
    }
}

/// A server configuration from `files` offering `alpn`, reloaded when they change.
///
/// # Errors
/// The files are unusable.
pub fn watch_server(
    files: ServerFiles,
    alpn: &'static [&'static [u8]],
) -> Result<Reloading<rustls::ServerConfig>, TlsError> {
    Reloading::watch("server", files.paths(), crate::reload::POLL, move || {
        server_config(&files, alpn)
    })
}

/// A client configuration from `files` offering `alpn`, reloaded when they change.
///
/// # Errors
/// The files are unusable.
pub fn watch_client(
    files: ClientFiles,
    alpn: &'static [&'static [u8]],
) -> Result<Reloading<rustls::ClientConfig>, TlsError> {
    Reloading::watch("client", files.paths(), crate::reload::POLL, move || {
        client_config(&files, alpn)
    })
}

/// How a client reaches the internal tiers over mutual TLS.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsArgs {
    /// PEM certificate authority the internal tiers' certificates chain to (with it: TLS to
    /// the vision and decoder tiers, verified for the names given to --vision and --decoder).
    #[arg(long, env = "DSVL_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// PEM certificate chain this client presents to them (mutual TLS).
    #[arg(long, env = "DSVL_UPSTREAM_CERT_FILE", requires_all = ["upstream_key_file", "upstream_ca_file"])]
    pub upstream_cert_file: Option<PathBuf>,
    /// PEM private key of --upstream-cert-file.
    #[arg(long, env = "DSVL_UPSTREAM_KEY_FILE", requires = "upstream_cert_file")]
    pub upstream_key_file: Option<PathBuf>,
}

impl UpstreamTlsArgs {
    /// The files, when TLS to the upstreams is configured.
    pub fn files(&self) -> Option<ClientFiles> {
        Some(ClientFiles {
            ca: self.upstream_ca_file.clone()?,
            identity: self.upstream_cert_file.clone().zip(self.upstream_key_file.clone()),
        })
    }

    /// The gRPC client configuration, reloaded on change; `None` for plain text.
    ///
    /// # Errors
    /// The files are unusable.
    pub fn grpc(&self) -> Result<Option<Reloading<rustls::ClientConfig>>, TlsError> {
        self.files().map(|f| watch_client(f, &[ALPN_H2])).transpose()
    }
}

/// How a service reaches Redis over TLS (with a `rediss://` URL).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTlsArgs {
    /// PEM certificate authority Redis's certificate must chain to (default with a
    /// `rediss://` URL: the system roots).
    #[arg(long, env = "DSVL_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to Redis (when it authenticates clients).
    #[arg(long, env = "DSVL_REDIS_CERT_FILE", requires = "redis_key_file")]
    pub redis_cert_file: Option<PathBuf>,
    /// PEM private key of --redis-cert-file.
    #[arg(long, env = "DSVL_REDIS_KEY_FILE", requires = "redis_cert_file")]
    pub redis_key_file: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// The certificate authority file, and the client certificate and key.
    pub fn files(&self) -> (Option<PathBuf>, Option<(PathBuf, PathBuf)>) {
        (self.redis_ca_file.clone(), self.redis_cert_file.clone().zip(self.redis_key_file.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_listener_is_mutual_tls_or_explicitly_insecure() {
        let plain = ServerTlsArgs::default();
        let err = plain.internal(false).unwrap_err();
        assert!(err.contains("--tls-cert-file") && err.contains("--insecure"), "{err}");
        assert_eq!(plain.internal(true), Ok(None));
        let one_way = ServerTlsArgs {
            tls_cert_file: Some("/c.pem".into()),
            tls_key_file: Some("/k.pem".into()),
            tls_client_ca_file: None,
            tls_client_names: Vec::new(),
        };
        // --insecure does not make one-way TLS acceptable: clients must be authenticated.
        assert!(one_way.internal(true).unwrap_err().contains("--tls-client-ca-file"));
        let mutual = ServerTlsArgs { tls_client_ca_file: Some("/ca.pem".into()), ..one_way };
        assert!(mutual.internal(false).is_ok_and(|f| f.is_some()));
    }
}
