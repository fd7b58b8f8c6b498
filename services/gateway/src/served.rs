//! The served model as the gateway sees it: tokenizer, chat template inputs and limits, read
//! from the same checkpoint directory the decoder loads (weights are only indexed, not read;
//! no tensor library is linked).

use std::path::Path;

use dsvl_chat::ChatTokenizer;
use dsvl_checkpoint::{Checkpoint, CheckpointError, Fingerprint, ModelSource, ServedFacts};

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

impl ServedModel {
    /// Reads `dir` (or the bundled tiny model) through [`ServedFacts::read`], the one reader
    /// every binary uses; the vision weights are not hashed here (the vision tier reports its
    /// fingerprint).
    ///
    /// # Errors
    /// As [`ServedFacts::read`].
    pub fn load(dir: Option<&Path>, name: String) -> Result<Self, CheckpointError> {
        let source = dir.map_or(ModelSource::Bundled, |d| ModelSource::Dir(d.to_path_buf()));
        let facts = ServedFacts::read(&Checkpoint::open(&source)?, Fingerprint::Skip)?;
        Ok(Self {
            name,
            image_tokens: facts.image_tokens(),
            vision: facts.vision.is_some(),
            max_positions: facts.max_positions(),
            tokenizer: facts.tokenizer,
        })
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
