//! Decoding on top of the model crate: token selection ([`sampler`], [`select`]) and the generation loop
//! ([`generate`]) shared by `dsvl generate` and the decoder service, and tensor-parallel process
//! groups ([`group`]); for the decoder service, continuous batching over paged KV blocks
//! ([`scheduler`], [`blocks`]) on a dedicated model thread ([`engine`]).
#![deny(missing_docs)]

pub mod blocks;
pub mod collectives;
pub mod constraint;
mod draw;
pub mod engine;
pub mod generate;
pub mod group;
mod pace;
mod prompt_logprobs;
mod request_metrics;
pub mod sampler;
pub mod scheduler;
#[cfg(test)]
mod scheduler_tests;
pub mod select;
pub mod token_filter;

pub use generate::{generate, FinishReason, GenerationOutput, GenerationRequest, StepExecutor};
pub use prompt_logprobs::PromptLogprob;
pub use sampler::{Rng, SamplingParams};
pub use token_filter::TokenFilter;
