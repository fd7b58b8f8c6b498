//! Sends one [`WorkItem`] to the gateway and times it: OpenAI HTTP with server-sent events
//! (`http://`, `https://`), or `dsvl.v1.Chat/Generate` (`grpc://`, `grpcs://`). Each request carries its deadline
//! (`X-Request-Timeout` or `grpc-timeout`); the client gives up on its own only at the deadline
//! plus `hang_after`, and calls that a `hung` request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part as ProtoPart;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart, ListModelsRequest};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::report::Outcome;
use crate::tls::{Connector, TlsFiles};
use crate::workload::{Part, WorkItem};
use crate::LoadError;

/// How to reach the gateway, besides its URL.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The model id to ask for (`None`: the first the gateway lists).
    pub model: Option<String>,
    /// HTTP/2 connections for gRPC (each carries many streams).
    pub grpc_connections: usize,
    /// Trust and identity for `https://` and `grpcs://`.
    pub tls: TlsFiles,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { api_key: None, model: None, grpc_connections: 1, tls: TlsFiles::default() }
    }
}

/// A connection to the gateway.
#[derive(Clone)]
pub struct Client {
    proto: Proto,
    api_key: Option<String>,
    model: String,
}

#[derive(Clone)]
enum Proto {
    Http { base: String, http: Box<HyperClient<Connector, Full<Bytes>>> },
    Grpc { channels: Arc<Vec<Channel>>, next: Arc<AtomicUsize> },
}

/// Times output chunks as they arrive.
struct Clock {
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<Duration>,
    chunks: u32,
}

impl Clock {
    fn new(start: Instant) -> Self {
        Self { start, first: None, last: None, itl: Vec::new(), chunks: 0 }
    }

    fn chunk(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.first = Some(now),
            Some(prev) => self.itl.push(now - prev),
        }
        self.last = Some(now);
        self.chunks += 1;
    }
}

/// How a stream ended: a complete answer with its token count, or an error class.
type End = Result<Option<u32>, String>;

