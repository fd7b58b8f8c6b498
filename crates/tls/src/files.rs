//! rustls configurations from PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{provider, TlsError};

/// A server's certificate chain and key, and with mutual TLS the certificate authority its
/// clients must present a certificate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificate authorities of the clients (`None`: clients are not authenticated).
    pub client_ca: Option<PathBuf>,
    /// Names a client certificate must be valid for, one of them (empty: any certificate from
    /// `client_ca`).
    pub client_names: Vec<String>,
}

impl ServerFiles {
    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// The certificate authority a client trusts, and its own certificate for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// PEM certificate authorities the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain and key (`None`: no client certificate).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.clone()];
        if let Some((cert, key)) = &self.identity {
            p.extend([cert.clone(), key.clone()]);
        }
        p
    }
}

fn file_error(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File { path: path.to_path_buf(), why: why.to_string() }
}

/// The certificates of a PEM file (at least one).
///
/// # Errors
/// The file cannot be read or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in it"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

/// A server configuration offering `alpn`; with `client_ca`, clients must present a
/// certificate that chains to it.
///
/// # Errors
/// Unreadable files, or material rustls refuses.
pub fn server_config(files: &ServerFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| file_error(ca, e))?;
            if files.client_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                let named = crate::client_names::NamedClients::new(verifier, &files.client_names)
                    .map_err(TlsError::Other)?;
                builder.with_client_cert_verifier(Arc::new(named))
            }
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration offering `alpn`, trusting `files.ca` only, presenting
/// `files.identity` when given.
///
/// # Errors
/// Unreadable files, or material rustls refuses.
pub fn client_config(files: &ClientFiles, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca)?);
    let mut config = match &files.identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
