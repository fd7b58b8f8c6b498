//! vLLM's request extensions that both HTTP endpoints take (flattened into their bodies):
//! output limits (`min_tokens`, `include_stop_str_in_output`, `allowed_token_ids`,
//! `bad_words`), prompt scoring and truncation (`prompt_logprobs`, `truncate_prompt_tokens`),
//! the request's own prefix-cache salt, id and scheduling priority (`cache_salt`,
//! `request_id`, `priority`), and the switches that only one value of can be honoured here
//! (`skip_special_tokens` true, `use_beam_search` false): another value is a 400 saying why,
//! never silently ignored.

use serde::Deserialize;

use crate::error::GatewayError;
use crate::prepare::invalid;
use crate::prepare::ChatInput;

/// The fields, as a body carries them.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct VllmExtras {
    min_tokens: Option<u32>,
    #[serde(default)]
    include_stop_str_in_output: bool,
    prompt_logprobs: Option<i64>,
    allowed_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    bad_words: Vec<String>,
    truncate_prompt_tokens: Option<i64>,
    cache_salt: Option<String>,
    request_id: Option<String>,
    priority: Option<i64>,
    skip_special_tokens: Option<bool>,
    use_beam_search: Option<bool>,
}

/// Longest `request_id`, in bytes.
const MAX_REQUEST_ID_BYTES: usize = 128;

impl VllmExtras {
    /// Puts the fields into `input` (`stream`: whether the reply streams), refusing the values
    /// that cannot be honoured; returns the caller's `request_id`, if any, for the reply's id.
    pub(crate) fn apply(
        self,
        input: &mut ChatInput,
        stream: bool,
    ) -> Result<Option<String>, GatewayError> {
        let priority = match self.priority.map(i32::try_from) {
            None => 0,
            Some(Ok(p)) => p,
            Some(Err(_)) => return Err(invalid("priority must fit in 32 bits")),
        };
        if self.skip_special_tokens == Some(false) {
            return Err(invalid(
                "skip_special_tokens must be true: special tokens are always left out of the text",
            ));
        }
        if self.use_beam_search == Some(true) {
            return Err(invalid("use_beam_search is not supported (no beam search)"));
        }
        if let Some(id) = &self.request_id {
            if id.is_empty()
                || id.len() > MAX_REQUEST_ID_BYTES
                || !id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "request_id must be 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters"
                )));
            }
        }
        let output = &mut input.output;
        output.min_tokens = self.min_tokens.unwrap_or(0);
        output.include_stop_str = self.include_stop_str_in_output;
        output.prompt_logprobs = prompt_logprobs(self.prompt_logprobs, stream)?;
        output.allowed_token_ids = self.allowed_token_ids;
        output.bad_words = self.bad_words;
        input.truncate_prompt_tokens = match self.truncate_prompt_tokens {
            None => None,
            Some(k) if k < 1 => {
                return Err(invalid(format!(
                    "truncate_prompt_tokens is {k}; it must be at least 1"
                )))
            }
            Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        };
        input.cache_salt = self.cache_salt;
        input.priority = priority;
        Ok(self.request_id)
    }
}

/// vLLM's `prompt_logprobs`: a count of alternatives (the gateway's limits follow in
/// [`crate::prepare`]), not with streaming (as vLLM: the figures come with the whole reply).
fn prompt_logprobs(asked: Option<i64>, stream: bool) -> Result<Option<u32>, GatewayError> {
    match asked {
        None => Ok(None),
        Some(_) if stream => Err(invalid("prompt_logprobs are not available when stream is true")),
        Some(k) if k < 0 => Err(invalid(format!(
            "prompt_logprobs is {k}: every token of the vocabulary (-1) is not supported; at most 20"
        ))),
        Some(k) => Ok(Some(u32::try_from(k).unwrap_or(u32::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn apply(body: serde_json::Value, stream: bool) -> Result<(ChatInput, Option<String>), String> {
        let extras: VllmExtras = serde_json::from_value(body).map_err(|e| e.to_string())?;
        let mut input = ChatInput::default();
        let id = extras.apply(&mut input, stream).map_err(|e| e.to_string())?;
        Ok((input, id))
    }

    #[test]
    fn fields_land_in_the_input() {
        let (input, id) = apply(
            json!({"min_tokens": 2, "include_stop_str_in_output": true, "prompt_logprobs": 3,
                   "allowed_token_ids": [4, 5], "bad_words": ["x"], "truncate_prompt_tokens": 9,
                   "cache_salt": "s", "request_id": "abc-1", "priority": -3,
                   "skip_special_tokens": true, "use_beam_search": false}),
            false,
        )
        .unwrap();
        let o = &input.output;
        assert_eq!((o.min_tokens, o.include_stop_str, o.prompt_logprobs), (2, true, Some(3)));
        assert_eq!(
            (o.allowed_token_ids.clone(), o.bad_words.clone()),
            (Some(vec![4, 5]), vec!["x".into()])
        );
        assert_eq!(
            (input.truncate_prompt_tokens, input.cache_salt.as_deref()),
            (Some(9), Some("s"))
        );
        assert_eq!((id.as_deref(), input.priority), (Some("abc-1"), -3));
    }

    #[test]
    fn values_that_cannot_be_honoured_are_refused() {
        for (body, stream, why) in [
            (json!({"priority": 1u64 << 40}), false, "priority must fit in 32 bits"),
            (json!({"skip_special_tokens": false}), false, "skip_special_tokens must be true"),
            (json!({"use_beam_search": true}), false, "no beam search"),
            (json!({"prompt_logprobs": 1}), true, "not available when stream is true"),
            (json!({"prompt_logprobs": -1}), false, "(-1) is not supported"),
            (json!({"truncate_prompt_tokens": 0}), false, "at least 1"),
            (json!({"request_id": "a b"}), false, "printable ASCII"),
            (json!({"request_id": ""}), false, "printable ASCII"),
        ] {
            let e = apply(body.clone(), stream).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }
}
