//! The served facts of a checkpoint: what the gateway, the decoder, the vision tier and the CLI
//! need to know about a model beyond its weights, read by one function with one error
//! behaviour.
//!
//! | fact | source | when absent | when malformed |
//! |---|---|---|---|
//! | tokenizer | `tokenizer.json` | error | error |
//! | language model (positions, vocab, width) | `config.json` (`language_config` or top level) | error | error |
//! | vision tower | `vision_config` in `config.json` | text-only model | error (when loading the tower) |
//! | image tokens per image | `processor_config.json` `num_image_tokens` | 576 (the reference's default) | error |
//! | vision fingerprint | vision + aligner configs, `preprocessor_config.json`, vision weights | none | - |

use dsvl_chat::ChatTokenizer;

use crate::checkpoint::parse_json;
use crate::{Checkpoint, CheckpointError, LlmConfig};

/// Image tokens per image when `processor_config.json` does not say (the reference
/// `VLChatProcessor`'s default; every released checkpoint uses it).
pub const DEFAULT_IMAGE_TOKENS: usize = 576;

/// Tensor name prefixes of the vision tower and the aligner.
pub const VISION_PREFIXES: [&str; 2] = ["vision_model.", "aligner."];

/// Whether [`ServedFacts::read`] hashes the vision weights (about a second per GiB; only the
/// tiers that check embeddings against the model need it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fingerprint {
    /// Compute the vision fingerprint.
    Compute,
    /// Leave it out.
    Skip,
}

/// What a vision-language checkpoint adds.
#[derive(Debug, Clone)]
pub struct VisionFacts {
    /// Embedding rows per image.
    pub image_tokens: usize,
    /// Token id of the image placeholder positions.
    pub image_token_id: u32,
    /// [`vision_fingerprint`], when asked for.
    pub fingerprint: Option<String>,
}

/// Everything a binary needs to serve a checkpoint, besides the weights.
#[derive(Clone)]
pub struct ServedFacts {
    /// The tokenizer with the chat template's special tokens.
    pub tokenizer: ChatTokenizer,
    /// The language model's dimensions (positions, vocabulary, width).
    pub llm: LlmConfig,
    /// Present for DeepSeek-VL, absent for text-only DeepSeek LLM checkpoints.
    pub vision: Option<VisionFacts>,
}

impl ServedFacts {
    /// Reads the facts of `ckpt` (see the module table for each source and error rule).
    ///
    /// # Errors
    /// A missing or malformed tokenizer or config, a malformed `processor_config.json`.
    pub fn read(ckpt: &Checkpoint, fingerprint: Fingerprint) -> Result<Self, CheckpointError> {
        let json = ckpt.read_file("tokenizer.json")?.ok_or_else(|| {
            CheckpointError::config(ckpt.source().to_string(), "has no tokenizer.json")
        })?;
        let tokenizer = ChatTokenizer::from_bytes(&json)
            .map_err(|e| CheckpointError::config("tokenizer.json", e.to_string()))?;
        let llm = LlmConfig::from_checkpoint(ckpt)?;
        let vision = if ckpt.config().get("vision_config").is_some_and(|v| !v.is_null()) {
            Some(VisionFacts {
                image_tokens: image_tokens(ckpt)?,
                image_token_id: tokenizer.special().image,
                fingerprint: match fingerprint {
                    Fingerprint::Compute => Some(vision_fingerprint(ckpt)?),
                    Fingerprint::Skip => None,
                },
            })
        } else {
            None
        };
        Ok(Self { tokenizer, llm, vision })
    }

    /// Largest prompt + generation length.
    pub fn max_positions(&self) -> usize {
        self.llm.max_position_embeddings
    }

    /// Embedding rows per image (0 for a text-only model).
    pub fn image_tokens(&self) -> usize {
        self.vision.as_ref().map_or(0, |v| v.image_tokens)
    }
}

