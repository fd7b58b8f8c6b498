//! What a forward pass costs, counted from the model config, and what the GPU could do at
//! best: FLOPs per image of the vision tower + aligner (for MFU) and bytes a decode step must
//! move (for the share of the HBM roofline). A multiply-add counts as 2 FLOPs; only matmuls,
//! convolutions and attention products are counted (norms, activations, resizes and softmax
//! are a fraction of a percent at these sizes).

use dsvl_models::llm::{kv_bytes_per_token, LlmConfig};
use dsvl_models::vision::config::{
    AlignerConfig, ProjectorType, SamConfig, SiglipConfig, TowerConfig,
};

/// H200 dense bf16 matmul throughput, measured (not the 989 TFLOP/s datasheet figure):
/// `/work/shared/design/GPU.md`.
pub const H200_BF16_FLOPS: f64 = 790e12;
/// H200 HBM3e bandwidth (datasheet).
pub const H200_HBM_BYTES_PER_S: f64 = 4.8e12;

/// A ViT block of width `w` and MLP hidden `mlp`: attention over `attn_tokens` tokens (SAM's
/// window blocks include their zero padding) in groups of `span` (the whole image, or one
/// window), the MLP over `tokens`.
fn vit_block(attn_tokens: f64, tokens: f64, w: f64, mlp: f64, span: f64) -> f64 {
    let projections = 2.0 * attn_tokens * 4.0 * w * w; // qkv and proj
    let products = 4.0 * attn_tokens * span * w; // q kᵀ and p v
    let mlp = 2.0 * tokens * 2.0 * w * mlp;
    projections + products + mlp
}

fn sam_flops(c: &SamConfig) -> f64 {
    let grid = (c.image_size / c.patch_size) as f64;
    let tokens = grid * grid;
    let w = c.width as f64;
    let patch = 2.0 * tokens * 3.0 * (c.patch_size * c.patch_size) as f64 * w;
    // Window blocks pad the grid to a multiple of the window and attend within each window.
    let win = c.window_size as f64;
    let padded = (grid / win).ceil() * win;
    let blocks: f64 = (0..c.layers)
        .map(|i| {
            if c.global_attn_indexes.contains(&i) {
                vit_block(tokens, tokens, w, 4.0 * w, tokens)
            } else {
                vit_block(padded * padded, tokens, w, 4.0 * w, win * win)
            }
        })
        .sum();
    // Two necks (main and HD): 1x1 conv width -> P, 3x3 conv P -> P; then per path the
    // stride-2 3x3 downsamples from the 96x96 resize.
    let p = c.prompt_embed_dim as f64;
    let neck = 2.0 * tokens * (w * p + 9.0 * p * p);
    let (mut side, mut ch, mut down) = (SamConfig::NECK_RESIZE as f64, p, 0.0);
    for &out in &c.downsample_channels {
        side = ((side - 1.0) / 2.0).floor() + 1.0;
        down += 2.0 * side * side * 9.0 * ch * out as f64;
        ch = out as f64;
    }
    patch + blocks + 2.0 * (neck + down)
}

fn siglip_flops(c: &SiglipConfig) -> f64 {
    let tokens = c.num_tokens() as f64;
    let w = c.width as f64;
    let patch = 2.0 * tokens * 3.0 * (c.patch_size * c.patch_size) as f64 * w;
    patch + c.depth as f64 * vit_block(tokens, tokens, w, c.mlp_hidden as f64, tokens)
}

fn aligner_flops(a: &AlignerConfig, tokens: f64) -> f64 {
    let (i, n) = (a.input_dim as f64, a.n_embed as f64);
    let first = match a.projector_type {
        ProjectorType::Identity => return 0.0,
        ProjectorType::Linear | ProjectorType::MlpGelu => 2.0 * tokens * i * n,
        // high and low features each projected to n / 2.
        ProjectorType::LowHighHybridSplitMlpGelu => 2.0 * 2.0 * tokens * i * n / 2.0,
    };
    let rest = match a.projector_type {
        ProjectorType::Linear => 0.0,
        _ => a.depth.saturating_sub(1) as f64 * 2.0 * tokens * n * n,
    };
    first + rest
}

