//! `tokenizer.json` through the `tokenizers` crate (the same library as the reference's
//! `LlamaTokenizerFast`), with the processor's `<image_placeholder>` expansion.

use tokenizers::{AddedToken, Tokenizer};

use crate::template::IMAGE_TAG;
use crate::ChatError;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

/// Ids the template and generation rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<｜begin▁of▁sentence｜>` (100000 in the real vocabulary).
    pub bos: u32,
    /// `<｜end▁of▁sentence｜>` (100001); also the pad id, as the reference has no pad token.
    pub eos: u32,
    /// `<image_placeholder>` (100015).
    pub image: u32,
}

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// `tokenizer.encode(prompt)` with BOS, one id per placeholder.
    pub ids_before_expansion: Vec<u32>,
    /// Each placeholder replaced by `num_image_tokens` image-token ids.
    pub ids: Vec<u32>,
    /// `[start, end)` of each image's ids in `ids`, in order.
    pub image_spans: Vec<(usize, usize)>,
}

/// The DeepSeek tokenizer plus its special ids.
#[derive(Clone)]
pub struct ChatTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` bytes. Like `VLChatProcessor`, adds `<image_placeholder>` as a
    /// special token when the vocabulary lacks it.
    ///
    /// # Errors
    /// Malformed JSON, or a vocabulary without the BOS/EOS tokens.
    pub fn from_bytes(json: &[u8]) -> Result<Self, ChatError> {
        let mut inner =
            Tokenizer::from_bytes(json).map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        if inner.token_to_id(IMAGE_TAG).is_none() {
            inner
                .add_special_tokens(vec![AddedToken::from(IMAGE_TAG, true)])
                .map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        }
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| ChatError::MissingToken(t.into()));
        let special = SpecialTokens { bos: id(BOS)?, eos: id(EOS)?, image: id(IMAGE_TAG)? };
        Ok(Self { inner, special })
    }

    /// Special token ids.
    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `tokenizer.encode(text, add_special_tokens=add_special)`: with the post-processor's BOS
    /// when `add_special`.
    ///
    /// # Errors
    /// The tokenizer fails on the text.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ChatError> {
        let enc =
            self.inner.encode(text, add_special).map_err(|e| ChatError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token string of `id` (a special token's text, or the vocabulary's piece).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// `tokenizer.encode(text)`: with the post-processor's BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let enc = self.inner.encode(text, true).map_err(|e| ChatError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes a rendered prompt and expands each image placeholder to `num_image_tokens`
    /// ids (the placeholder itself is replaced, not kept).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        num_image_tokens: usize,
    ) -> Result<Prompt, ChatError> {
        let before = self.encode(prompt)?;
        let mut ids = Vec::with_capacity(before.len() + num_image_tokens * 2);
        let mut image_spans = Vec::new();
        for &id in &before {
            if id == self.special.image {
                image_spans.push((ids.len(), ids.len() + num_image_tokens));
                ids.extend(std::iter::repeat_n(id, num_image_tokens));
            } else {
                ids.push(id);
            }
        }
        Ok(Prompt { ids_before_expansion: before, ids, image_spans })
    }

    /// `tokenizer.decode(ids, skip_special_tokens)`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ChatError> {
        self.inner.decode(ids, skip_special).map_err(|e| ChatError::Encode(e.to_string()))
    }

    /// Token strings of `ids` (for tests and debugging).
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| self.inner.id_to_token(i).unwrap_or_default()).collect()
    }
}
