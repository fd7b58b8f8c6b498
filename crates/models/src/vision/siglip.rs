//! SigLIP ViT as DeepSeek-VL builds it (`siglip_vit.py`, timm `VisionTransformer`): conv patch
//! embedding with bias, learned absolute positions, pre-norm blocks with fused qkv (with bias)
//! and exact-erf GELU, and the final LayerNorm, which IS applied. No class token; the attention
//! pooling head is in the checkpoint but the reference never runs it (`ignore_head=True`), so it
//! is not loaded.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::SiglipConfig;
use super::fused_attention;
use super::layers::{normalize, PatchEmbed};
use crate::linear::Linear;
use crate::ops::{gelu_erf, softmax_last_dim};

const EPS: f64 = 1e-6;

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(cfg: &SiglipConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.width;
        Ok(Self {
            norm1: candle_nn::layer_norm(d, EPS, vb.pp("norm1"))?,
            qkv: crate::linear::linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: crate::linear::linear(d, d, vb.pp("attn.proj"))?,
            norm2: candle_nn::layer_norm(d, EPS, vb.pp("norm2"))?,
            fc1: crate::linear::linear(d, cfg.mlp_hidden, vb.pp("mlp.fc1"))?,
            fc2: crate::linear::linear(cfg.mlp_hidden, d, vb.pp("mlp.fc2"))?,
            heads: cfg.heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv =
            self.qkv.forward(x)?.reshape((b, n, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?;
        let scale = (hd as f64).powf(-0.5);
        let out = if fused_attention::is_supported(x) {
            fused_attention::fused_attention(
                &qkv.contiguous()?.reshape((3, b * self.heads, n, hd))?,
                None,
                scale,
            )?
            .reshape((b, self.heads, n, hd))?
        } else {
            let (q, k, v) =
                (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
            softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?.matmul(&v)?
        };
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let m = self.fc2.forward(&gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + m
    }
}

/// The SigLIP tower: `[B, 3, S, S]` pixels to `[B, (S/p)^2, width]` features.
pub struct SiglipEncoder {
    cfg: SiglipConfig,
    patch_embed: PatchEmbed,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl SiglipEncoder {
    /// Loads the tower from `vb` (prefix `...vision_tower_low.vision_tower` or
    /// `vision_model.vision_tower`).
    pub fn new(cfg: &SiglipConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(cfg.width, cfg.patch_size, vb.pp("patch_embed"))?,
            pos_embed: vb.get((1, cfg.num_tokens(), cfg.width), "pos_embed")?,
            blocks,
            norm: candle_nn::layer_norm(cfg.width, EPS, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// Runs the tower on pixels (normalised here when the config carries `pixel_mean/std`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = match &self.cfg.normalize {
            Some(n) => normalize(pixels, n)?,
            None => pixels.clone(),
        };
        let b = x.dim(0)?;
        let mut x =
            self.patch_embed.forward(&x)?.reshape((b, self.cfg.num_tokens(), self.cfg.width))?;
        x = x.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&x)
    }
}
