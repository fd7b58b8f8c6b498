//! The gateway's parsers of untrusted input, reachable without a network, for the fuzz targets
//! (`crates/fuzz`): each runs exactly the code a request runs, from bytes to the prepared
//! prompt or to a typed error. None may panic, hang or allocate past the limits whatever the
//! bytes.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use dsvl_proto::v1::ChatRequest;

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::fetch::{decode_data_url, RemoteImage};
use crate::prepare::{prepare, Prepared};
use crate::served::ServedModel;

/// A `POST /v1/chat/completions` body through validation, the template and the tokenizer.
///
/// # Errors
/// What the handler would answer with.
pub fn openai_chat(
    config: &GatewayConfig,
    model: &ServedModel,
    body: &[u8],
) -> Result<Prepared, GatewayError> {
    let (input, _tools) = crate::http::chat_input(body)?;
    prepare(config, model, input)
}

/// A `POST /v1/completions` body through validation and the tokenizer, one request per prompt.
///
/// # Errors
/// What the handler would answer with.
pub fn openai_completion(
    config: &GatewayConfig,
    model: &ServedModel,
    body: &[u8],
) -> Result<Vec<Prepared>, GatewayError> {
    crate::http_completions::legacy_inputs(body, config.max_prompts)?
        .into_iter()
        .map(|input| prepare(config, model, input))
        .collect()
}

/// A decoded `dsvl.v1.ChatRequest` through validation, the template and the tokenizer.
///
/// # Errors
/// What `Chat/Generate` would answer with.
pub fn grpc_chat(
    config: &GatewayConfig,
    model: &ServedModel,
    request: ChatRequest,
) -> Result<Prepared, GatewayError> {
    prepare(config, model, crate::grpc::to_input(request)?)
}

/// The deadline an OpenAI request with this timeout header gets (`x-request-timeout` when
/// `stainless` is false, else `x-stainless-timeout`); `None` when the bytes are not a header
/// value at all (the HTTP layer refuses those first).
///
/// # Errors
/// A value that is not a positive number of seconds.
pub fn openai_deadline(stainless: bool, value: &[u8]) -> Option<Result<Duration, GatewayError>> {
    let value = HeaderValue::from_bytes(value).ok()?;
    let name = if stainless { "x-stainless-timeout" } else { "x-request-timeout" };
    let mut headers = HeaderMap::new();
    headers.insert(HeaderName::from_static(name), value);
    let now = Instant::now();
    Some(crate::http::deadline(&headers, Duration::from_secs(600), now).map(|d| d - now))
}

/// An `image_url` value: a `data:` URL decoded, or a remote URL checked against the fetch
/// policy (no network).
///
/// # Errors
/// What the request would be refused with.
pub fn image_url(config: &GatewayConfig, url: &str) -> Result<Option<bytes::Bytes>, GatewayError> {
    if url.starts_with("data:") {
        decode_data_url(url, config.max_image_bytes).map(Some)
    } else {
        RemoteImage::parse(url, config).map(|_| None)
    }
}
