//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions` (streaming as
//! server-sent events framed exactly like OpenAI's, or one JSON object), `GET /v1/models`,
//! `GET /health`. Errors use OpenAI's `{"error": {...}}` shape with the matching status code.
//!
//! Extensions, ignored by OpenAI clients: vLLM's `top_k`, `min_p`, `repetition_penalty`,
//! `stop_token_ids`, `ignore_eos`, `guided_regex` and `guided_grammar`, and
//! `return_prompt_token_ids` in the request; a `dsvl` object (token ids, per-tier timing) in
//! the response and in stream chunks. `n` choices stream interleaved, each chunk naming its
//! choice's index, each choice ending with its own `finish_reason`. The deadline comes from `X-Request-Timeout` (seconds) or
//! the OpenAI client's `X-Stainless-Timeout`, capped by the gateway's own.

use dsvl_proto::internal::constraint::Kind;
use dsvl_proto::internal::Constraint;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dsvl_core::sampling::SamplingRequest;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::chat::{request_span, Alternative, ChatEvent, ChatStream, Finish, TokenLogprob};
use crate::error::{retry_after_secs, GatewayError};
use crate::fetch::load_image_url;
use crate::prepare::{ChatInput, InMessage, OutputOptions, Part, Role};
use crate::Gateway;

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
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
    #[serde(default)]
    return_prompt_token_ids: bool,
    /// OpenAI's structured outputs: `text`, `json_object`, `json_schema`.
    response_format: Option<Value>,
    /// vLLM's extensions: the reply matches a regular expression / a Lark grammar.
    guided_regex: Option<String>,
    guided_grammar: Option<String>,
}

/// The decoder constraint of `response_format` / `guided_regex` / `guided_grammar` (at most
/// one), or a 400 naming the field. `json_schema` is enforced whether `strict` is set or not.
fn constraint(r: &CompletionRequest) -> Result<Option<Constraint>, GatewayError> {
    constraint_of(&r.response_format, &r.guided_regex, &r.guided_grammar)
}

/// [`constraint`] from its three fields (shared with `/v1/completions`).
pub(crate) fn constraint_of(
    response_format: &Option<Value>,
    guided_regex: &Option<String>,
    guided_grammar: &Option<String>,
) -> Result<Option<Constraint>, GatewayError> {
    let invalid = |m: String| GatewayError::InvalidArgument(m);
    let from_format = match response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(Kind::JsonObject(true)),
            Some("json_schema") => {
                let schema =
                    f.get("json_schema").and_then(|j| j.get("schema")).ok_or_else(|| {
                        invalid("response_format.json_schema.schema is required".into())
                    })?;
                if !schema.is_object() {
                    return Err(invalid(
                        "response_format.json_schema.schema must be an object".into(),
                    ));
                }
                Some(Kind::JsonSchema(schema.to_string()))
            }
            other => {
                return Err(invalid(format!(
                    "response_format.type must be text, json_object or json_schema, not {other:?}"
                )))
            }
        },
    };
    let asked: Vec<Kind> = [
        from_format,
        guided_regex.clone().map(Kind::Regex),
        guided_grammar.clone().map(Kind::Lark),
    ]
    .into_iter()
    .flatten()
    .collect();
    match asked.len() {
        0 => Ok(None),
        1 => Ok(Some(Constraint { kind: asked.into_iter().next() })),
        _ => Err(invalid(
            "response_format, guided_regex and guided_grammar exclude each other".into(),
        )),
    }
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

async fn to_input(
    gw: &Gateway,
    r: CompletionRequest,
    deadline: Instant,
) -> Result<ChatInput, GatewayError> {
    let invalid = |m: &str| GatewayError::InvalidArgument(m.to_string());
    if r.tools.as_ref().is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(invalid("tools are not supported by this model"));
    }
    if r.tool_choice.as_ref().is_some_and(|c| !c.is_null() && c != "none") {
        return Err(invalid("tool_choice must be \"none\": tools are not supported by this model"));
    }
    let constraint = constraint(&r)?;
    let mut messages = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        let role = Role::parse(&m.role)?;
        let parts = match m.content {
            None => Vec::new(),
            Some(Content::Text(t)) => vec![Part::Text(t)],
            Some(Content::Parts(ps)) => {
                let mut out = Vec::with_capacity(ps.len());
                for p in ps {
                    out.push(match p {
                        ContentPart::Text { text } => Part::Text(text),
                        ContentPart::ImageUrl { image_url } => Part::Image(
                            load_image_url(
                                &image_url.url,
                                &gw.config.image_url_allow,
                                gw.config.max_image_bytes,
                                deadline,
                            )
                            .await?,
                        ),
                    });
                }
                out
            }
        };
        messages.push(InMessage { role, parts });
    }
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    Ok(ChatInput {
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
        },
    })
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

