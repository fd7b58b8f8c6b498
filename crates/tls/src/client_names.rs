//! Which peers may call an internal tier: a client certificate must chain to the configured
//! authority (rustls' WebPKI verifier) and, with `--tls-client-names`, also be valid for one of
//! the given names (a DNS subject alternative name, checked like a server name). Every leaf of
//! the cluster comes from one authority, so without names any tier's certificate could call
//! any other; with `--tls-client-names dsvl-gateway` only the gateway's can.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// A client-certificate verifier that accepts, after `inner`'s chain checks, only
/// certificates valid for one of `names`.
#[derive(Debug)]
pub struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl NamedClients {
    /// Wraps `inner`.
    ///
    /// # Errors
    /// A name that is not a valid DNS name or IP address.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, names: &[String]) -> Result<Self, String> {
        let names = names
            .iter()
            .map(|n| ServerName::try_from(n.clone()).map_err(|e| format!("client name {n:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { inner, names })
    }
}

impl ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.names.iter().any(|n| cert.verify_is_valid_for_subject_name(n).is_ok()) {
            Ok(verified)
        } else {
            // Counted with the other failed handshakes by the accept loop.
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