impl Client {
    /// Connects to `url` (`http://` or `https://` for the OpenAI API, `grpc://` or `grpcs://`
    /// for gRPC, then `HOST:PORT`) and learns the model's id from the gateway unless
    /// `options.model` is given.
    pub async fn connect(url: &str, options: ConnectOptions) -> Result<Self, LoadError> {
        let bad = |why: String| LoadError::Target(format!("{url}: {why}"));
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let tls = matches!(scheme, "https" | "grpcs");
        if options.tls.is_set() && !tls {
            return Err(bad("--ca-file and a client certificate need https:// or grpcs://".into()));
        }
        let rest = rest.trim_end_matches('/');
        // `HOST:PORT` without the path prefix a gateway may sit under (`https://host/dsvl`).
        let authority = rest.split('/').next().unwrap_or(rest);
        let proto = match scheme {
            "grpc" | "grpcs" => {
                let tls = if tls {
                    let config = options.tls.config(dsvl_tls::ALPN_H2).map_err(bad)?;
                    let name = dsvl_tls::server_name(authority).map_err(|e| bad(e.to_string()))?;
                    Some((dsvl_tls::Reloading::fixed(config), name))
                } else {
                    None
                };
                let mut channels = Vec::new();
                for _ in 0..options.grpc_connections.max(1) {
                    let ep = Endpoint::from_shared(format!("http://{rest}"))
                        .map_err(|e| bad(e.to_string()))?
                        .connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true);
                    channels.push(match &tls {
                        Some((config, name)) => {
                            dsvl_tls::lazy_channel(ep, config.clone(), name.clone())
                        }
                        None => ep.connect_lazy(),
                    });
                }
                Proto::Grpc { channels: Arc::new(channels), next: Arc::new(AtomicUsize::new(0)) }
            }
            "http" | "https" => {
                let mut tcp = HttpConnector::new();
                tcp.set_nodelay(true);
                tcp.set_connect_timeout(Some(Duration::from_secs(5)));
                let tls = if tls {
                    tcp.enforce_http(false);
                    let config = options.tls.config(dsvl_tls::ALPN_HTTP1).map_err(bad)?;
                    let name = dsvl_tls::server_name(authority).map_err(|e| bad(e.to_string()))?;
                    Some((config, name))
                } else {
                    None
                };
                let http = HyperClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(Connector::new(tcp, tls));
                Proto::Http { base: format!("{scheme}://{rest}"), http: Box::new(http) }
            }
            _ => {
                return Err(bad("the URL must start with http:// or https:// (OpenAI API), or \
                     grpc:// or grpcs://"
                    .into()))
            }
        };
        let mut client =
            Self { proto, api_key: options.api_key, model: options.model.unwrap_or_default() };
        if client.model.is_empty() {
            client.model = client.first_model().await.map_err(bad)?;
        }
        Ok(client)
    }

    /// The served model's id.
    pub fn model(&self) -> &str {
        &self.model
    }

    async fn first_model(&self) -> Result<String, String> {
        match &self.proto {
            Proto::Http { base, http } => {
                let mut req = http::Request::get(format!("{base}/v1/models"));
                if let Some(k) = &self.api_key {
                    req = req.header("authorization", format!("Bearer {k}"));
                }
                let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
                // One time limit for the answer and its body: a server that sends the headers
                // and then stalls must not hold the start.
                let answer = async {
                    let resp = http
                        .request(req)
                        .await
                        .map_err(|e| format!("GET /v1/models: {}", with_causes(&e)))?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, body.to_bytes()))
                };
                let (status, body) =
                    tokio::time::timeout(Duration::from_secs(10), answer)
                        .await
                        .map_err(|_| "no answer to GET /v1/models in 10 s".to_string())??;
                let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("GET /v1/models: {status}: {v}"));
                }
                v.pointer("/data/0/id")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .ok_or_else(|| format!("no model in {v}"))
            }
            Proto::Grpc { channels, .. } => {
                let mut c = ChatClient::new(channels[0].clone());
                let mut req = tonic::Request::new(ListModelsRequest {});
                req.set_timeout(Duration::from_secs(10));
                self.authorize(req.metadata_mut());
                let models = c
                    .list_models(req)
                    .await
                    .map_err(|s| format!("ListModels: {}", with_causes(&s)))?;
                models
                    .into_inner()
                    .models
                    .first()
                    .map(|m| m.id.clone())
                    .ok_or_else(|| "no model served".into())
            }
        }
    }

    fn authorize(&self, md: &mut tonic::metadata::MetadataMap) {
        if let Some(v) = self.api_key.as_ref().and_then(|k| format!("Bearer {k}").parse().ok()) {
            md.insert("authorization", v);
        }
    }

    /// Sends `item` with `deadline`, and waits at most `deadline + hang_after` for it to end.
    pub async fn send(
        &self,
        item: &WorkItem,
        deadline: Duration,
        hang_after: Duration,
        sent_at: Duration,
    ) -> Outcome {
        let start = Instant::now();
        let mut clock = Clock::new(start);
        let end = match tokio::time::timeout(
            deadline + hang_after,
            self.stream(item, deadline, &mut clock),
        )
        .await
        {
            Ok(end) => end,
            Err(_) => Err("hung".to_string()),
        };
        let e2e = start.elapsed();
        let (result, output_tokens) = match end {
            Ok(tokens) => (Ok(()), tokens.unwrap_or(clock.chunks)),
            Err(class) => (Err(class), 0),
        };
        Outcome {
            kind: item.kind.clone(),
            sent_at,
            ttft: clock.first.map(|t| t - clock.start),
            itl: if result.is_ok() { clock.itl } else { Vec::new() },
            result,
            e2e,
            output_tokens,
            deadline,
        }
    }

    async fn stream(&self, item: &WorkItem, deadline: Duration, clock: &mut Clock) -> End {
        match &self.proto {
            Proto::Http { base, http } => self.http_stream(base, http, item, deadline, clock).await,
            Proto::Grpc { channels, next } => {
                let ch = channels[next.fetch_add(1, Ordering::Relaxed) % channels.len()].clone();
                self.grpc_stream(ch, item, deadline, clock).await
            }
        }
    }

    async fn http_stream(
        &self,
        base: &str,
        http: &HyperClient<Connector, Full<Bytes>>,
        item: &WorkItem,
        deadline: Duration,
        clock: &mut Clock,
    ) -> End {
        let messages: Vec<Value> = item
            .messages
            .iter()
            .map(|m| {
                let parts: Vec<Value> = m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => json!({"type": "text", "text": t}),
                        Part::Image(i) => {
                            json!({"type": "image_url", "image_url": {"url": i.data_url}})
                        }
                        Part::ImageUrl(u) => json!({"type": "image_url", "image_url": {"url": u}}),
                    })
                    .collect();
                json!({"role": m.role, "content": parts})
            })
            .collect();
        let mut body = item.extra.clone();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), Value::Array(messages));
        body.insert("max_tokens".into(), json!(item.max_tokens));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        let mut req = http::Request::post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-request-timeout", format!("{:.3}", deadline.as_secs_f64()));
        if let Some(k) = &self.api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&Value::Object(body)).unwrap_or_default(),
            )))
            .map_err(|_| "bad_request".to_string())?;
        // Before any response byte: the connection was refused, or closed under the request
        // (a draining server closing a kept-alive connection as the request went out).
        let resp = http.request(req).await.map_err(|e| {
            let hyper =
                std::error::Error::source(&e).and_then(|s| s.downcast_ref::<hyper::Error>());
            if e.is_connect() {
                "connect".to_string()
            } else if hyper.is_some_and(|h| h.is_incomplete_message() || h.is_canceled()) {
                "connection_closed".to_string()
            } else {
                "protocol".to_string()
            }
        })?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            // Drain (bounded by the deadline) so the connection can be reused.
            let _ = body.collect().await;
            return Err(format!("http_{status}"));
        }
        let mut sse = crate::sse::Lines::default();
        let mut tokens = None;
        let mut finished = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "stream_cut".to_string())?;
            let Some(data) = frame.data_ref() else { continue };
            for payload in sse.push(data) {
                if payload == "[DONE]" {
                    return if finished { Ok(tokens) } else { Err("stream_cut".into()) };
                }
                let v: Value =
                    serde_json::from_str(&payload).map_err(|_| "protocol".to_string())?;
                if let Some(kind) = v.pointer("/error/type").and_then(Value::as_str) {
                    return Err(crate::sse::error_class(kind));
                }
                if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                    tokens = Some(n as u32);
                }
                for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
                    let content = choice.pointer("/delta/content").and_then(Value::as_str);
                    if content.is_some_and(|c| !c.is_empty()) {
                        clock.chunk();
                    }
                    finished |= choice.get("finish_reason").is_some_and(|r| !r.is_null());
                }
            }
        }
        Err("stream_cut".into())
    }

    async fn grpc_stream(
        &self,
        ch: Channel,
        item: &WorkItem,
        deadline: Duration,
        clock: &mut Clock,
    ) -> End {
        let mut messages = Vec::with_capacity(item.messages.len());
        for m in &item.messages {
            let mut content = Vec::with_capacity(m.parts.len());
            for p in &m.parts {
                content.push(ContentPart {
                    part: Some(match p {
                        Part::Text(t) => ProtoPart::Text(t.clone()),
                        Part::Image(i) => ProtoPart::Image(i.bytes.clone()),
                        Part::ImageUrl(_) => return Err("image_url_over_grpc".into()),
                    }),
                });
            }
            messages.push(ChatMessage { role: m.role.clone(), content });
        }
        let ignore_eos = item.extra.get("ignore_eos").and_then(Value::as_bool).unwrap_or(false);
        let temperature = item.extra.get("temperature").and_then(Value::as_f64).map(|t| t as f32);
        let seed = item.extra.get("seed").and_then(Value::as_u64);
        let priority = item.extra.get("priority").and_then(Value::as_i64).unwrap_or(0);
        let mut req = tonic::Request::new(ChatRequest {
            model: self.model.clone(),
            messages,
            max_tokens: item.max_tokens,
            ignore_eos,
            priority: i32::try_from(priority).map_err(|_| "priority_out_of_range".to_string())?,
            sampling: Some(dsvl_proto::v1::SamplingParams {
                temperature,
                seed,
                ..Default::default()
            }),
            ..Default::default()
        });
        req.set_timeout(deadline);
        self.authorize(req.metadata_mut());
        let mut stream = ChatClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .generate(req)
            .await
            .map_err(|s| crate::sse::grpc_class(&s))?
            .into_inner();
        while let Some(msg) = stream.next().await {
            match msg.map_err(|s| crate::sse::grpc_class(&s))?.event {
                Some(Event::Delta(d)) if !d.token_ids.is_empty() || !d.text.is_empty() => {
                    clock.chunk()
                }
                Some(Event::Finish(f)) => return Ok(Some(f.completion_tokens)),
                _ => {}
            }
        }
        Err("stream_cut".into())
    }
}

/// `e` and its sources, so a failed TLS handshake says why ("invalid peer certificate: ...")
/// instead of hyper's bare "client error (Connect)".
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}