fn completion_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("chatcmpl-{:x}{:04x}", t.as_micros(), N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Usage over every choice: the prompt once (choice 0's cache figure), the completions summed.
fn usage(finishes: &[Finish]) -> Value {
    let first = finishes.iter().min_by_key(|f| f.index).cloned().unwrap_or_default();
    let completion: u32 = finishes.iter().map(|f| f.completion_tokens).sum();
    json!({
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    })
}

fn extension(f: &Finish) -> Value {
    let t = f.timing;
    let mut v = json!({
        "token_ids": f.token_ids,
        "timing": {
            "tokenize_seconds": t.tokenize_seconds,
            "vision_seconds": t.vision_seconds,
            "decoder_first_token_seconds": t.decoder_first_token_seconds,
            "total_seconds": t.total_seconds,
            "images_cached": t.images_cached,
        },
    });
    if !f.prompt_token_ids.is_empty() {
        v["prompt_token_ids"] = json!(f.prompt_token_ids);
    }
    v
}

async fn completions(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let tenant = match gw.tenancy.authenticate(header(&headers, "authorization")) {
        Ok(t) => t,
        Err(_) => {
            metrics::counter!("dsvl_requests_total", "api" => "http", "outcome" => "unauthenticated").increment(1);
            return error_response(&GatewayError::Unauthenticated);
        }
    };
    let deadline = match deadline(&headers, gw.config.request_timeout, started) {
        Ok(d) => d,
        Err(e) => return error_response(&e),
    };
    let malformed = |e: serde_json::Error| {
        GatewayError::InvalidArgument(format!("malformed request body: {e}"))
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error_response(&malformed(e)),
    };
    // No silent drops: a field this gateway does not honour is a 400 naming it.
    if let Err(why) = crate::openai_fields::check(&value) {
        return error_response(&GatewayError::InvalidArgument(why));
    }
    let req: CompletionRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return error_response(&malformed(e)),
    };
    let streaming = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let input = match to_input(&gw, req, deadline).await {
        Ok(i) => i,
        Err(e) => return error_response(&e),
    };
    let reply = Reply::new(&input, Shape::Chat, gw.model.name.clone(), completion_id());
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
        sse(rx, reply, include_usage).into_response()
    } else {
        whole(rx, reply).await
    }
}

/// How to frame one request's reply.
pub(crate) struct Reply {
    /// Chat or text completion.
    pub shape: Shape,
    /// Completion id.
    pub id: String,
    /// Served model name.
    pub model: String,
    /// Choices to wait for.
    pub n: u32,
    /// Whether choices carry `logprobs`.
    pub logprobs: bool,
}

impl Reply {
    /// The framing of `input`'s reply.
    pub(crate) fn new(input: &ChatInput, shape: Shape, model: String, id: String) -> Self {
        Self { shape, id, model, n: input.output.n.max(1), logprobs: input.output.logprobs }
    }
}

/// How a reply is framed: OpenAI's chat completions or its (legacy) text completions. The
/// stream of events, the usage and the `dsvl` extension are the same for both.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    /// `chat.completion` / `chat.completion.chunk`, text under `message` / `delta`.
    Chat,
    /// `text_completion`, text under `text`.
    Text,
}

impl Shape {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Text, _) => "text_completion",
        }
    }

    /// A choice's `logprobs` for `tokens` (`null` when not asked for): chat's `content` list,
    /// or the legacy completions' parallel lists (`text_offset` counts characters from
    /// `offset`, the characters of the choice's earlier tokens).
    fn logprobs(self, asked: bool, tokens: &[TokenLogprob], offset: usize) -> Value {
        if !asked {
            return Value::Null;
        }
        let entry = |a: &Alternative| json!({"token": a.text, "logprob": a.logprob, "bytes": a.text.as_bytes()});
        match self {
            Self::Chat => json!({"content": tokens.iter().map(|t| {
                let mut e = entry(&t.token);
                e["top_logprobs"] = t.top.iter().map(entry).collect();
                e
            }).collect::<Vec<_>>()}),
            Self::Text => {
                let mut at = offset;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let o = at;
                        at += t.token.text.chars().count();
                        o
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| t.token.text.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// A choice of a whole reply.
    fn whole_choice(self, index: u32, text: String, logprobs: Value, finish: &str) -> Value {
        match self {
            Self::Chat => {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish})
            }
            Self::Text => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// A choice of a stream chunk: new text, or the end (`finish`, no text).
    fn chunk_choice(self, index: u32, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        match (self, finish) {
            (Self::Chat, None) => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            (Self::Chat, Some(f)) => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": f})
            }
            (Self::Text, f) => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": f})
            }
        }
    }
}