/// FLOPs of one image through the tower and the aligner: 1.40 TFLOP at VL-7B dimensions
/// (GPU.md's ≈ 1.2 counts the linear layers only; the attention products of SAM's four global
/// blocks over 4,096 tokens add 0.2).
pub fn vision_flops_per_image(tower: &TowerConfig, aligner: &AlignerConfig) -> f64 {
    match tower {
        TowerConfig::Hybrid { high, low } => {
            sam_flops(high) + siglip_flops(low) + aligner_flops(aligner, low.num_tokens() as f64)
        }
        TowerConfig::Siglip(s) => siglip_flops(s) + aligner_flops(aligner, s.num_tokens() as f64),
    }
}

/// Weights a decode step streams: every layer's projections and norms, the final norm and the
/// LM head (the embedding table is only gathered, one row per sequence).
pub fn decoder_weight_params(cfg: &LlmConfig) -> f64 {
    let h = cfg.hidden_size as f64;
    let q = (cfg.num_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as f64;
    let layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * cfg.intermediate_size as f64 + 2.0 * h;
    cfg.num_layers as f64 * layer + h + cfg.vocab_size as f64 * h
}

/// Bytes of KV cache one token occupies across the whole model, at `dtype_bytes` per element.
pub fn kv_bytes_per_token_all(cfg: &LlmConfig, dtype: candle_core::DType) -> f64 {
    kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype) as f64
}

/// FLOPs of one token that attends to `context` positions.
pub fn decoder_flops_per_token(cfg: &LlmConfig, context: f64) -> f64 {
    let attention = 4.0 * cfg.num_layers as f64 * (cfg.num_heads * cfg.head_dim) as f64 * context;
    2.0 * decoder_weight_params(cfg) + attention
}

/// Peak figures of the device a benchmark runs on (H200 on CUDA); `None` on the CPU, where no
/// roofline is recorded for the shared build machine.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// Dense matmul FLOP/s in the working dtype; `None` for f32 (no tensor-core rate to
    /// compare with: MFU is reported for 16-bit dtypes only).
    pub flops: Option<f64>,
    /// Memory bandwidth, bytes/s.
    pub bytes_per_s: f64,
}

impl Peak {
    /// The H200 figures for a CUDA device, `None` for the CPU.
    pub fn for_device(cuda: bool, dtype: candle_core::DType) -> Option<Self> {
        cuda.then(|| Self {
            flops: (dtype != candle_core::DType::F32).then_some(H200_BF16_FLOPS),
            bytes_per_s: H200_HBM_BYTES_PER_S,
        })
    }

    /// Model FLOP utilisation of `flops_per_s`.
    pub fn mfu(peak: Option<Self>, flops_per_s: f64) -> Option<f64> {
        peak.and_then(|p| p.flops).map(|f| flops_per_s / f)
    }

    /// Share of the memory roofline of `bytes_per_s`.
    pub fn hbm_share(peak: Option<Self>, bytes_per_s: f64) -> Option<f64> {
        peak.map(|p| bytes_per_s / p.bytes_per_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dims::Dims;

    /// GPU.md's ≈ 1.2 TFLOP per image at VL-7B dimensions, plus the attention products.
    #[test]
    fn vl7b_image_is_about_1_4_tflop() -> anyhow::Result<()> {
        let (tower, aligner) = Dims::Vl7b.vision()?;
        let tflop = vision_flops_per_image(&tower, &aligner) / 1e12;
        println!("VL-7B vision tower + aligner: {tflop:.3} TFLOP per image");
        assert!((1.35..1.45).contains(&tflop), "{tflop}");
        Ok(())
    }

    /// VL-7B: 6.9 G parameters in all, 6.5 G streamed per decode step (13.0 GB in bf16).
    #[test]
    fn vl7b_decode_streams_13_gb_in_bf16() -> anyhow::Result<()> {
        let cfg = Dims::Vl7b.lm_config()?;
        let gb = decoder_weight_params(&cfg) * 2.0 / 1e9;
        assert!((12.8..13.2).contains(&gb), "{gb}");
        Ok(())
    }
}
