//! Text side of DeepSeek-VL: the "deepseek" conversation template, tokenization with
//! `<image_placeholder>` expansion, and incremental detokenization for streaming.
//!
//! Used by `dsvl generate` and by the gateway, so the prompt a request becomes is the same
//! whichever way it arrives. Byte-for-byte parity with the reference `VLChatProcessor` is
//! checked against `tests/fixtures/golden/chat.json`.
#![deny(missing_docs)]

mod detokenizer;
mod template;
mod tokenizer;

pub use detokenizer::IncrementalDecoder;
pub use template::{
    render_prompt, render_prompt_continuing, Message, Role, DEFAULT_SYSTEM_PROMPT, IMAGE_TAG,
};
pub use tokenizer::{ChatTokenizer, Prompt, SpecialTokens};

/// Errors of the chat layer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// `tokenizer.json` could not be loaded.
    #[error("cannot load tokenizer: {0}")]
    Tokenizer(String),
    /// A special token the template needs is not in the vocabulary.
    #[error("tokenizer has no `{0}` token")]
    MissingToken(String),
    /// The conversation is malformed.
    #[error("invalid conversation: {0}")]
    Conversation(String),
    /// Encoding or decoding failed.
    #[error("tokenization failed: {0}")]
    Encode(String),
}
