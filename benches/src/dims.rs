//! Model dimension presets of the benchmarks: `vl-7b` (DeepSeek-VL-7B, the production target),
//! `vl-1.3b` (the CPU decoder benchmarks' default) and `tiny` (the bundled test checkpoint's
//! dimensions, for smoke runs such as `scripts/gpu-check --small`). Every preset comes from a
//! config compiled into the binary, so a benchmark binary copied to another machine (a GPU host
//! without this repository's build tree) needs no file at run time.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;
use dsvl_models::llm::LlmConfig;
use dsvl_models::vision::config::{AlignerConfig, ComponentConfig, TowerConfig};
use dsvl_models::vision::VisionEncoder;
use serde_json::{json, Value};

use crate::random;

/// `config.json` of deepseek-ai/deepseek-vl-7b-chat as released (towers named by preset).
const VL7B_CONFIG: &[u8] = include_bytes!("../configs/deepseek-vl-7b-chat.json");
/// `config.json` of the bundled tiny checkpoint (explicit small dimensions).
const TINY_CONFIG: &[u8] = include_bytes!("../../assets/tiny-dsvl/config.json");
/// The image processor's config (identical for every DeepSeek-VL size).
const PREPROCESSOR_CONFIG: &[u8] =
    include_bytes!("../../assets/tiny-dsvl/preprocessor_config.json");

/// Which model dimensions a benchmark builds (always with random weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dims {
    /// DeepSeek-VL-7B: SAM-B + SigLIP-L hybrid tower, aligner to 4096; LM 30 x 4096, MHA.
    #[value(name = "vl-7b")]
    Vl7b,
    /// DeepSeek-VL-1.3B's language model: 24 x 2048, MHA (no vision preset).
    #[value(name = "vl-1.3b")]
    Vl13b,
    /// The bundled tiny checkpoint's dimensions (vision and LM).
    Tiny,
}

impl Dims {
    /// The preset's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vl7b => "vl-7b",
            Self::Vl13b => "vl-1.3b",
            Self::Tiny => "tiny",
        }
    }

    /// The preset's `config.json` content (VL-1.3B: its `language_config` only).
    ///
    /// # Errors
    /// Never for the built-in presets (a malformed preset would be a bug).
    pub fn raw_config(self) -> Result<Value> {
        Ok(match self {
            Self::Vl7b => serde_json::from_slice(VL7B_CONFIG)?,
            Self::Tiny => serde_json::from_slice(TINY_CONFIG)?,
            Self::Vl13b => json!({"language_config": {
                "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400,
                "max_position_embeddings": 16384}}),
        })
    }

    /// The vision tower and aligner configs.
    ///
    /// # Errors
    /// `vl-1.3b` (only its language model is a preset here).
    pub fn vision(self) -> Result<(TowerConfig, AlignerConfig)> {
        let config = self.raw_config()?;
        if config.get("vision_config").is_none() {
            bail!("no vision preset for {} (use vl-7b or tiny)", self.name());
        }
        Self::vision_of(&config)
    }

    /// The vision tower and aligner configs of a `config.json`.
    ///
    /// # Errors
    /// Missing or unsupported vision or aligner configs.
    pub fn vision_of(config: &Value) -> Result<(TowerConfig, AlignerConfig)> {
        let tower = TowerConfig::resolve(&serde_json::from_value::<ComponentConfig>(
            config["vision_config"].clone(),
        )?)?;
        let aligner = AlignerConfig::resolve(&serde_json::from_value::<ComponentConfig>(
            config["aligner_config"].clone(),
        )?)?;
        Ok((tower, aligner))
    }

    /// The vision tower + aligner with random weights.
    ///
    /// # Errors
    /// No vision preset, or the device cannot hold it.
    pub fn vision_encoder(self, dtype: DType, device: &Device) -> Result<VisionEncoder> {
        let (tower, aligner) = self.vision()?;
        let pre_cfg = serde_json::from_slice(PREPROCESSOR_CONFIG)?;
        Ok(VisionEncoder::new(tower, aligner, pre_cfg, random::var_builder(dtype, device))?)
    }

    /// The language model's config (`LlamaConfig` defaults fill what the file leaves out, as
    /// for the released VL-7B config).
    ///
    /// # Errors
    /// Never for the built-in presets (a malformed preset would be a bug).
    pub fn lm_config(self) -> Result<LlmConfig> {
        Ok(LlmConfig::from_json(self.raw_config()?["language_config"].clone(), "")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_to_the_published_dimensions() -> Result<()> {
        let lm = Dims::Vl7b.lm_config()?;
        assert_eq!(
            (lm.num_layers, lm.hidden_size, lm.intermediate_size, lm.num_heads, lm.vocab_size),
            (30, 4096, 11008, 32, 102400)
        );
        assert_eq!(Dims::Vl13b.lm_config()?.hidden_size, 2048);
        assert_eq!(Dims::Tiny.lm_config()?.hidden_size, 128);
        assert!(matches!(Dims::Vl7b.vision()?.0, TowerConfig::Hybrid { .. }));
        assert!(Dims::Vl13b.vision().is_err());
        Ok(())
    }
}
