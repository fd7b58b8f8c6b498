//! Decoding on top of the model crate: token selection ([`sampler`]) and the generation loop
//! ([`generate`]) shared by `dsvl generate` and the decoder service, and tensor-parallel process
//! groups ([`group`]).
#![deny(missing_docs)]

pub mod generate;
pub mod group;
pub mod sampler;

pub use generate::{generate, FinishReason, GenerationOutput, GenerationRequest, StepExecutor};
pub use sampler::{SamplingParams, Rng};