/// The `dsvl` extension of a whole reply: choice 0's, plus every choice's ids when n > 1.
fn extensions(finishes: &[Finish]) -> Value {
    let mut v = extension(&finishes[0]);
    if finishes.len() > 1 {
        v["choices_token_ids"] = finishes.iter().map(|f| json!(f.token_ids)).collect();
    }
    v
}

/// What one choice has accumulated.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<Finish>,
}

/// The whole reply as one JSON object.
pub(crate) async fn whole(mut rx: ChatStream, reply: Reply) -> Response {
    let mut choices: Vec<Choice> = (0..reply.n).map(|_| Choice::default()).collect();
    let mut finished = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            Ok(ChatEvent::Delta(d)) => {
                let c = &mut choices[d.index as usize];
                c.text.push_str(&d.text);
                c.logprobs.extend(d.logprobs);
            }
            Ok(ChatEvent::Finish(f)) => {
                let i = f.index as usize;
                choices[i].finish = Some(f);
                finished += 1;
                if finished < choices.len() {
                    continue;
                }
                let finishes: Vec<Finish> =
                    choices.iter_mut().filter_map(|c| c.finish.take()).collect();
                let body: Vec<Value> = choices
                    .into_iter()
                    .zip(&finishes)
                    .map(|(c, f)| {
                        let lp = reply.shape.logprobs(reply.logprobs, &c.logprobs, 0);
                        reply.shape.whole_choice(f.index, c.text, lp, &f.finish_reason)
                    })
                    .collect();
                return Json(json!({
                    "id": reply.id, "object": reply.shape.object(false), "created": unix_now(), "model": reply.model, "system_fingerprint": null,
                    "choices": body,
                    "usage": usage(&finishes),
                    "dsvl": extensions(&finishes),
                }))
                .into_response();
            }
            Err(e) => return error_response(&e),
        }
    }
    error_response(&GatewayError::Internal("the request ended without a result".into()))
}

/// The reply as server-sent events framed like OpenAI's (`[DONE]` last, after every choice's
/// end).
pub(crate) fn sse(
    rx: ChatStream,
    reply: Reply,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = unix_now();
    let Reply { shape, id, model, n, logprobs } = reply;
    let chunk = move |choices: Value, extra: Option<(&str, Value)>| {
        let mut v = json!({"id": id, "object": shape.object(true), "created": created, "model": model, "system_fingerprint": null, "choices": choices});
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        Event::default().data(v.to_string())
    };
    // Chat streams open each choice with the assistant's role.
    let first: Vec<Event> = match shape {
        Shape::Chat => (0..n)
            .map(|i| {
                chunk(
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                    None,
                )
            })
            .collect(),
        Shape::Text => Vec::new(),
    };
    let mut finishes: Vec<Finish> = Vec::new();
    let mut chars = vec![0usize; n as usize];
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |ev| match ev {
        Ok(ChatEvent::Delta(d)) => {
            let at = &mut chars[d.index as usize];
            let lp = shape.logprobs(logprobs, &d.logprobs, *at);
            *at += d.logprobs.iter().map(|t| t.token.text.chars().count()).sum::<usize>();
            vec![chunk(
                json!([shape.chunk_choice(d.index, &d.text, lp, None)]),
                Some(("dsvl", json!({"token_ids": d.token_ids}))),
            )]
        }
        Ok(ChatEvent::Finish(f)) => {
            let mut out = vec![chunk(
                json!([shape.chunk_choice(f.index, "", Value::Null, Some(&f.finish_reason))]),
                Some(("dsvl", extension(&f))),
            )];
            finishes.push(f);
            if finishes.len() == n as usize {
                if include_usage {
                    out.push(chunk(json!([]), Some(("usage", usage(&finishes)))));
                }
                out.push(Event::default().data("[DONE]"));
            }
            out
        }
        // After the first byte the status code is sent; OpenAI reports late errors as an
        // `error` event in the stream.
        Err(e) => vec![Event::default().data(e.openai_body().to_string())],
    });
    let all = futures::stream::iter(first).chain(events.flat_map(futures::stream::iter)).map(Ok);
    Sse::new(all)
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if gw.tenancy.authenticate(header(&headers, "authorization")).is_err() {
        return error_response(&GatewayError::Unauthenticated);
    }
    let m = gw.model_info();
    Json(json!({"object": "list", "data": [{"id": m.id, "object": "model", "created": 0, "owned_by": "dsvl", "vision": m.vision, "max_positions": m.max_positions, "max_model_len": m.max_positions}]}))
        .into_response()
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

/// The HTTP routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let body_limit = gw.config.max_images.max(1) * gw.config.max_image_bytes / 3 * 4 + (4 << 20);
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(crate::http_completions::completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(gw)
}
