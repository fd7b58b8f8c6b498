//! The vision and aligner parts of a DeepSeek-VL `config.json`.
//!
//! The released configs name their towers (`model_name`) and the reference looks the sizes up in
//! tables (`SAM_MODEL_CONFIG`, `SigLIP_MODEL_CONFIG`). Explicit dimension keys, when present,
//! override the table entries (the tiny fixture uses them), so any size works without code
//! changes. Raw serde structs mirror the file; `resolve` turns them into runtime configs.

use serde::Deserialize;

use crate::ModelError;

/// `{cls, model_type, params}` as every sub-config of a DeepSeek-VL `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ComponentConfig {
    /// Python class the reference instantiates.
    pub cls: String,
    /// Constructor arguments.
    #[serde(default)]
    pub params: serde_json::Value,
}

/// Arguments of one `CLIPVisionTower` (a branch of the hybrid tower, or the 1.3B tower).
#[derive(Debug, Clone, Deserialize)]
pub struct TowerParams {
    /// Preset name: `sam_b_downsample` or `siglip_large_patch16_384` (or another SigLIP preset).
    pub model_name: String,
    /// Input side in pixels.
    pub image_size: usize,
    /// `CLIPVisionTower`'s default is -2; the released configs set -1.
    #[serde(default = "default_select_layer")]
    pub select_layer: i64,
    /// `same` for every released checkpoint.
    #[serde(default)]
    pub select_feature: Option<String>,
    /// In-model Normalize mean; applied only together with `pixel_std`.
    #[serde(default)]
    pub pixel_mean: Option<[f64; 3]>,
    /// In-model Normalize std.
    #[serde(default)]
    pub pixel_std: Option<[f64; 3]>,
    /// Explicit overrides of the preset table.
    #[serde(default)]
    pub width: Option<usize>,
    /// Number of transformer blocks in the preset (before `select_layer` truncation).
    #[serde(default)]
    pub layers: Option<usize>,
    /// Attention heads.
    #[serde(default)]
    pub heads: Option<usize>,
    /// Patch side in pixels.
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// SigLIP MLP ratio.
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    /// SAM window side for non-global blocks.
    #[serde(default)]
    pub window_size: Option<usize>,
    /// SAM blocks with global attention (0-based).
    #[serde(default)]
    pub global_attn_indexes: Option<Vec<usize>>,
    /// SAM neck channels.
    #[serde(default)]
    pub prompt_embed_dim: Option<usize>,
    /// SAM downsample conv channels.
    #[serde(default)]
    pub downsample_channels: Option<Vec<usize>>,
}

fn default_select_layer() -> i64 {
    -2
}

/// Per-branch input normalisation (`torchvision.transforms.Normalize`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    /// Channel means.
    pub mean: [f64; 3],
    /// Channel standard deviations.
    pub std: [f64; 3],
}

impl TowerParams {
    fn normalize(&self) -> Option<Normalize> {
        match (self.pixel_mean, self.pixel_std) {
            (Some(mean), Some(std)) => Some(Normalize { mean, std }),
            _ => None,
        }
    }

    fn require_same_features(&self) -> Result<(), ModelError> {
        match self.select_feature.as_deref() {
            None | Some("same") => Ok(()),
            Some(other) => Err(ModelError::unsupported(format!(
                "vision tower {}: select_feature `{other}` (only `same` is used by DeepSeek-VL)",
                self.model_name
            ))),
        }
    }
}

/// SAM ViT with the DeepSeek-VL downsample neck (`sam_b_downsample`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamConfig {
    /// Input side (1024).
    pub image_size: usize,
    /// Embedding width (768).
    pub width: usize,
    /// Blocks (12).
    pub layers: usize,
    /// Heads (12).
    pub heads: usize,
    /// Patch side (16).
    pub patch_size: usize,
    /// Window side of non-global blocks (14).
    pub window_size: usize,
    /// Global-attention blocks ([2, 5, 8, 11]).
    pub global_attn_indexes: Vec<usize>,
    /// Neck channels (256).
    pub prompt_embed_dim: usize,
    /// Downsample conv channels ([512, 1024]).
    pub downsample_channels: Vec<usize>,
    /// In-model normalisation.
    pub normalize: Option<Normalize>,
}

impl SamConfig {
    /// Side of the neck resize in the reference (hard-coded 96).
    pub const NECK_RESIZE: usize = 96;

