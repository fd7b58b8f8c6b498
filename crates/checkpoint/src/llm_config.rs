//! The language model's config: `language_config` inside a DeepSeek-VL `config.json`, or the
//! whole `config.json` of a DeepSeek LLM checkpoint, with the `transformers` `LlamaConfig`
//! defaults the reference relies on when keys are missing: the released
//! VL-7B `language_config` only sets layers, vocab and max positions.

use serde::Deserialize;

use crate::{Checkpoint, CheckpointError};

/// Raw keys with `LlamaConfig` (transformers 4.38) defaults.
#[derive(Debug, Clone, Deserialize)]
struct RawLlamaConfig {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_intermediate")]
    intermediate_size: usize,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_intermediate() -> usize {
    11008
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_max_pos() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    10000.0
}

/// Resolved decoder dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    /// Embedding / lm_head rows (all kept, including padding rows).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` for GQA, e.g. 67B).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Longest sequence the model was built for (sizes caches and bounds prompts).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether lm_head shares the embedding matrix (false for every DeepSeek checkpoint).
    pub tie_word_embeddings: bool,
    /// Tensor name prefix: `language_model.` inside DeepSeek-VL, empty for DeepSeek LLM.
    pub prefix: String,
}

impl LlmConfig {
    /// Reads the decoder config of a checkpoint: `language_config` when present (DeepSeek-VL),
    /// otherwise the top-level config (DeepSeek LLM).
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self, CheckpointError> {
        let (raw, prefix) = match ckpt.config().get("language_config") {
            Some(v) => (v.clone(), "language_model."),
            None => (ckpt.config().clone(), ""),
        };
        Self::from_json(raw, prefix)
    }

    /// Resolves a raw Llama config; `prefix` is where its tensors live.
    pub fn from_json(raw: serde_json::Value, prefix: &str) -> Result<Self, CheckpointError> {
        let r: RawLlamaConfig = serde_json::from_value(raw)
            .map_err(|e| CheckpointError::config("config.json", format!("language config: {e}")))?;
        let bad = |m: String| Err(CheckpointError::Unsupported(format!("language model: {m}")));
        if r.hidden_act != "silu" {
            return bad(format!("hidden_act `{}` (DeepSeek LLM uses silu)", r.hidden_act));
        }
        if r.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is set (DeepSeek LLM uses plain RoPE)".into());
        }
        if r.attention_bias || r.mlp_bias {
            return bad("biases in attention or MLP (DeepSeek LLM has none)".into());
        }
        let kv = r.num_key_value_heads.unwrap_or(r.num_attention_heads);
        if r.num_attention_heads == 0 || kv == 0 || !r.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "{} heads are not a multiple of {kv} key/value heads",
                r.num_attention_heads
            ));
        }
        let head_dim = r.head_dim.unwrap_or(r.hidden_size / r.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return bad(format!("odd head_dim {head_dim}"));
        }
        Ok(Self {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_layers: r.num_hidden_layers,
            num_heads: r.num_attention_heads,
            num_kv_heads: kv,
            head_dim,
            max_position_embeddings: r.max_position_embeddings,
            rms_norm_eps: r.rms_norm_eps,
            rope_theta: r.rope_theta,
            tie_word_embeddings: r.tie_word_embeddings,
            prefix: prefix.to_string(),
        })
    }

    /// Checks that `world` ranks can split this model (heads, KV heads, MLP and vocab).
    pub fn check_tensor_parallel(&self, world: usize) -> Result<(), CheckpointError> {
        let fail = |what: String| {
            Err(CheckpointError::Unsupported(format!("tensor parallelism {world}: {what}")))
        };
        if world == 0 {
            return fail("needs at least one rank".into());
        }
        if !self.num_heads.is_multiple_of(world) {
            return fail(format!("{} attention heads are not divisible", self.num_heads));
        }
        if !self.num_kv_heads.is_multiple_of(world) && !world.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "{} key/value heads neither divide nor are divided by it",
                self.num_kv_heads
            ));
        }
        if !self.intermediate_size.is_multiple_of(world) {
            return fail(format!("intermediate size {} is not divisible", self.intermediate_size));
        }
        if !self.vocab_size.is_multiple_of(world) {
            return fail(format!("vocabulary {} is not divisible", self.vocab_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released VL-7B `language_config` relies on LlamaConfig defaults for everything but
    /// layers, vocab and max positions.
    #[test]
    fn vl7b_language_config_takes_llama_defaults() {
        let raw = serde_json::json!({"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 102400, "max_position_embeddings": 16384});
        let c = LlmConfig::from_json(raw, "language_model.").unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim),
            (4096, 11008, 32, 32, 128)
        );
        assert_eq!((c.num_layers, c.vocab_size, c.max_position_embeddings), (30, 102400, 16384));
        assert_eq!((c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings), (1e-6, 10000.0, false));
    }

    /// 67B: GQA with 8 KV heads; TP 16 replicates KV heads, TP 3 is refused.
    #[test]
    fn gqa_tensor_parallel_rules() {
        let raw = serde_json::json!({"hidden_size": 8192, "num_hidden_layers": 95, "num_attention_heads": 64,
            "num_key_value_heads": 8, "intermediate_size": 22016, "vocab_size": 102400, "max_position_embeddings": 4096});
        let c = LlmConfig::from_json(raw, "").unwrap();
        for t in [1, 2, 4, 8, 16] {
            c.check_tensor_parallel(t).unwrap();
        }
        assert!(c.check_tensor_parallel(3).is_err());
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        let raw = serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}});
        assert!(LlmConfig::from_json(raw, "").unwrap_err().to_string().contains("rope_scaling"));
    }
}
