//! The served model as the gateway sees it: tokenizer, chat template inputs and limits, read
//! from the same checkpoint directory the decoder loads (weights are only indexed, not read).

use std::path::Path;

use dsvl_chat::ChatTokenizer;
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::llm::LlmConfig;

/// What the gateway needs to know about the model.
#[derive(Clone)]
pub struct ServedModel {
    /// Name in requests and `ListModels`.
    pub name: String,
    /// Tokenizer with the image placeholder.
    pub tokenizer: ChatTokenizer,
    /// Image tokens per image (`processor_config.json`'s `num_image_tokens`, 576 by default).
    pub image_tokens: usize,
    /// Whether the checkpoint has a vision tower (DeepSeek-VL) or is text-only (DeepSeek LLM).
    pub vision: bool,
    /// Position limit.
    pub max_positions: usize,
}

/// The model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ServedModelError {
    /// Checkpoint or config problem.
    #[error(transparent)]
    Model(#[from] dsvl_models::ModelError),
    /// Tokenizer problem.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] dsvl_chat::ChatError),
    /// Missing or malformed side file.
    #[error("{0}")]
    Files(String),
}

impl ServedModel {
    /// Reads `dir` (or the bundled tiny model).
    ///
    /// # Errors
    /// Unreadable checkpoint, missing `tokenizer.json`, malformed `processor_config.json`.
    pub fn load(dir: Option<&Path>, name: String) -> Result<Self, ServedModelError> {
        let source = dir.map_or(ModelSource::Bundled, |d| ModelSource::Dir(d.to_path_buf()));
        let ckpt = Checkpoint::open(&source)?;
        let json = ckpt
            .read_file("tokenizer.json")?
            .ok_or_else(|| ServedModelError::Files(format!("{source} has no tokenizer.json")))?;
        let tokenizer = ChatTokenizer::from_bytes(&json)?;
        let image_tokens = match ckpt.read_file("processor_config.json")? {
            Some(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .map_err(|e| ServedModelError::Files(format!("processor_config.json: {e}")))?
                .get("num_image_tokens")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(576) as usize,
            None => 576,
        };
        let vision = ckpt.config().get("vision_config").is_some();
        let max_positions = LlmConfig::from_checkpoint(&ckpt)?.max_position_embeddings;
        Ok(Self { name, tokenizer, image_tokens, vision, max_positions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_model_is_a_vision_model() {
        let m = ServedModel::load(None, "tiny".into()).unwrap();
        assert!(m.vision);
        assert!(m.image_tokens > 0 && m.max_positions > 0);
        assert_eq!(
            m.tokenizer.special().image,
            m.tokenizer.encode(dsvl_chat::IMAGE_TAG).unwrap()[1]
        );
    }
}
