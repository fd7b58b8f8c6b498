//! Streaming detokenization that only ever emits complete UTF-8 text.
//!
//! Byte-level BPE splits multi-byte characters across tokens, so decoding token by token would
//! emit U+FFFD halves. We keep a window `[prefix, read)` of already-emitted tokens as context,
//! decode `[prefix, len)`, and emit the new suffix only when it does not end in U+FFFD (an
//! incomplete character); otherwise we wait for the next token. [`IncrementalDecoder::finish`]
//! flushes what is left, so the concatenation of all pieces equals decoding the whole sequence.

use crate::{ChatError, ChatTokenizer};

/// Per-sequence state of the streaming decoder.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// A decoder that drops special tokens when `skip_special` (as the reference's final
    /// `decode(..., skip_special_tokens=True)` does).
    pub fn new(skip_special: bool) -> Self {
        Self { skip_special, ..Self::default() }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &ChatTokenizer, id: u32) -> Result<Option<String>, ChatError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let delta = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Emits whatever is still held back (possibly with U+FFFD for an incomplete character).
    pub fn finish(&mut self, tok: &ChatTokenizer) -> Result<Option<String>, ChatError> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = tok.decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now.strip_prefix(before.as_str()).map(str::to_string).filter(|s| !s.is_empty()))
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
