//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions` (streaming as
//! server-sent events framed exactly like OpenAI's, or one JSON object), `GET /v1/models`,
//! `GET /health`. Errors use OpenAI's `{"error": {...}}` shape with the matching status code.
//!
//! Extensions, ignored by OpenAI clients: vLLM's `top_k`, `min_p`, `repetition_penalty`,
//! `stop_token_ids`, `ignore_eos`, `min_tokens`, `include_stop_str_in_output`,
//! `structured_outputs` and the `guided_*` fields before it, and `return_prompt_token_ids` in
//! the request; a `dsvl` object (token ids, per-tier timing) in
//! the response and in stream chunks. `n` choices stream interleaved, each chunk naming its
//! choice's index, each choice ending with its own `finish_reason`. The deadline comes from `X-Request-Timeout` (seconds) or
//! the OpenAI client's `X-Stainless-Timeout`, capped by the gateway's own.

use dsvl_proto::internal::Constraint;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use dsvl_core::sampling::SamplingRequest;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::chat::request_span;
use crate::error::{retry_after_secs, GatewayError};
use crate::http_reply::{sse, whole, Reply, Shape, StreamUsage};
use crate::prepare::{ChatInput, InMessage, OutputOptions, Part, Role, TemplateOptions};
use crate::structured::StructuredFields;
use crate::tenancy::Tenant;
use crate::tools::Tools;
use crate::vllm_extras::VllmExtras;
use crate::Gateway;
use dsvl_chat::DEFAULT_SYSTEM_PROMPT;

