//! A model directory in the original Hugging Face layout, read without a tensor library.
//!
//! * [`Checkpoint`]: `config.json`, side files, and the safetensors weights indexed by a
//!   memory map (names, dtypes, shapes, bytes); the bundled tiny model behaves like a
//!   directory ([`ModelSource::Bundled`]).
//! * [`LlmConfig`]: the language model's config with the `transformers` defaults the
//!   reference relies on.
//! * [`ServedFacts`]: what every binary needs to serve a checkpoint (tokenizer, image tokens
//!   per image, vision tower or not, positions, the vision fingerprint), read by one function
//!   with one error behaviour.
//!
//! The model crate (`dsvl_models`) builds candle tensors from a [`Checkpoint`]; the gateway
//! only needs this crate, so it links no tensor library.
#![deny(missing_docs)]

mod bundled;
mod checkpoint;
mod error;
mod facts;
mod llm_config;

pub use checkpoint::{default_model_name, Checkpoint, ModelSource};
pub use error::CheckpointError;
pub use facts::{
    vision_fingerprint, Fingerprint, ServedFacts, DEFAULT_IMAGE_TOKENS, VISION_PREFIXES,
};
pub use llm_config::LlmConfig;
