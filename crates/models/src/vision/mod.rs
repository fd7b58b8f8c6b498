//! The vision half of DeepSeek-VL: tower(s) plus aligner, `[B, 3, S, S]` pixels in `[0, 1]` to
//! `[B, 576, H]` image embeddings.
//!
//! Hybrid (VL-7B): SAM-B runs on the full 1024² image; SigLIP-L on an antialiased bilinear
//! resize to 384² of the same un-normalised pixels (computed in f32, cast back); each tower
//! normalises its own input; the aligner concatenates [SAM, SigLIP]. SigLIP-only (VL-1.3B):
//! the processor output goes straight into SigLIP.

mod aligner;
pub mod config;
mod conv;
mod fused_attention;
mod layers;
mod relpos_softmax;
mod sam;
mod siglip;

use candle_core::{DType, Device, Tensor};

pub use aligner::{Aligner, AlignerInput};
pub use config::{AlignerConfig, ComponentConfig, TowerConfig};
pub use sam::{SamEncoder, SamOutput};
pub use siglip::SiglipEncoder;

use crate::checkpoint::{build_model, Checkpoint, ProgressFn};
use crate::preprocess::{PreprocessConfig, Preprocessed};
use crate::ModelError;
use layers::{resize_2d, ResampleMatrix};

// One tower per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Tower {
    Hybrid { sam: SamEncoder, siglip: SiglipEncoder, low_resize: ResampleMatrix },
    Siglip(SiglipEncoder),
}

/// Intermediate tensors of a forward pass, for parity tests and debugging.
pub struct VisionTrace {
    /// Input of the SigLIP branch before its normalisation (hybrid only).
    pub low_res_pixels: Option<Tensor>,
    /// SAM intermediates (hybrid only).
    pub sam: Option<SamOutput>,
    /// SigLIP output `[B, 576, width]`.
    pub siglip: Tensor,
}

/// A loaded vision tower and aligner.
pub struct VisionEncoder {
    tower: Tower,
    aligner: Aligner,
    tower_config: TowerConfig,
    aligner_config: AlignerConfig,
    preprocess: PreprocessConfig,
    dtype: DType,
    device: Device,
}

/// Prefixes of the vision weights inside a DeepSeek-VL checkpoint.
pub use dsvl_checkpoint::VISION_PREFIXES;

impl VisionEncoder {
    /// Loads the vision tower and aligner of `ckpt` in `dtype` on `device`.
    ///
    /// # Errors
    /// A text-only checkpoint, unsupported tower variants, missing or mis-shaped tensors.
    pub fn load(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        progress: Option<ProgressFn>,
    ) -> Result<Self, ModelError> {
        let vision: ComponentConfig = ckpt.sub_config("vision_config")?.ok_or_else(|| {
            ModelError::unsupported(format!(
                "{} has no vision_config: it is a text-only model",
                ckpt.source()
            ))
        })?;
        let aligner: ComponentConfig = ckpt.sub_config("aligner_config")?.ok_or_else(|| {
            ModelError::config("config.json", "vision_config without aligner_config")
        })?;
        let tower_config = TowerConfig::resolve(&vision)?;
        let aligner_config = AlignerConfig::resolve(&aligner)?;
        let preprocess = load_preprocess_config(ckpt, &tower_config)?;
        check_dims(&tower_config, &aligner_config)?;

        build_model(ckpt, dtype, device, &VISION_PREFIXES, progress, |vb| {
            Self::new(tower_config, aligner_config, preprocess, vb)
        })
    }

    /// Builds the encoder from explicit configs and a `VarBuilder` rooted at the checkpoint
    /// (tensor names `vision_model.*`, `aligner.*`); used by [`Self::load`] and by benchmarks
    /// that run random weights at real dimensions.
    pub fn new(
        tower_config: TowerConfig,
        aligner_config: AlignerConfig,
        preprocess: PreprocessConfig,
        vb: candle_nn::VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let vm = vb.pp("vision_model");
        let tower = match &tower_config {
            TowerConfig::Hybrid { high, low } => Tower::Hybrid {
                sam: SamEncoder::new(high, vm.pp("vision_tower_high.vision_tower"))?,
                siglip: SiglipEncoder::new(low, vm.pp("vision_tower_low.vision_tower"))?,
                low_resize: ResampleMatrix::bilinear_antialias(
                    high.image_size,
                    low.image_size,
                    &device,
                )?,
            },
            TowerConfig::Siglip(cfg) => {
                Tower::Siglip(SiglipEncoder::new(cfg, vm.pp("vision_tower"))?)
            }
        };
        let aligner = Aligner::new(&aligner_config, vb.pp("aligner"))?;
        Ok(Self {
            tower,
            aligner,
            tower_config,
            aligner_config,
            preprocess,
            dtype: vb.dtype(),
            device,
        })
    }

