//! vLLM's tokenizer endpoints, which clients use to count tokens and evaluation harnesses use
//! as a remote tokenizer (lm-evaluation-harness's `tokenizer_backend=remote` probes
//! `/tokenizer_info` for `eos_token` and `/tokenize` for `tokens`):
//!
//! - `GET /tokenizer_info`: the special tokens' texts and the context length;
//! - `POST /tokenize` `{"prompt": text, "add_special_tokens": bool (default true)}`: the ids
//!   the completions endpoint would use for the text (BOS first when special tokens are added),
//!   `count` and `max_model_len`;
//! - `POST /detokenize` `{"tokens": [ids]}`: the text, special tokens kept.
//!
//! Like every API route they sit behind the API key. Unknown fields are a 400 naming them; a
//! `model` other than the served one is a 400; text is bounded as a completion prompt's is
//! (32 bytes per position), ids by the vocabulary. Tokenizing runs off the async threads.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::GatewayError;
use crate::http::{error_response, read_request};
use crate::prepare::TEXT_BYTES_PER_POSITION;
use crate::Gateway;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: String,
    prompt: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    #[serde(default)]
    model: String,
    tokens: Vec<u32>,
}

fn yes() -> bool {
    true
}

fn no_check(_: &Value) -> Result<(), String> {
    Ok(())
}

/// A body with a `model` field.
trait ForModel {
    fn model(&self) -> &str;
}

impl ForModel for TokenizeRequest {
    fn model(&self) -> &str {
        &self.model
    }
}

impl ForModel for DetokenizeRequest {
    fn model(&self) -> &str {
        &self.model
    }
}

/// The request `T` in `body`: JSON, no unknown field, for the served model (or none named).
fn read<T: serde::de::DeserializeOwned + ForModel>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, GatewayError> {
    crate::http_errors::require_json(headers)?;
    let started = std::time::Instant::now();
    let (_, r) = read_request::<T>(headers, body, gw.config.request_timeout, started, no_check)?;
    let model = r.model();
    if model.is_empty() || model == gw.model.name {
        return Ok(r);
    }
    Err(GatewayError::InvalidArgument(format!(
        "model `{model}` is not served here; this gateway serves `{}`",
        gw.model.name
    )))
}

/// `work` on a blocking thread (tokenizing is CPU work), its answer as JSON.
async fn off_thread<E: std::fmt::Display + Send + 'static>(
    work: impl FnOnce() -> Result<Value, E> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error_response(&GatewayError::Internal(format!("tokenizer: {e}"))),
        Err(e) => error_response(&GatewayError::Internal(format!("tokenizer task: {e}"))),
    }
}

/// `GET /tokenizer_info`.
pub(crate) async fn tokenizer_info(State(gw): State<Arc<Gateway>>) -> Response {
    let tok = &gw.model.tokenizer;
    let special = tok.special();
    Json(json!({
        "bos_token": tok.id_to_token(special.bos),
        "eos_token": tok.id_to_token(special.eos),
        // The reference has no pad token; generation pads with EOS.
        "pad_token": tok.id_to_token(special.eos),
        "model_max_length": gw.model.max_positions,
        "vocab_size": tok.vocab_size(),
        // The DeepSeek-VL conversation template is applied by the gateway, not as Jinja.
        "chat_template": null,
    }))
    .into_response()
}

/// `POST /tokenize`.
pub(crate) async fn tokenize(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r: TokenizeRequest = match read(&gw, &headers, &body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let max_positions = gw.model.max_positions;
    let budget = max_positions * TEXT_BYTES_PER_POSITION;
    if r.prompt.len() > budget {
        let e = GatewayError::InvalidArgument(format!(
            "the text is {} bytes; a prompt of at most {max_positions} tokens cannot hold more than {budget}",
            r.prompt.len()
        ));
        return error_response(&e);
    }
    let tok = gw.model.tokenizer.clone();
    off_thread(move || {
        let tokens = tok.encode_with(&r.prompt, r.add_special_tokens)?;
        Ok::<_, dsvl_chat::ChatError>(json!({
            "count": tokens.len(),
            "max_model_len": max_positions,
            "tokens": tokens,
            "token_strs": null,
        }))
    })
    .await
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r: DetokenizeRequest = match read(&gw, &headers, &body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let vocab = gw.model.tokenizer.vocab_size();
    if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        let e = GatewayError::InvalidArgument(format!(
            "token id {bad} is not in the vocabulary of {vocab} tokens"
        ));
        return error_response(&e);
    }
    if r.tokens.len() > gw.model.max_positions {
        let e = GatewayError::InvalidArgument(format!(
            "{} tokens; at most the model's {} positions",
            r.tokens.len(),
            gw.model.max_positions
        ));
        return error_response(&e);
    }
    let tok = gw.model.tokenizer.clone();
    off_thread(move || tok.decode(&r.tokens, false).map(|text| json!({"prompt": text}))).await
}
