//! DeepSeek-VL models on candle.
//!
//! * [`preprocess`]: image decoding and the reference's preprocessing, bit-exact.
//! * [`checkpoint`]: reading the original Hugging Face checkpoint layout (config with nested
//!   vision / aligner / language configs, single or sharded safetensors) with typed errors.
//! * [`vision`]: the SAM-B and SigLIP-L towers, the hybrid tower and the aligner, giving
//!   `[B, 576, H]` image embeddings from `[B, 3, S, S]` pixels.
//! * [`llm`]: the DeepSeek LLM decoder with tensor parallelism over a [`dsvl_parallel::Communicator`].
//!
//! Every module mirrors the reference's op order where it matters for parity; each trap (a place
//! where a plain port would differ from the reference) is documented where it applies.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod cpu_caches;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
mod error;
pub mod isa;
pub mod kernels;
pub mod linear;
pub mod llm;
pub mod ops;
pub mod preprocess;
pub mod vision;

pub use error::ModelError;
