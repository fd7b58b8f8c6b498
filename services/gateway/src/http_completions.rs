//! `POST /v1/completions`, OpenAI's (legacy) text completions: the prompt is used as given, a
//! string (tokenized with BOS, no chat template) or token ids, one prompt per request; the
//! reply streams as `text_completion` chunks or comes as one object. Sampling, stop strings,
//! structured outputs and limits are the chat endpoint's. Fields follow the same rule as chat:
//! honoured, a documented no-op, or a 400 naming them (`services/OPENAI_FIELDS.md`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use dsvl_core::sampling::SamplingRequest;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;

use crate::chat::request_span;
use crate::error::GatewayError;
use crate::http::{constraint_of, error_response, logit_bias, read_request, unique_id};
use crate::http_reply::{sse, whole, Reply, Shape};
use crate::prepare::{ChatInput, OutputOptions, RawPrompt};
use crate::tenancy::Tenant;
use crate::Gateway;

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    Batches(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct LegacyRequest {
    #[serde(default)]
    model: String,
    prompt: PromptField,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    best_of: Option<u32>,
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    min_p: Option<f32>,
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    ignore_eos: bool,
    response_format: Option<Value>,
    guided_regex: Option<String>,
    guided_grammar: Option<String>,
    #[serde(default)]
    return_prompt_token_ids: bool,
}

/// A legacy completions body as [`completions`] reads it (for the fuzz targets).
pub(crate) fn legacy_input(body: &[u8]) -> Result<ChatInput, GatewayError> {
    let check = crate::openai_fields::check_completions;
    let far = std::time::Duration::from_secs(60);
    let (_, r) =
        read_request::<LegacyRequest>(&HeaderMap::new(), body, far, Instant::now(), check)?;
    Ok(to_input(r)?.0)
}

fn to_input(r: LegacyRequest) -> Result<(ChatInput, bool, bool), GatewayError> {
    let invalid = |m: &str| GatewayError::InvalidArgument(m.to_string());
    let n = r.n.unwrap_or(1);
    if r.best_of.is_some_and(|b| b != n) {
        return Err(invalid("best_of must be absent or equal to n (no server-side ranking)"));
    }
    if r.echo.unwrap_or(false) {
        return Err(invalid("echo is not supported"));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("suffix is not supported (no fill-in-the-middle)"));
    }
    let raw = match r.prompt {
        PromptField::Text(t) => RawPrompt::Text(t),
        PromptField::Ids(ids) => RawPrompt::Ids(ids),
        PromptField::Texts(mut v) if v.len() == 1 => RawPrompt::Text(v.remove(0)),
        PromptField::Batches(mut v) if v.len() == 1 => RawPrompt::Ids(v.remove(0)),
        _ => return Err(invalid("prompt: one prompt per request (a string or token ids)")),
    };
    let include_usage = r
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let input = ChatInput {
        model: r.model,
        messages: Vec::new(),
        sampling: SamplingRequest {
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            repetition_penalty: r.repetition_penalty,
            seed: r.seed,
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            min_p: r.min_p,
            logit_bias: logit_bias(r.logit_bias)?,
        },
        stop: match r.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        // OpenAI's default for completions is 16 new tokens.
        max_tokens: Some(r.max_tokens.unwrap_or(16)),
        return_prompt_token_ids: r.return_prompt_token_ids,
        constraint: constraint_of(&r.response_format, &r.guided_regex, &r.guided_grammar)?,
        raw_prompt: Some(raw),
        // The legacy `logprobs: k` asks for the chosen token's and the k most likely ones'.
        output: OutputOptions {
            n,
            logprobs: r.logprobs.is_some(),
            top_logprobs: r.logprobs.unwrap_or(0),
            stop_token_ids: r.stop_token_ids.unwrap_or_default(),
            ignore_eos: r.ignore_eos,
        },
    };
    Ok((input, r.stream, include_usage))
}

/// The handler.
pub async fn completions(
    State(gw): State<Arc<Gateway>>,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let timeout = gw.config.request_timeout;
    let check = crate::openai_fields::check_completions;
    let read = crate::http_errors::require_json(&headers)
        .and_then(|()| read_request::<LegacyRequest>(&headers, &body, timeout, started, check));
    let (deadline, (input, streaming, include_usage)) =
        match read.and_then(|(d, r)| Ok((d, to_input(r)?))) {
            Ok(x) => x,
            Err(e) => return error_response(&e),
        };
    let span = request_span(&gw.model.name, &input, &tenant.id, "http");
    let reply = Reply::new(&input, Shape::Text, gw.model.name.clone(), unique_id("cmpl-"));
    let rx = match gw.chat(&tenant, input, deadline, "http").instrument(span).await {
        Ok(rx) => rx,
        Err(e) => return error_response(&e),
    };
    if streaming {
        sse(rx, reply, include_usage).into_response()
    } else {
        whole(rx, reply).await
    }
}
