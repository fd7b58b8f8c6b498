//! A throwaway certificate authority, for `dsvl up` and tests; never for production, where
//! cert-manager issues the certificates (`deploy/`).
//!
//! Leaf certificates are valid both as server and as client certificates, so one leaf per
//! service serves its listener and authenticates its outgoing calls.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{ClientFiles, ServerFiles, TlsError};

fn other(e: impl ToString) -> TlsError {
    TlsError::Other(e.to_string())
}

/// A certificate authority made on the spot.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf's files as written by [`DevCa::write_leaf`].
#[derive(Debug, Clone)]
pub struct LeafFiles {
    /// The authority's certificate.
    pub ca: PathBuf,
    /// The leaf's certificate.
    pub cert: PathBuf,
    /// The leaf's key (mode 0600).
    pub key: PathBuf,
}

impl LeafFiles {
    /// As a server requiring client certificates from the same authority.
    pub fn server(&self) -> ServerFiles {
        ServerFiles {
            client_names: Vec::new(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: Some(self.ca.clone()),
        }
    }

    /// As a client presenting this leaf.
    pub fn client(&self) -> ClientFiles {
        ClientFiles { ca: self.ca.clone(), identity: Some((self.cert.clone(), self.key.clone())) }
    }
}

impl DevCa {
    /// A new authority named `name`.
    ///
    /// # Errors
    /// Key generation fails.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(other)?;
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, key).map_err(other)? })
    }

    /// The authority's certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and key (PEM) for `names` (DNS names and IP addresses), valid for
    /// server and client authentication.
    ///
    /// # Errors
    /// A name rcgen refuses.
    pub fn issue(&self, names: &[&str]) -> Result<(String, String), TlsError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).map_err(other)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(other)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(other)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `ca.pem`, `<leaf>.pem` and `<leaf>.key` (mode 0600) into `dir`.
    ///
    /// # Errors
    /// The files cannot be written.
    pub fn write_leaf(
        &self,
        dir: &Path,
        leaf: &str,
        names: &[&str],
    ) -> Result<LeafFiles, TlsError> {
        let io = |path: &Path, e: std::io::Error| TlsError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let (cert_pem, key_pem) = self.issue(names)?;
        let files = LeafFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{leaf}.pem")),
            key: dir.join(format!("{leaf}.key")),
        };
        std::fs::write(&files.ca, self.ca_pem()).map_err(|e| io(&files.ca, e))?;
        std::fs::write(&files.cert, cert_pem).map_err(|e| io(&files.cert, e))?;
        write_private(&files.key, key_pem.as_bytes()).map_err(|e| io(&files.key, e))?;
        Ok(files)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