    /// Side of the square pixel input.
    pub fn image_size(&self) -> usize {
        self.tower_config.image_size()
    }

    /// Embedding width (the language model's hidden size).
    pub fn hidden_size(&self) -> usize {
        self.aligner_config.n_embed
    }

    /// Tokens per image (576 for every released checkpoint).
    pub fn num_tokens(&self) -> usize {
        match &self.tower_config {
            TowerConfig::Hybrid { low, .. } => low.num_tokens(),
            TowerConfig::Siglip(s) => s.num_tokens(),
        }
    }

    /// The checkpoint's preprocessing config.
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// Working dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Stacks preprocessed images into a `[n, 3, S, S]` f32 tensor on the model's device.
    pub fn batch_pixels(&self, images: &[&Preprocessed]) -> Result<Tensor, ModelError> {
        let s = self.image_size();
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            if img.geometry.side != s {
                return Err(ModelError::InvalidInput(format!(
                    "pixel side {} but the model expects {s}",
                    img.geometry.side
                )));
            }
            data.extend_from_slice(&img.pixel_values);
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, s, s), &self.device)?)
    }

    /// Embeds a batch: `[B, 3, S, S]` f32 pixels to `[B, tokens, hidden]` in the working dtype.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.forward_traced(pixels)?.0)
    }

    /// [`Self::forward`] that also returns the intermediates.
    pub fn forward_traced(&self, pixels: &Tensor) -> Result<(Tensor, VisionTrace), ModelError> {
        let s = self.image_size();
        match pixels.dims() {
            [_, 3, h, w] if *h == s && *w == s => {}
            other => {
                return Err(ModelError::InvalidInput(format!(
                    "pixel batch has shape {other:?}, expected [B, 3, {s}, {s}]"
                )))
            }
        }
        let pixels = pixels.to_dtype(self.dtype)?;
        match &self.tower {
            Tower::Hybrid { sam, siglip, low_resize } => {
                let low_res = resize_2d(&pixels, low_resize, low_resize)?;
                let sam_out = sam.forward(&pixels)?;
                let siglip_out = siglip.forward(&low_res)?;
                let emb = self.aligner.forward(AlignerInput::Pair(&sam_out.tokens, &siglip_out))?;
                Ok((
                    emb,
                    VisionTrace {
                        low_res_pixels: Some(low_res),
                        sam: Some(sam_out),
                        siglip: siglip_out,
                    },
                ))
            }
            Tower::Siglip(siglip) => {
                let out = siglip.forward(&pixels)?;
                let emb = self.aligner.forward(AlignerInput::Single(&out))?;
                Ok((emb, VisionTrace { low_res_pixels: None, sam: None, siglip: out }))
            }
        }
    }
}

fn load_preprocess_config(
    ckpt: &Checkpoint,
    tower: &TowerConfig,
) -> Result<PreprocessConfig, ModelError> {
    let bytes = ckpt.read_file("preprocessor_config.json")?.ok_or_else(|| {
        ModelError::config(
            ckpt.source().to_string(),
            "missing preprocessor_config.json (the image processor settings)",
        )
    })?;
    let cfg: PreprocessConfig = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::config("preprocessor_config.json", e.to_string()))?;
    if cfg.image_size as usize != tower.image_size() {
        return Err(ModelError::config(
            "preprocessor_config.json",
            format!(
                "image_size {} but the vision tower takes {}",
                cfg.image_size,
                tower.image_size()
            ),
        ));
    }
    Ok(cfg)
}

fn check_dims(tower: &TowerConfig, aligner: &AlignerConfig) -> Result<(), ModelError> {
    let widths = match tower {
        TowerConfig::Hybrid { high, low } => {
            if high.num_tokens() != low.num_tokens() {
                return Err(ModelError::config(
                    "config.json",
                    format!(
                        "SAM gives {} tokens but SigLIP {}",
                        high.num_tokens(),
                        low.num_tokens()
                    ),
                ));
            }
            vec![high.out_dim(), low.width]
        }
        TowerConfig::Siglip(s) => vec![s.width],
    };
    if let Some(w) = widths.iter().find(|&&w| w != aligner.input_dim) {
        return Err(ModelError::config(
            "config.json",
            format!(
                "aligner input_dim {} does not match a tower output width {w}",
                aligner.input_dim
            ),
        ));
    }
    Ok(())
}
