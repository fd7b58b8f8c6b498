//! TLS and mutual TLS for every gRPC and HTTP hop of the cluster.
//!
//! - [`files`]: rustls server and client configurations from PEM files (a certificate chain,
//!   its key, and the certificate authority that peers must be signed by);
//! - [`client_names`]: which clients an internal tier accepts (`--tls-client-names`);
//! - [`reload`]: a configuration rebuilt when its files change, as cert-manager rotates them in
//!   place; connections made after the change use the new files, open ones keep theirs;
//! - [`incoming`]: the stream of accepted connections for tonic servers, TLS or plain text,
//!   bounded in number, each with a time limit for its first bytes and handshake, run
//!   concurrently so a slow client cannot hold up the others;
//! - [`connector`]: tonic channels over TLS that verify the peer for the name the tier was
//!   configured with (not the address a headless service resolved to);
//! - [`dev_ca`]: a throwaway certificate authority for `dsvl up` and tests.
//!
//! One crypto provider (ring) for every TLS user, so the build needs no cmake.

pub mod args;
pub mod client_names;
pub mod connector;
pub mod dev_ca;
pub mod files;
pub mod incoming;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;

pub use args::{watch_client, watch_server, RedisTlsArgs, ServerTlsArgs, UpstreamTlsArgs};
pub use connector::{channel_to, lazy_channel, server_name};
pub use dev_ca::DevCa;
pub use files::{client_config, server_config, ClientFiles, ServerFiles};
pub use incoming::{accept, connections, Conn, ConnectionLimits};
pub use reload::Reloading;

/// ALPN for gRPC (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the material (a key that does not match its certificate, ...).
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate could not be made ([`DevCa`]) or a name is unusable.
    #[error("TLS: {0}")]
    Other(String),
}

/// The crypto provider of every configuration here.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