/// A message's content: a string, or a list of parts. Not `#[serde(untagged)]`, whose only
/// error is "did not match any variant": a bad part is reported as the part's own error (an
/// unknown `type` names it and the accepted ones).
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    ContentPart::deserialize(p)
                        .map_err(|e| D::Error::custom(format!("part {i}: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(Self::Parts),
            other => Err(D::Error::custom(format!(
                "content must be a string or a list of parts, not {}",
                match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    _ => "an object",
                }
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize)]
struct ImageUrl {
    url: String,
}

#[derive(Deserialize)]
struct OaMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's earlier calls.
    #[serde(default)]
    tool_calls: Vec<OaToolCall>,
    /// A `tool` message's call.
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct OaToolCall {
    id: String,
    function: OaFunction,
}

#[derive(Deserialize)]
struct OaFunction {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    #[serde(default)]
    continuous_usage_stats: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: String,
    messages: Vec<OaMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    min_p: Option<f32>,
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    ignore_eos: bool,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    return_prompt_token_ids: bool,
    /// vLLM's chat-template switches.
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    continue_final_message: bool,
    /// vLLM chat's `echo`: the reply starts with the last message when it is the assistant's.
    #[serde(default)]
    echo: bool,
    /// vLLM's extensions shared with `/v1/completions`.
    #[serde(flatten)]
    vllm: VllmExtras,
    /// OpenAI's `response_format`, vLLM's `structured_outputs` and `guided_*`.
    #[serde(flatten)]
    structured: StructuredFields,
}

pub(crate) fn error_response(e: &GatewayError) -> Response {
    let (code, _, _) = e.http_parts();
    let mut resp = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(e.openai_body()),
    )
        .into_response();
    if let GatewayError::Exhausted { retry_after, .. } = e {
        if let Ok(v) = HeaderValue::from_str(&retry_after_secs(*retry_after).to_string()) {
            resp.headers_mut().insert("retry-after", v);
        }
    }
    resp
}

pub(crate) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The request's deadline: the shorter of the OpenAI clients' timeout headers, capped at the
/// gateway's own request timeout. A header that is not a positive number of seconds is a 400.
pub(crate) fn deadline(
    h: &HeaderMap,
    default: Duration,
    started: Instant,
) -> Result<Instant, GatewayError> {
    let mut timeout = default;
    for name in ["x-request-timeout", "x-stainless-timeout"] {
        let Some(v) = h.get(name) else { continue };
        let v = v.to_str().unwrap_or("<non-ASCII>");
        let asked = dsvl_telemetry::deadline::http_timeout_secs(name, v)
            .map_err(|e| GatewayError::InvalidArgument(e.to_string()))?;
        timeout = timeout.min(asked);
    }
    Ok(started + timeout)
}

/// A chat body as [`completions`] reads it, up to the gateway's own input (for the fuzz
/// targets, which have no headers).
pub(crate) fn chat_input(body: &[u8]) -> Result<(ChatInput, Option<Tools>), GatewayError> {
    let check = crate::openai_fields::check;
    let far = Duration::from_secs(60);
    let (_, req) =
        read_request::<CompletionRequest>(&HeaderMap::new(), body, far, Instant::now(), check)?;
    to_input(req).map(|(input, tools, _)| (input, tools))
}

/// The input, the tools and the caller's `request_id` of a chat body.
#[allow(clippy::type_complexity)]
fn to_input(
    r: CompletionRequest,
) -> Result<(ChatInput, Option<Tools>, Option<String>), GatewayError> {
    let invalid = |m: &str| GatewayError::InvalidArgument(m.to_string());
    let tools = Tools::parse(r.tools.as_ref(), r.tool_choice.as_ref(), r.parallel_tool_calls)?;
    let mut constraint = r.structured.constraint()?;
    if let Some(kind) = tools.as_ref().and_then(Tools::constraint) {
        if constraint.is_some() {
            return Err(invalid(
                "tool_choice required, a named function, or a strict tool under auto excludes any \
                 other structured output (response_format, structured_outputs, guided_*)",
            ));
        }
        constraint = Some(Constraint { kind: Some(kind) });
    }
    let mut messages: Vec<InMessage> = Vec::with_capacity(r.messages.len() + 1);
    // Names of earlier calls by id, for the tool results.
    let mut called: std::collections::HashMap<String, String> = Default::default();
    let mut last_was_tool = false;
    for m in r.messages {
        if m.role == "tool" {
            let id = m.tool_call_id.ok_or_else(|| invalid("a tool message needs tool_call_id"))?;
            let name = called.get(&id).cloned().ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "tool_call_id `{id}` answers no earlier assistant tool call"
                ))
            })?;
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(ps)) => ps
                    .into_iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => Ok(text),
                        ContentPart::ImageUrl { .. } => Err(invalid("tool results are text only")),
                    })
                    .collect::<Result<String, _>>()?,
            };
            let text = crate::tools::render_result(&name, &id, &content);
            // A run of tool results is one user turn.
            match messages.last_mut() {
                Some(last) if last_was_tool => last.parts.push(Part::Text(format!("\n\n{text}"))),
                _ => messages.push(InMessage { role: Role::User, parts: vec![Part::Text(text)] }),
            }
            last_was_tool = true;
            continue;
        }
        last_was_tool = false;
        let role = Role::parse(&m.role)?;
        if !m.tool_calls.is_empty() && role != Role::Assistant {
            return Err(invalid("only assistant messages carry tool_calls"));
        }
        let mut parts = match m.content {
            None => Vec::new(),
            Some(Content::Text(t)) => vec![Part::Text(t)],
            Some(Content::Parts(ps)) => {
                let mut out = Vec::with_capacity(ps.len());
                for p in ps {
                    out.push(match p {
                        ContentPart::Text { text } => Part::Text(text),
                        ContentPart::ImageUrl { image_url } => Part::ImageUrl(image_url.url),
                    });
                }
                out
            }
        };
        if !m.tool_calls.is_empty() {
            let calls: Vec<(String, String)> = m
                .tool_calls
                .into_iter()
                .map(|c| {
                    called.insert(c.id, c.function.name.clone());
                    (c.function.name, c.function.arguments)
                })
                .collect();
            let sep = if parts.is_empty() { "" } else { "\n" };
            parts.push(Part::Text(format!("{sep}{}", crate::tools::render_calls(&calls))));
        }
        messages.push(InMessage { role, parts });
    }
    if let Some(t) = &tools {
        // The tools go to the end of the system prompt (the default one when none is given).
        let system = |text: String| InMessage { role: Role::System, parts: vec![Part::Text(text)] };
        if !messages.iter().any(|m| m.role == Role::System) {
            messages.insert(0, system(DEFAULT_SYSTEM_PROMPT.to_string()));
        }
        messages.push(system(t.system_block()));
    }
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let input = ChatInput {
        model: r.model,
        messages,
        // Unset fields take the defaults shared by every API (OpenAI's: temperature 1, top_p 1).
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
        stop,
        max_tokens: r.max_completion_tokens.or(r.max_tokens),
        return_prompt_token_ids: r.return_prompt_token_ids,
        constraint,
        raw_prompt: None,
        output: OutputOptions {
            n: r.n.unwrap_or(1),
            logprobs: r.logprobs.unwrap_or(false),
            top_logprobs: r.top_logprobs.unwrap_or(0),
            stop_token_ids: r.stop_token_ids.unwrap_or_default(),
            ignore_eos: r.ignore_eos,
            ..Default::default()
        },
        template: TemplateOptions {
            continue_final_message: r.continue_final_message,
            add_generation_prompt: r.add_generation_prompt,
            echo: r.echo,
        },
        ..Default::default()
    };
    let mut input = input;
    let request_id = r.vllm.apply(&mut input, r.stream)?;
    Ok((input, tools, request_id))
}