    /// Resolves a tower config against the SAM preset table.
    pub fn resolve(p: &TowerParams) -> Result<Self, ModelError> {
        let (width, layers, heads, global) = match p.model_name.as_str() {
            "sam_b_downsample" => (768, 12, 12, vec![2, 5, 8, 11]),
            other => {
                return Err(ModelError::unsupported(format!(
                    "SAM preset `{other}` (supported: sam_b_downsample)"
                )))
            }
        };
        p.require_same_features()?;
        let cfg = Self {
            image_size: p.image_size,
            width: p.width.unwrap_or(width),
            layers: p.layers.unwrap_or(layers),
            heads: p.heads.unwrap_or(heads),
            patch_size: p.patch_size.unwrap_or(16),
            window_size: p.window_size.unwrap_or(14),
            global_attn_indexes: p.global_attn_indexes.clone().unwrap_or(global),
            prompt_embed_dim: p.prompt_embed_dim.unwrap_or(256),
            downsample_channels: p.downsample_channels.clone().unwrap_or_else(|| vec![512, 1024]),
            normalize: p.normalize(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::unsupported(format!("SAM config: {m}")));
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return bad(format!("width {} is not divisible by heads {}", self.width, self.heads));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.global_attn_indexes.is_empty() {
            return bad("the HD path needs at least one global-attention block".into());
        }
        if let Some(&i) = self.global_attn_indexes.iter().find(|&&i| i >= self.layers) {
            return bad(format!("global block {i} is beyond {} layers", self.layers));
        }
        if self.downsample_channels.is_empty() {
            return bad("downsample_channels is empty".into());
        }
        Ok(())
    }

    /// Output channels (the last downsample's).
    pub fn out_dim(&self) -> usize {
        *self.downsample_channels.last().expect("validated non-empty")
    }

    /// Output tokens: the 96x96 neck resize halved once per downsample conv.
    pub fn num_tokens(&self) -> usize {
        let side = self.downsample_channels.iter().fold(Self::NECK_RESIZE, |s, _| (s - 1) / 2 + 1);
        side * side
    }
}

/// timm VisionTransformer as built by `create_siglip_vit` (no class token, map pool unused).
#[derive(Debug, Clone, PartialEq)]
pub struct SiglipConfig {
    /// Input side (384).
    pub image_size: usize,
    /// Width (1024).
    pub width: usize,
    /// Blocks actually built after `select_layer` truncation.
    pub depth: usize,
    /// Heads (16).
    pub heads: usize,
    /// Patch side (16).
    pub patch_size: usize,
    /// MLP hidden size, `int(width * mlp_ratio)`.
    pub mlp_hidden: usize,
    /// In-model normalisation.
    pub normalize: Option<Normalize>,
}

impl SiglipConfig {
    /// Resolves a tower config against the SigLIP preset table.
    pub fn resolve(p: &TowerParams) -> Result<Self, ModelError> {
        let (width, layers, heads, patch, ratio) = match p.model_name.as_str() {
            "siglip_large_patch16_384" => (1024, 24, 16, 16, 4.0),
            "siglip_so400m_patch14_384" | "siglip_so400m_patch14_224" => (1152, 27, 16, 14, 3.7362),
            other => {
                return Err(ModelError::unsupported(format!(
                    "SigLIP preset `{other}` (supported: siglip_large_patch16_384, siglip_so400m_patch14_384/224)"
                )))
            }
        };
        let width = p.width.unwrap_or(width);
        let layers = p.layers.unwrap_or(layers);
        let mlp_ratio = p.mlp_ratio.unwrap_or(ratio);
        // create_siglip_vit: blocks built = layers + select_layer + 1 for select_layer <= 0.
        let depth = if p.select_layer <= 0 {
            (layers as i64 + p.select_layer + 1).clamp(0, layers as i64) as usize
        } else {
            (p.select_layer as usize).min(layers)
        };
        let cfg = Self {
            image_size: p.image_size,
            width,
            depth,
            heads: p.heads.unwrap_or(heads),
            patch_size: p.patch_size.unwrap_or(patch),
            mlp_hidden: (width as f64 * mlp_ratio) as usize,
            normalize: p.normalize(),
        };
        if cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            return Err(ModelError::unsupported(format!(
                "SigLIP config: width {} not divisible by heads {}",
                cfg.width, cfg.heads
            )));
        }
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(ModelError::unsupported(format!(
                "SigLIP config: image_size {} is not a multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        Ok(cfg)
    }

    /// Patch tokens per image.
    pub fn num_tokens(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
}

/// Which vision tower a checkpoint has.
#[derive(Debug, Clone, PartialEq)]
pub enum TowerConfig {
    /// `HybridVisionTower` (VL-7B): SAM-B on the full image, SigLIP-L on a 384 resize.
    Hybrid {
        /// High-resolution branch.
        high: SamConfig,
        /// Low-resolution branch.
        low: SiglipConfig,
    },
    /// `CLIPVisionTower` with a SigLIP model (VL-1.3B).
    Siglip(SiglipConfig),
}

/// Aligner (`MlpProjector`) variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorType {
    /// No parameters: features pass through.
    Identity,
    /// One linear layer.
    Linear,
    /// Linear, then `depth - 1` x (GELU, Linear): weights at `layers.0, .2, ..`.
    MlpGelu,
    /// `high_up_proj` and `low_up_proj` to `n_embed / 2` each, concatenated [high, low], then
    /// `depth - 1` x (GELU, Linear): weights at `layers.1, .3, ..`.
    LowHighHybridSplitMlpGelu,
}

/// Resolved aligner config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignerConfig {
    /// The variant.
    pub projector_type: ProjectorType,
    /// MLP depth (`depth`, default 1).
    pub depth: usize,
    /// Width of each tower's features.
    pub input_dim: usize,
    /// LLM hidden size.
    pub n_embed: usize,
}

#[derive(Deserialize)]
struct AlignerParams {
    projector_type: String,
    #[serde(default = "default_depth")]
    depth: usize,
    input_dim: usize,
    n_embed: usize,
}

fn default_depth() -> usize {
    1
}

impl AlignerConfig {
    /// Parses `aligner_config`.
    pub fn resolve(c: &ComponentConfig) -> Result<Self, ModelError> {
        let p: AlignerParams = serde_json::from_value(c.params.clone()).map_err(|e| {
            ModelError::config("config.json", format!("aligner_config.params: {e}"))
        })?;
        let projector_type = match p.projector_type.as_str() {
            "identity" => ProjectorType::Identity,
            "linear" => ProjectorType::Linear,
            "mlp_gelu" => ProjectorType::MlpGelu,
            "low_high_hybrid_split_mlp_gelu" => ProjectorType::LowHighHybridSplitMlpGelu,
            other => {
                return Err(ModelError::unsupported(format!("aligner projector_type `{other}`")))
            }
        };
        Ok(Self { projector_type, depth: p.depth, input_dim: p.input_dim, n_embed: p.n_embed })
    }
}

#[derive(Deserialize)]
struct HybridParams {
    high_res_cfg: TowerParams,
    low_res_cfg: TowerParams,
    #[serde(default = "default_concat")]
    concat_type: String,
}

fn default_concat() -> String {
    "tuple".into()
}

impl TowerConfig {
    /// Parses `vision_config`.
    pub fn resolve(c: &ComponentConfig) -> Result<Self, ModelError> {
        let parse_err = |e: serde_json::Error| {
            ModelError::config("config.json", format!("vision_config.params: {e}"))
        };
        match c.cls.as_str() {
            "HybridVisionTower" => {
                let p: HybridParams =
                    serde_json::from_value(c.params.clone()).map_err(parse_err)?;
                if p.concat_type != "tuple" {
                    return Err(ModelError::unsupported(format!(
                        "hybrid concat_type `{}` (only `tuple`)",
                        p.concat_type
                    )));
                }
                Ok(Self::Hybrid {
                    high: SamConfig::resolve(&p.high_res_cfg)?,
                    low: SiglipConfig::resolve(&p.low_res_cfg)?,
                })
            }
            "CLIPVisionTower" => {
                let p: TowerParams = serde_json::from_value(c.params.clone()).map_err(parse_err)?;
                if !p.model_name.starts_with("siglip") {
                    return Err(ModelError::unsupported(format!(
                        "CLIPVisionTower model `{}` (only SigLIP)",
                        p.model_name
                    )));
                }
                Ok(Self::Siglip(SiglipConfig::resolve(&p)?))
            }
            other => Err(ModelError::unsupported(format!("vision tower class `{other}`"))),
        }
    }

    /// Side of the square pixel input the tower expects.
    pub fn image_size(&self) -> usize {
        match self {
            Self::Hybrid { high, .. } => high.image_size,
            Self::Siglip(s) => s.image_size,
        }
    }
}
