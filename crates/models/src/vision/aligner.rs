//! The aligner (`MlpProjector`): maps vision features to the language model's embedding width.
//! GELU is exact erf; the hybrid split concatenates [SAM (high), SigLIP (low)] in that order.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{AlignerConfig, ProjectorType};
use crate::linear::Linear;
use crate::ops::gelu_erf;

/// What the aligner consumes.
pub enum AlignerInput<'a> {
    /// One feature stream (`mlp_gelu`, `linear`, `identity`).
    Single(&'a Tensor),
    /// The hybrid tower's (high, low) pair.
    Pair(&'a Tensor, &'a Tensor),
}

/// A loaded aligner.
pub struct Aligner {
    cfg: AlignerConfig,
    /// `high_up_proj`, `low_up_proj` for the hybrid split.
    split: Option<(Linear, Linear)>,
    /// Linears of the `layers` Sequential, with GELU between (and, for the split, before) them.
    layers: Vec<Linear>,
}

impl Aligner {
    /// Loads from `vb` (prefix `aligner`).
    pub fn new(cfg: &AlignerConfig, vb: VarBuilder) -> Result<Self> {
        let (d_in, n) = (cfg.input_dim, cfg.n_embed);
        let lp = vb.pp("layers");
        let (split, layers) = match cfg.projector_type {
            ProjectorType::Identity => (None, vec![]),
            ProjectorType::Linear => (None, vec![crate::linear::linear(d_in, n, vb.pp("layers"))?]),
            ProjectorType::MlpGelu => {
                let mut layers = vec![crate::linear::linear(d_in, n, lp.pp("0"))?];
                for i in 1..cfg.depth {
                    layers.push(crate::linear::linear(n, n, lp.pp(2 * i))?);
                }
                (None, layers)
            }
            ProjectorType::LowHighHybridSplitMlpGelu => {
                let high = crate::linear::linear(d_in, n / 2, vb.pp("high_up_proj"))?;
                let low = crate::linear::linear(d_in, n / 2, vb.pp("low_up_proj"))?;
                let layers = (1..cfg.depth)
                    .map(|i| crate::linear::linear(n, n, lp.pp(2 * i - 1)))
                    .collect::<Result<_>>()?;
                (Some((high, low)), layers)
            }
        };
        Ok(Self { cfg: *cfg, split, layers })
    }

    /// Projects `input` to `[B, T, n_embed]`.
    pub fn forward(&self, input: AlignerInput<'_>) -> Result<Tensor> {
        let (mut x, gelu_first) = match (input, &self.split) {
            (AlignerInput::Pair(high, low), Some((hp, lp))) => {
                (Tensor::cat(&[hp.forward(high)?, lp.forward(low)?], 2)?, true)
            }
            (AlignerInput::Single(x), None) => (x.clone(), false),
            _ => candle_core::bail!(
                "aligner {:?} got the wrong number of feature streams",
                self.cfg.projector_type
            ),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            if gelu_first || i > 0 {
                x = gelu_erf(&x)?;
            }
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}