/// OpenAI's `logit_bias` (token ids as JSON object keys) as `(id, bias)` pairs.
pub(crate) fn logit_bias(
    m: Option<std::collections::HashMap<String, f32>>,
) -> Result<Vec<(u32, f32)>, GatewayError> {
    m.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            k.parse::<u32>().map(|id| (id, v)).map_err(|_| {
                GatewayError::InvalidArgument(format!("logit_bias: key `{k}` is not a token id"))
            })
        })
        .collect()
}

/// A process-unique id: `prefix`, the time in microseconds, a counter (completions, tool calls).
pub(crate) fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{prefix}{:x}{:06x}", t.as_micros(), N.fetch_add(1, Ordering::Relaxed) & 0xff_ffff)
}

/// The preamble of both OpenAI handlers: the deadline from the headers, the body parsed, its
/// fields checked by `check` (no silent drops: a field the gateway does not honour is a 400
/// naming it), then deserialized.
pub(crate) fn read_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    timeout: Duration,
    started: Instant,
    check: fn(&Value) -> Result<(), String>,
) -> Result<(Instant, T), GatewayError> {
    let deadline = deadline(headers, timeout, started)?;
    let value: Value =
        serde_json::from_slice(body).map_err(|e| crate::http_errors::not_json(&e))?;
    check(&value).map_err(GatewayError::InvalidArgument)?;
    // The plain pass is the fast one; only a body that does not fit goes through again with
    // the path tracked, to name the field.
    let req = match T::deserialize(&value) {
        Ok(req) => req,
        Err(plain) => {
            return Err(match serde_path_to_error::deserialize::<_, T>(&value) {
                Err(e) => {
                    let param = e.path().to_string();
                    let message = format!("invalid `{param}`: {}", e.inner());
                    GatewayError::InvalidField { param, message }
                }
                Ok(_) => GatewayError::InvalidArgument(format!("invalid request: {plain}")),
            })
        }
    };
    Ok((deadline, req))
}