/// `processor_config.json`'s `num_image_tokens`; [`DEFAULT_IMAGE_TOKENS`] when the file or
/// the key is absent.
fn image_tokens(ckpt: &Checkpoint) -> Result<usize, CheckpointError> {
    const FILE: &str = "processor_config.json";
    let Some(bytes) = ckpt.read_file(FILE)? else { return Ok(DEFAULT_IMAGE_TOKENS) };
    match parse_json(FILE, &bytes)?.get("num_image_tokens") {
        None | Some(serde_json::Value::Null) => Ok(DEFAULT_IMAGE_TOKENS),
        Some(v) => {
            v.as_u64().filter(|&n| n > 0).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                CheckpointError::config(
                    FILE,
                    format!("num_image_tokens {v} is not a positive integer"),
                )
            })
        }
    }
}

/// Identifies the vision tower + aligner of `ckpt`: BLAKE3 over the vision, aligner and
/// preprocessor configs and every `vision_model.*` / `aligner.*` tensor (names, shapes,
/// bytes). Part of every embedding cache key, so a new checkpoint revision never serves
/// embeddings of the old one. Hex, 32 digits.
///
/// # Errors
/// `preprocessor_config.json` exists but cannot be read.
pub fn vision_fingerprint(ckpt: &Checkpoint) -> Result<String, CheckpointError> {
    let mut h = blake3::Hasher::new();
    for key in ["vision_config", "aligner_config"] {
        let v = ckpt.config().get(key).map(|v| v.to_string()).unwrap_or_default();
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    let pre = ckpt.read_file("preprocessor_config.json")?.unwrap_or_default();
    h.update(&(pre.len() as u64).to_le_bytes());
    h.update(&pre);
    h.update(ckpt.digest_tensors(&VISION_PREFIXES).as_bytes());
    Ok(h.finalize().to_hex()[..32].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelSource;

    #[test]
    fn bundled_model_facts() {
        let ckpt = Checkpoint::open(&ModelSource::Bundled).unwrap();
        let f = ServedFacts::read(&ckpt, Fingerprint::Compute).unwrap();
        let v = f.vision.as_ref().expect("the bundled model is a vision model");
        assert!(v.image_tokens > 0 && f.max_positions() > 0);
        assert_eq!(v.image_token_id, f.tokenizer.encode(dsvl_chat::IMAGE_TAG).unwrap()[1]);
        assert_eq!(v.fingerprint.as_deref().map(str::len), Some(32));
        assert!(ServedFacts::read(&ckpt, Fingerprint::Skip)
            .unwrap()
            .vision
            .unwrap()
            .fingerprint
            .is_none());
    }

    /// A copy of the bundled model with `edit` applied to its directory.
    fn variant(edit: impl FnOnce(&std::path::Path)) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in crate::bundled::FILES {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        edit(dir.path());
        let ckpt = Checkpoint::open(&ModelSource::Dir(dir.path().to_path_buf())).unwrap();
        (dir, ckpt)
    }

    #[test]
    fn processor_config_rules() {
        let (_d, ckpt) =
            variant(|p| std::fs::remove_file(p.join("processor_config.json")).unwrap());
        let f = ServedFacts::read(&ckpt, Fingerprint::Skip).unwrap();
        assert_eq!(f.image_tokens(), DEFAULT_IMAGE_TOKENS);
        let (_d, ckpt) =
            variant(|p| std::fs::write(p.join("processor_config.json"), "{nope").unwrap());
        let e = ServedFacts::read(&ckpt, Fingerprint::Skip).err().unwrap().to_string();
        assert!(e.contains("processor_config.json"), "{e}");
        let (_d, ckpt) = variant(|p| {
            std::fs::write(p.join("processor_config.json"), r#"{"num_image_tokens": "many"}"#)
                .unwrap()
        });
        let e = ServedFacts::read(&ckpt, Fingerprint::Skip).err().unwrap().to_string();
        assert!(e.contains("num_image_tokens"), "{e}");
        let (_d, ckpt) = variant(|p| std::fs::remove_file(p.join("tokenizer.json")).unwrap());
        let e = ServedFacts::read(&ckpt, Fingerprint::Skip).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
