//! cert-manager's `Certificate` and `Issuer` (apiVersion `cert-manager.io/v1`), as far as these
//! manifests use them.
//!
//! The strict validator has no schema for cert-manager's CRDs, so these types are the schema:
//! every field the manifests may use is listed, and an unknown one (a misspelled `dnsName`, a
//! field cert-manager does not have) fails deserialisation and is reported like any invalid
//! object. Issuer kinds other than `selfSigned` and `ca` are kept opaque.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// The apiVersion of both kinds.
pub const API_VERSION: &str = "cert-manager.io/v1";

/// `cert-manager.io/v1/Certificate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Certificate {
    /// `cert-manager.io/v1`.
    pub api_version: String,
    /// `Certificate`.
    pub kind: String,
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: CertificateSpec,
}

/// What to issue and where to keep it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateSpec {
    /// The Secret cert-manager writes (`tls.crt`, `tls.key`, `ca.crt`).
    pub secret_name: String,
    /// Subject common name.
    pub common_name: Option<String>,
    /// DNS subject alternative names (what peers verify).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Lifetime (`2160h`).
    pub duration: Option<String>,
    /// Renewal lead time.
    pub renew_before: Option<String>,
    /// A certificate authority.
    #[serde(rename = "isCA")]
    pub is_ca: Option<bool>,
    /// Key parameters.
    pub private_key: Option<PrivateKey>,
    /// Key usages (`server auth`, `client auth`, ...).
    #[serde(default)]
    pub usages: Vec<String>,
    /// The issuer.
    pub issuer_ref: IssuerRef,
    /// IP subject alternative names.
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    /// URI subject alternative names.
    #[serde(default)]
    pub uris: Vec<String>,
    /// Email subject alternative names.
    #[serde(default)]
    pub email_addresses: Vec<String>,
    /// Subject fields (kept opaque).
    pub subject: Option<serde_json::Value>,
    /// Labels and annotations of the Secret (kept opaque).
    pub secret_template: Option<serde_json::Value>,
    /// Old CertificateRequests kept.
    pub revision_history_limit: Option<u32>,
}

/// Key parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrivateKey {
    /// `RSA`, `ECDSA` or `Ed25519`.
    pub algorithm: Option<String>,
    /// Bits (RSA) or curve size (ECDSA).
    pub size: Option<u32>,
    /// `Always`: a new key on every renewal.
    pub rotation_policy: Option<String>,
    /// `PKCS1` or `PKCS8`.
    pub encoding: Option<String>,
}

/// Which issuer signs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerRef {
    /// Its name.
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    pub kind: Option<String>,
    /// `cert-manager.io` (default).
    pub group: Option<String>,
}

/// `cert-manager.io/v1/Issuer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Issuer {
    /// `cert-manager.io/v1`.
    pub api_version: String,
    /// `Issuer`.
    pub kind: String,
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec: exactly one kind of issuer.
    pub spec: IssuerSpec,
}

/// The kind of issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerSpec {
    /// Self-signed (bootstraps the root).
    pub self_signed: Option<serde_json::Value>,
    /// Signs with the key pair in a Secret.
    pub ca: Option<CaIssuer>,
    /// ACME (kept opaque).
    pub acme: Option<serde_json::Value>,
    /// Vault (kept opaque).
    pub vault: Option<serde_json::Value>,
}

/// A CA issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaIssuer {
    /// The Secret holding the CA's certificate and key.
    pub secret_name: String,
}