async fn completions(
    State(gw): State<Arc<Gateway>>,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let timeout = gw.config.request_timeout;
    let check = crate::openai_fields::check;
    let (deadline, req): (Instant, CompletionRequest) =
        match crate::http_errors::require_json(&headers)
            .and_then(|()| read_request(&headers, &body, timeout, started, check))
        {
            Ok(x) => x,
            Err(e) => return error_response(&e),
        };
    let streaming = req.stream;
    let usage_in = req.stream_options.as_ref().map_or(StreamUsage::Never, |o| {
        StreamUsage::from_flags(o.include_usage, o.continuous_usage_stats)
    });
    let (input, tools, request_id) = match to_input(req) {
        Ok(i) => i,
        Err(e) => return error_response(&e),
    };
    let id = request_id.map_or_else(|| unique_id("chatcmpl-"), |r| format!("chatcmpl-{r}"));
    let mut reply = Reply::new(&input, Shape::Chat, gw.model.name.clone(), id);
    reply.tools = tools.map(Arc::new);
    let span = request_span(&gw.model.name, &input, &tenant.id, "http");
    dsvl_telemetry::extract_trace_context(
        &tonic::metadata::MetadataMap::from_headers(headers.clone()),
        &span,
    );
    let rx = match gw.chat(&tenant, input, deadline, "http").instrument(span).await {
        Ok(rx) => rx,
        Err(e) => return error_response(&e),
    };
    if streaming {
        sse(rx, reply, usage_in).into_response()
    } else {
        whole(rx, reply).await
    }
}

/// The served model as OpenAI's model object, with the served context length (vLLM's
/// `max_model_len`) and the input modalities it accepts.
fn model_object(gw: &Gateway) -> Value {
    let m = gw.model_info();
    let modalities = if m.vision { vec!["text", "image"] } else { vec!["text"] };
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": "dsvl", "vision": m.vision,
           "max_positions": m.max_positions, "max_model_len": m.max_positions,
           "modalities": modalities})
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    Json(json!({"object": "list", "data": [model_object(&gw)]})).into_response()
}

/// `GET /v1/models/{id}`: the model object, or OpenAI's 404 for an id this gateway does not serve.
async fn model(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let object = model_object(&gw);
    if object["id"] == id.as_str() {
        return Json(object).into_response();
    }
    let message =
        format!("The model `{id}` does not exist; this gateway serves `{}`", object["id"]);
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": "model", "code": "model_not_found"}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let (ready, why) = gw.readiness();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({"status": if ready { "ok" } else { "unavailable" }, "detail": why})))
        .into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": {"message": "unknown route; see /v1/chat/completions and /v1/models", "type": "invalid_request_error", "param": null, "code": "not_found"}})))
        .into_response()
}

/// Checks the API key from the headers before anything reads the body (which may be tens of
/// MiB), and hands the tenant to the handler.
async fn require_key(
    State(gw): State<Arc<Gateway>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match gw.tenancy.authenticate(header(request.headers(), "authorization")) {
        Ok(tenant) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Err(_) => {
            metrics::counter!("dsvl_requests_total", "api" => "http", "outcome" => "unauthenticated").increment(1);
            error_response(&GatewayError::Unauthenticated)
        }
    }
}

/// The HTTP routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let body_limit = gw.config.max_images.max(1) * gw.config.max_image_bytes / 3 * 4 + (4 << 20);
    let api = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(crate::http_completions::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/tokenizer_info", get(crate::http_tokenize::tokenizer_info))
        .route("/tokenize", post(crate::http_tokenize::tokenize))
        .route("/detokenize", post(crate::http_tokenize::detokenize))
        // Inside the key check: an unauthenticated request is a 401 whatever its size.
        .route_layer(axum::middleware::from_fn_with_state(
            body_limit,
            crate::http_errors::refuse_declared_oversize,
        ))
        .route_layer(axum::middleware::from_fn_with_state(gw.clone(), require_key));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            gw.config.http_timeouts.body_idle,
            crate::http_server::body_idle_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(body_limit, crate::http_errors::openai_shape))
        .with_state(gw)
}
