//! The DeepSeek LLM decoder (its config, [`LlmConfig`], is read by `dsvl_checkpoint`):
//! tensor-parallel layers, the model and its
//! key/value storage interface.

pub(crate) mod cpu_attention;
mod gather_attention;
pub mod layers;
pub mod model;
pub mod paged_kv;
pub mod runner;
pub mod step;

pub use dsvl_checkpoint::LlmConfig;
pub use layers::Shard;
pub use model::{
    kv_heads_per_rank, splice_image_rows, splice_rows_at, DeepSeekLlm, ImageRows, LogitRows,
    SeqChunk, SeqId,
};
pub use paged_kv::{kv_bytes_per_token, PagedKv, PagedKvConfig};
pub use runner::{ShardRunner, StepPlan};

use candle_core::{DType, Device};

use crate::checkpoint::{build_model, Checkpoint, ProgressFn};
use crate::ModelError;

impl DeepSeekLlm {
    /// Loads `shard` of the decoder of `ckpt` (DeepSeek-VL's `language_model.*` or a plain
    /// DeepSeek LLM checkpoint).
    ///
    /// # Errors
    /// Unsupported configs, a TP degree the model cannot be split by, missing or mis-shaped tensors.
    pub fn load(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        shard: Shard,
        progress: Option<ProgressFn>,
    ) -> Result<Self, ModelError> {
        let cfg = LlmConfig::from_checkpoint(ckpt)?;
        cfg.check_tensor_parallel(shard.world)?;
        let prefix = if cfg.prefix.is_empty() { "" } else { cfg.prefix.as_str() };
        let prefixes: Vec<&str> =
            if prefix.is_empty() { vec!["model.", "lm_head."] } else { vec![prefix] };
        build_model(ckpt, dtype, device, &prefixes, progress, |vb| {
            DeepSeekLlm::new(&cfg, shard, vb)
        })
    }
}
