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

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not decided yet (read `DSVL_CUDA_FUSED` on first use), 1: on, 2: off.
static FUSED_CUDA_KERNELS: AtomicU8 = AtomicU8::new(0);

/// Whether CUDA builds run the decoder's fused kernels (RoPE into the KV pool, SiLU-mul, paged
/// attention) rather than candle op chains. On unless `DSVL_CUDA_FUSED=0`; the op chains stay for
/// comparisons on one GPU and as a fallback. No effect on the CPU or in builds without `cuda`.
pub fn fused_cuda_kernels() -> bool {
    match FUSED_CUDA_KERNELS.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("DSVL_CUDA_FUSED").map_or(true, |v| v.trim() != "0");
            FUSED_CUDA_KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides `DSVL_CUDA_FUSED` for this process (benchmarks compare both paths in one run).
pub fn set_fused_cuda_kernels(on: bool) {
    FUSED_CUDA_KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}
