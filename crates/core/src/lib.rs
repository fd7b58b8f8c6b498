//! Shared vocabulary of the dsvl workspace.
//!
//! Everything here is small, dependency-light and used by more than one tier: which device and
//! dtype a model runs on ([`DeviceSpec`], [`WeightDType`]), the limits applied to untrusted images
//! ([`ImageLimits`]), token selection ([`sampling`]: one type, defaults and validator for every
//! API), the content-addressed embedding cache key and its sealed codec, the cluster [`secret`], the KV block hashes of
//! prefix caching ([`prefix`]), a bad service flag
//! ([`ConfigError`]) and the model-thread [`watchdog`] behind the liveness probes. Keeping these
//! out of the model crate lets the gateway (which links no tensor library) agree with the vision and
//! decoder tiers on names, limits and keys.
#![deny(missing_docs)]

pub mod allocator;
pub mod cache_key;
pub mod codec;
mod device;
pub mod embedding;
pub mod failpoint;
mod limits;
pub mod prefix;
pub mod progress;
pub mod sampling;
pub mod secret;
pub mod watchdog;

pub use device::{DeviceSpec, ParseError, WeightDType};
pub use embedding::{Embedding, EmbeddingDType};
pub use limits::{ImageLimits, PILLOW_MAX_IMAGE_PIXELS};
pub use sampling::{InvalidSampling, SamplingParams, SamplingRequest};
pub use secret::{ClusterSecret, EmbeddingSeal};

/// A service flag whose value makes no sense (the same error for every service's config).
#[derive(Debug, thiserror::Error)]
#[error("invalid --{field}: {reason}")]
pub struct ConfigError {
    /// The flag.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}
