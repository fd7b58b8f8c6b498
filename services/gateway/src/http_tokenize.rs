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

fn check_model(gw: &Gateway, model: &str) -> Result<(), GatewayError> {
    if model.is_empty() || model == gw.model.name {
        return Ok(());
    }
    Err(GatewayError::InvalidArgument(format!(
        "model `{model}` is not served here; this gateway serves `{}`",
        gw.model.name
    )))
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
    let read = crate::http_errors::require_json(&headers).and_then(|()| {
        let timeout = gw.config.request_timeout;
        read_request::<TokenizeRequest>(
            &headers,
            &body,
            timeout,
            std::time::Instant::now(),
            no_check,
        )
    });
    let r = match read.and_then(|(_, r)| check_model(&gw, &r.model).map(|()| r)) {
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
    let encoded =
        tokio::task::spawn_blocking(move || tok.encode_with(&r.prompt, r.add_special_tokens)).await;
    match encoded {
        Ok(Ok(tokens)) => Json(json!({
            "count": tokens.len(),
            "max_model_len": max_positions,
            "tokens": tokens,
            "token_strs": null,
        }))
        .into_response(),
        Ok(Err(e)) => error_response(&GatewayError::Internal(format!("tokenizer: {e}"))),
        Err(e) => error_response(&GatewayError::Internal(format!("tokenizer task: {e}"))),
    }
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let read = crate::http_errors::require_json(&headers).and_then(|()| {
        let timeout = gw.config.request_timeout;
        read_request::<DetokenizeRequest>(
            &headers,
            &body,
            timeout,
            std::time::Instant::now(),
            no_check,
        )
    });
    let r = match read.and_then(|(_, r)| check_model(&gw, &r.model).map(|()| r)) {
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
    match tokio::task::spawn_blocking(move || tok.decode(&r.tokens, false)).await {
        Ok(Ok(text)) => Json(json!({"prompt": text})).into_response(),
        Ok(Err(e)) => error_response(&GatewayError::Internal(format!("tokenizer: {e}"))),
        Err(e) => error_response(&GatewayError::Internal(format!("tokenizer task: {e}"))),
    }
}
