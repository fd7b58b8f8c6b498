//! How a tier reaches Redis: over TLS (`rediss://`, or `rediss+cluster://` for a Redis
//! Cluster), verified against a certificate authority file (or the system roots) and with a
//! client certificate when Redis asks for one; plain text (`redis://`) only when the service
//! was started with `--insecure`.
//!
//! The files are read when a connection is made; [`RedisCache`](crate::RedisCache) notices
//! when they change (cert-manager rotates them in place) and reconnects, so new handshakes use
//! the new certificate while requests keep flowing.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::CacheError;

/// TLS material for the connection to Redis (all optional: a `rediss://` URL alone verifies
/// the server against the system roots and presents no certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM certificate authority Redis's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain and key this client presents (`tls-auth-clients yes`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// Whether any file is configured.
    pub fn has_files(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// The configured files.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut p: Vec<PathBuf> = self.ca.iter().cloned().collect();
        if let Some((cert, key)) = &self.identity {
            p.extend([cert.clone(), key.clone()]);
        }
        p
    }

    /// Modification time and length of every file (`None` for one that cannot be read): a
    /// change means the files were rotated.
    pub(crate) fn signature(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .iter()
            .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
            .collect()
    }

    /// The files' contents in the form the redis client takes.
    pub(crate) fn certificates(&self) -> Result<redis::TlsCertificates, CacheError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| CacheError::Config(format!("{}: {e}", p.display())))
        };
        let client_tls = match &self.identity {
            Some((cert, key)) => {
                Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? })
            }
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert: self.ca.as_ref().map(read).transpose()?,
        })
    }
}

/// Whether `url` reaches Redis over TLS.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("rediss+cluster://")
}

/// Checks that a Redis link is protected, or that the operator said it need not be: a
/// plain-text URL needs `insecure`, and TLS files need a TLS URL.
///
/// # Errors
/// [`CacheError::Config`] saying what to change.
pub fn check_link(url: &str, tls: &RedisTls, insecure: bool) -> Result<(), CacheError> {
    // The client reads options from the fragment (`#insecure` turns off verification).
    if url.contains('#') {
        return Err(CacheError::Config("a Redis URL with a #fragment is refused".into()));
    }
    if is_tls_url(url) {
        return Ok(());
    }
    if tls.has_files() {
        return Err(CacheError::Config(
            "--redis-ca-file / --redis-cert-file need a TLS URL (rediss:// or rediss+cluster://)"
                .into(),
        ));
    }
    if !insecure {
        return Err(CacheError::Config(
            "plain-text Redis URL: use rediss:// (with --redis-ca-file) or pass --insecure to run without TLS".into(),
        ));
    }
    Ok(())
}

/// The Redis URL (empty counts as none) and its TLS material, checked with [`check_link`].
///
/// # Errors
/// As [`check_link`].
pub fn redis_link(
    url: Option<&str>,
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    insecure: bool,
) -> Result<(Option<String>, RedisTls), CacheError> {
    let tls = RedisTls { ca, identity };
    let url = url.filter(|u| !u.is_empty()).map(str::to_string);
    match &url {
        Some(u) => check_link(u, &tls, insecure)?,
        None if tls.has_files() => {
            // Turning the cache off (an empty URL) must not need the TLS flags removed too.
            tracing::warn!("Redis TLS files given without --redis: ignored");
            return Ok((None, RedisTls::default()));
        }
        None => {}
    }
    Ok((url, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_needs_insecure_and_tls_files_need_a_tls_url() {
        let none = RedisTls::default();
        let ca = RedisTls { ca: Some("/ca.pem".into()), identity: None };
        assert!(check_link("rediss://r:6379", &none, false).is_ok());
        assert!(check_link("rediss+cluster://a:1,b:2", &ca, false).is_ok());
        let err = check_link("redis://r:6379", &none, false).unwrap_err().to_string();
        assert!(err.contains("--insecure") && err.contains("rediss://"), "{err}");
        assert!(check_link("redis://r:6379", &none, true).is_ok());
        assert!(check_link("redis+cluster://a:1", &none, false).is_err());
        let err = check_link("redis://r:6379", &ca, true).unwrap_err().to_string();
        assert!(err.contains("TLS URL"), "{err}");
        assert!(check_link("rediss://r:6379/#insecure", &none, false).is_err());
        let (url, tls) = redis_link(Some(""), Some("/ca.pem".into()), None, false).unwrap();
        assert_eq!((url, tls), (None, RedisTls::default()), "no Redis: the files are ignored");
    }
}
