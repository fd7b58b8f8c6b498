//! One chat request end to end: prepare → vision stage → decoder (routed by least work,
//! retried only before the first token) → incremental detokenization and stop strings →
//! events for the transport.
//!
//! A request for `n` choices opens choice 0 as above, then the others on the same decoder
//! group at once: the prompt's KV blocks are in its prefix cache by then, so they share the
//! prefill. Each choice is relayed on its own and ends with its own [`Finish`]; the events
//! carry the choice's index.
//!
//! The decoder call is opened and its first token awaited before [`Gateway::chat`] returns,
//! so every failure before the first byte reaches the client as a proper status (HTTP code or
//! gRPC status) and can still be retried elsewhere. After that, events flow through a channel;
//! when the client goes away the receiver is dropped, the task notices, and dropping the
//! decoder stream cancels the request there (its KV blocks are freed).

use std::sync::Arc;
use std::time::Instant;

use dsvl_chat::IncrementalDecoder;
use dsvl_core::sampling::SamplingParams;
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::generate_response::Event as DecoderEvent;
use dsvl_proto::internal::{FinishReason, GenerateRequest, GenerateResponse, ImageSlot};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};
use tracing::Instrument;

use dsvl_core::prefix::BlockHash;

use crate::error::GatewayError;
use crate::images::MAX_UPSTREAM_MESSAGE;
use crate::prefix_route::{self, RouteKey};
use crate::prepare::{prepare, ChatInput, Prepared};
use crate::stops::StopText;
use crate::tenancy::{Refusal, Tenant};
use crate::upstream::{InflightGuard, Replica};
use crate::Gateway;

/// What the transport sends to the client: the gateway's own types, converted to each
/// protocol's messages at its edge (`grpc.rs`, `http.rs`).
#[derive(Debug, Clone)]
pub enum ChatEvent {
    /// New text and the ids that produced it.
    Delta(Delta),
    /// The end: reason, usage, timing, all ids.
    Finish(Finish),
}

/// New text (complete UTF-8 characters only) and the token ids generated since the last one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// The choice (0-based, below the request's `n`).
    pub index: u32,
    /// Text.
    pub text: String,
    /// Token ids.
    pub token_ids: Vec<u32>,
    /// With `logprobs`: one entry per id in `token_ids`.
    pub logprobs: Vec<TokenLogprob>,
    /// The choice's prompt tokens (for the usage vLLM's `continuous_usage_stats` puts in
    /// every chunk).
    pub prompt_tokens: u32,
}

/// A token's log-probability under the model's unprocessed distribution, with the most likely
/// alternatives when asked for: a generated token's, or with `echo` a prompt token's given the
/// tokens before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: Alternative,
    /// Most likely first.
    pub top: Vec<Alternative>,
    /// The prompt's first token under `echo`: nothing comes before it, so it has no
    /// log-probability or alternatives (OpenAI's `null`s); `token.logprob` is 0.
    pub unscored: bool,
    /// A scored prompt token's rank at its position (1 plus the tokens more likely; vLLM's
    /// `prompt_logprobs`); `None` for generated tokens.
    pub rank: Option<u32>,
    /// A special token (BOS, EOS): the choice's text skips it, so completions'
    /// `text_offset` counts none of its characters.
    pub hidden: bool,
}

/// A token, its text alone, and its log-probability.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alternative {
    /// Id.
    pub id: u32,
    /// Its text decoded alone (U+FFFD where a character spans several tokens).
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
}

/// Where a request's time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Template + tokenization.
    pub tokenize_seconds: f64,
    /// Image encoding (vision tier or cache).
    pub vision_seconds: f64,
    /// From the decoder call to its first token.
    pub decoder_first_token_seconds: f64,
    /// The whole request at the gateway.
    pub total_seconds: f64,
    /// Images served from the embedding cache without encoding.
    pub images_cached: u32,
}

/// The end of a reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Finish {
    /// The choice that ended.
    pub index: u32,
    /// `stop` (EOS or a stop string) or `length`.
    pub finish_reason: String,
    /// What stopped it, under `stop`: a stop string or one of the request's `stop_token_ids`
    /// (vLLM's `stop_reason`); `None` for EOS, a completed grammar, or `length`.
    pub stop_reason: Option<StopReason>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Where the time went.
    pub timing: Timing,
    /// Every generated token id, in order.
    pub token_ids: Vec<u32>,
    /// The prompt's ids, when asked for (else empty).
    pub prompt_token_ids: Vec<u32>,
    /// Prompt tokens answered from the decoder's prefix cache.
    pub cached_tokens: u32,
    /// With vLLM's `prompt_logprobs`: the prompt's tokens, the first unscored (shared by the
    /// prompt's choices).
    pub prompt_logprobs: Option<Arc<Vec<TokenLogprob>>>,
}

/// What a choice sends or carries besides its tokens: completions' `echo` (sent first) and
/// vLLM's `prompt_logprobs` (on its finish).
struct Preamble {
    echo: Option<Delta>,
    prompt_logprobs: Option<Arc<Vec<TokenLogprob>>>,
}

/// What ended a choice with `stop`, besides EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop string.
    String(String),
    /// One of the request's `stop_token_ids`.
    TokenId(u32),
}

/// The stream of a started request.
pub type ChatStream = mpsc::Receiver<Result<ChatEvent, GatewayError>>;

struct Opened {
    stream: Streaming<GenerateResponse>,
    first: GenerateResponse,
    guard: InflightGuard,
    first_token_seconds: f64,
    replica: Arc<Replica>,
}

enum OpenError {
    /// The decoder cannot use the image references: send the embeddings inline.
    Reencode(String),
    Fatal(GatewayError),
}

/// Counts one request in `dsvl_gateway_requests_in_flight` (the gateway's autoscaling signal:
/// work in progress, whatever its size), against the gateway's and the tenant's in-flight
/// caps, and in the drain, from admission until its stream ends.
struct InFlightRequest {
    gw: Arc<Gateway>,
    tenant: String,
    _drain: dsvl_telemetry::server::InFlight,
}

impl InFlightRequest {
    fn new(gw: &Arc<Gateway>, tenant: &str) -> Result<Self, GatewayError> {
        use std::sync::atomic::Ordering;
        let busy = |message: String| GatewayError::Exhausted {
            message,
            retry_after: std::time::Duration::from_secs(1),
        };
        let max = gw.config.max_in_flight;
        if gw.in_flight.fetch_add(1, Ordering::SeqCst) >= max {
            gw.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(busy(format!("the gateway has its limit of {max} requests in flight")));
        }
        if !gw.tenancy.enter(tenant) {
            gw.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(busy(format!(
                "tenant `{tenant}` has its limit of {} requests in flight",
                gw.config.tenant_max_concurrency
            )));
        }
        metrics::gauge!("dsvl_gateway_requests_in_flight").increment(1.0);
        Ok(Self { gw: gw.clone(), tenant: tenant.to_string(), _drain: gw.drain.track() })
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        metrics::gauge!("dsvl_gateway_requests_in_flight").decrement(1.0);
        self.gw.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.gw.tenancy.leave(&self.tenant);
    }
}

fn deadline_error(stage: &str) -> GatewayError {
    GatewayError::DeadlineExceeded(format!("the deadline passed during {stage}"))
}

/// Gives a request's charged tokens back when dropped armed (see [`Gateway::start`]).
struct Refund {
    gw: Option<Arc<Gateway>>,
    tenant: String,
    tokens: usize,
}

impl Refund {
    fn disarm(mut self) {
        self.gw = None;
    }
}

impl Drop for Refund {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            let (tenant, tokens) = (std::mem::take(&mut self.tenant), self.tokens);
            tokio::spawn(async move { gw.credit(&tenant, tokens).await });
        }
    }
}

impl Gateway {
    /// Starts a chat request for `tenant`; returns once the first token is in.
    ///
    /// # Errors
    /// Anything that fails before the first token (the stream reports later failures).
    pub async fn chat(
        self: &Arc<Self>,
        tenant: &Tenant,
        input: ChatInput,
        deadline: Instant,
        api: &'static str,
    ) -> Result<ChatStream, GatewayError> {
        let started = Instant::now();
        if self.drain.is_draining() {
            return Err(GatewayError::Unavailable("the gateway is draining".into()));
        }
        let result = match InFlightRequest::new(self, &tenant.id) {
            Ok(in_flight) => self.start(tenant, input, deadline, started, api, in_flight).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            metrics::counter!("dsvl_requests_total", "api" => api, "outcome" => e.outcome())
                .increment(1);
            metrics::histogram!("dsvl_e2e_latency_seconds", "api" => api)
                .record(started.elapsed().as_secs_f64());
            tracing::Span::current().record("error.type", e.outcome());
        }
        result
    }

    /// Charges the tenant's quotas: the shared buckets when there are some and Redis answers,
    /// else this replica's own.
    async fn admit(&self, tenant: &Tenant, images: usize, tokens: usize) -> Result<(), Refusal> {
        if let Some(shared) = &self.quotas {
            let limits = self.tenancy.limits_of(&tenant.id);
            match shared.admit(&tenant.id, limits, images, tokens).await {
                Ok(decision) => return decision,
                Err(e) => {
                    tracing::debug!(error = %e, "shared quotas unreachable; local buckets");
                    metrics::counter!("dsvl_gateway_quota_fallbacks_total").increment(1);
                }
            }
        }
        self.tenancy.admit(tenant, images, tokens)
    }

    /// Gives back output tokens a request was charged for and did not generate.
    async fn credit(&self, tenant: &str, tokens: usize) {
        if tokens == 0 {
            return;
        }
        if let Some(shared) = &self.quotas {
            let limits = self.tenancy.limits_of(tenant);
            if shared.credit(tenant, limits, tokens).await.is_ok() {
                return;
            }
        }
        self.tenancy.credit(tenant, tokens);
    }

    async fn start(
        self: &Arc<Self>,
        tenant: &Tenant,
        input: ChatInput,
        deadline: Instant,
        started: Instant,
        api: &'static str,
        in_flight: InFlightRequest,
    ) -> Result<ChatStream, GatewayError> {
        // Template and tokenizer work off the async runtime's threads.
        let gw = self.clone();
        let prep = tokio::task::spawn_blocking(move || prepare(&gw.config, &gw.model, input))
            .await
            .map_err(|e| GatewayError::Internal(format!("prepare: {e}")))??;
        let tokens = prep.prompt.ids.len() + prep.output.n as usize * prep.max_new_tokens as usize;
        self.admit(tenant, prep.images.len(), tokens).await.map_err(|r| match r {
            Refusal::Quota { what, retry_after } => GatewayError::Exhausted {
                message: format!("tenant `{}` is over its {what} quota", tenant.id),
                retry_after: std::time::Duration::from_secs_f64(retry_after),
            },
            Refusal::Unauthenticated => GatewayError::Unauthenticated,
        })?;
        // Until the stream is handed over, a failure or the caller going away (this future
        // dropped while fetching images or encoding them) gives the tokens back: nothing was
        // generated. The request and its images stay charged, as that work was done.
        let refund = Refund { gw: Some(self.clone()), tenant: tenant.id.clone(), tokens };
        let result = self.start_admitted(tenant, prep, deadline, started, api, in_flight).await;
        if result.is_ok() {
            refund.disarm();
        }
        result
    }

    /// [`Self::start`] once the tenant has been charged: images, decoder, relays.
    async fn start_admitted(
        self: &Arc<Self>,
        tenant: &Tenant,
        mut prep: Prepared,
        deadline: Instant,
        started: Instant,
        api: &'static str,
        in_flight: InFlightRequest,
    ) -> Result<ChatStream, GatewayError> {
        self.vision_retries.deposit();
        self.decoder_retries.deposit();
        let span = tracing::Span::current();
        span.record("gen_ai.usage.input_tokens", prep.prompt.ids.len());

        // The request's id from the start: the vision tier logs it too (`x-request-id`).
        let request_id = next_request_id();
        span.record("gen_ai.response.id", request_id.as_str());
        let t_vision = Instant::now();
        let mut embedded = None;
        if !prep.images.is_empty() {
            if !self.vision.is_configured() {
                return Err(GatewayError::Unavailable(
                    "this gateway has no vision tier configured".into(),
                ));
            }
            if !prep.remote_images.is_empty() {
                let urls: Vec<_> = prep.remote_images.iter().map(|(_, u)| u.clone()).collect();
                let fetched = self.fetcher.fetch_all(&urls, deadline).await?;
                prep.fill_remote_images(fetched);
            }
            let e = tokio::time::timeout_at(
                deadline.into(),
                self.embed_images(
                    &request_id,
                    &tenant.salt,
                    &prep.images,
                    &prep.image_digests,
                    false,
                    deadline,
                ),
            )
            .await
            .map_err(|_| deadline_error("image encoding"))??;
            embedded = Some(e);
        }
        let mut request = GenerateRequest {
            request_id,
            prompt_token_ids: prep.prompt.ids.clone(),
            images: slots(&prep, embedded.as_ref()),
            sampling: Some((&prep.sampling).into()),
            stop_token_ids: stop_ids(&prep, self.model.tokenizer.special().eos),
            // At least one: with `echo` and max_tokens 0 the first token brings the prompt's
            // figures and is dropped.
            max_new_tokens: prep.max_new_tokens.max(1),
            min_new_tokens: prep.output.min_tokens,
            logprobs: prep.output.logprobs,
            cache_salt: match &prep.cache_salt {
                None => tenant.salt.clone().into(),
                // The request's salt within its tenant's: requests share cached blocks only
                // when both match.
                Some(own) => {
                    let mut both = tenant.salt.clone();
                    both.extend_from_slice(own.as_bytes());
                    blake3::derive_key("dsvl 2026 request cache salt v1", &both).to_vec().into()
                }
            },
            constraint: prep.constraint.clone(),
            top_logprobs: prep.output.top_logprobs,
            // Choice 0 computes them; the other choices echo the same.
            prompt_logprobs: prep.scores_prompt(),
            prompt_top_logprobs: Some(prep.prompt_top_logprobs()),
            priority: prep.priority,
            allowed_token_ids: prep.output.allowed_token_ids.clone().unwrap_or_default(),
            bad_words: prep
                .bad_words
                .iter()
                .map(|ids| dsvl_proto::internal::TokenSequence { ids: ids.clone() })
                .collect(),
        };
        let vision_seconds = t_vision.elapsed().as_secs_f64();
        let opened = match self.open_decoder(&request, deadline).await {
            Ok(o) => o,
            Err(OpenError::Reencode(why)) if embedded.is_some() => {
                tracing::info!(
                    why,
                    "decoder cannot read the embedding references; sending them inline"
                );
                metrics::counter!("dsvl_gateway_reencodes_total").increment(1);
                let e = tokio::time::timeout_at(
                    deadline.into(),
                    self.embed_images(
                        &request.request_id,
                        &tenant.salt,
                        &prep.images,
                        &prep.image_digests,
                        true,
                        deadline,
                    ),
                )
                .await
                .map_err(|_| deadline_error("image encoding"))??;
                request.images = slots(&prep, Some(&e));
                embedded = Some(e);
                match self.open_decoder(&request, deadline).await {
                    Ok(o) => o,
                    Err(OpenError::Reencode(why)) => {
                        return Err(GatewayError::Internal(format!(
                            "decoder refused inline embeddings: {why}"
                        )))
                    }
                    Err(OpenError::Fatal(e)) => return Err(e),
                }
            }
            Err(OpenError::Reencode(why)) => {
                return Err(GatewayError::Internal(format!("decoder: {why}")))
            }
            Err(OpenError::Fatal(e)) => return Err(e),
        };
        metrics::histogram!("dsvl_time_to_first_token_seconds", "api" => api)
            .record(started.elapsed().as_secs_f64());
        let timing = Timing {
            tokenize_seconds: prep.tokenize_seconds,
            vision_seconds,
            decoder_first_token_seconds: opened.first_token_seconds,
            total_seconds: 0.0,
            images_cached: embedded.as_ref().map_or(0, |e| e.cached),
        };
        // The prompt's scores, when asked for, from choice 0's first event: under `echo` with
        // `logprobs` k alternatives each, under `prompt_logprobs` its own count.
        let scores = if prep.scores_prompt() {
            self.prompt_logprobs(&prep.prompt.ids, &opened.first)?
        } else {
            Vec::new()
        };
        let cut = |k: u32| -> Vec<TokenLogprob> {
            let mut v = scores.clone();
            for e in &mut v {
                e.top.truncate(k as usize);
            }
            v
        };
        let echo = prep.echo_text.as_ref().map(|text| Delta {
            index: 0,
            text: text.clone(),
            token_ids: Vec::new(),
            prompt_tokens: prep.prompt.ids.len() as u32,
            // Completions' echo scores the prompt it echoes; chat's echoes text alone.
            logprobs: if prep.output.echo && prep.output.logprobs {
                let mut v = cut(prep.output.top_logprobs);
                v.iter_mut().for_each(|e| e.rank = None);
                v
            } else {
                Vec::new()
            },
        });
        let prompt_scores = prep.output.prompt_logprobs.map(|k| Arc::new(cut(k)));
        let mut choices = vec![opened];
        // With max_tokens 0 every choice is the echo alone: choice 0's stream gave the
        // prompt's figures, and the others need no decoder work.
        if prep.output.n > 1 && prep.max_new_tokens > 0 {
            choices
                .extend(self.open_siblings(&choices[0].replica, &request, &prep, deadline).await?);
        }
        // Every choice's decoder has the images' embeddings: the bytes (up to --max-image-mib
        // each) are not held for the rest of the generation.
        prep.images = Vec::new();
        let (tx, rx) = mpsc::channel(64);
        let gw = self.clone();
        let tenant_id = tenant.id.clone();
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let before = |i: u32| Preamble {
                    echo: echo.clone().map(|e| Delta { index: i, ..e }),
                    prompt_logprobs: prompt_scores.clone(),
                };
                let outcome = if prep.max_new_tokens == 0 {
                    gw.echo_only(choices, &before, &prep, timing, started, &tx).await
                } else {
                    let relays = choices.into_iter().enumerate().map(|(i, opened)| {
                        gw.relay(
                            opened,
                            i as u32,
                            before(i as u32),
                            &prep,
                            timing,
                            deadline,
                            started,
                            api,
                            &tx,
                            &tenant_id,
                        )
                    });
                    futures::future::join_all(relays)
                        .await
                        .into_iter()
                        .collect::<Result<Vec<()>, GatewayError>>()
                        .map(|_| ())
                };
                let label = match &outcome {
                    Ok(()) => "ok",
                    Err(e) => e.outcome(),
                };
                metrics::counter!("dsvl_requests_total", "api" => api, "outcome" => label)
                    .increment(1);
                metrics::histogram!("dsvl_e2e_latency_seconds", "api" => api)
                    .record(started.elapsed().as_secs_f64());
                if let Err(e) = outcome {
                    tracing::Span::current().record("error.type", e.outcome());
                    let _ = tx.send(Err(e)).await;
                }
            }
            .instrument(span),
        );
        Ok(rx)
    }

    /// The usable decoder groups in the order to try them, each with the prompt's block
    /// hashes at its block size: least outstanding work first, except that with prefix-aware
    /// routing the group holding the longest prefix goes first unless it is much busier.
    fn decoder_order(&self, request: &GenerateRequest) -> Vec<(Arc<Replica>, Vec<BlockHash>)> {
        let groups: Vec<Arc<Replica>> =
            self.decoder.by_least_work().into_iter().filter(|r| r.usable()).collect();
        // Hashing and recording only matter when there is a choice to make by prefix.
        let Some(imbalance) = self.config.prefix_routing.filter(|_| groups.len() > 1) else {
            return groups.into_iter().map(|r| (r, Vec::new())).collect();
        };
        let key = RouteKey {
            salt: request.cache_salt.to_vec(),
            tokens: request.prompt_token_ids.clone(),
            images: dsvl_proto::convert::prefix_spans(&request.images, self.model.image_tokens),
        };
        let hashes = prefix_route::hashes_by_group(&key, &groups);
        let mut order: Vec<_> = groups.into_iter().zip(hashes).collect();
        let work: Vec<usize> = order.iter().map(|(r, _)| self.decoder.work(r)).collect();
        let matched: Vec<usize> = order
            .iter()
            .map(|(r, h)| r.prefix.lock().expect("prefix lock poisoned. This is a bug.").matched(h))
            .collect();
        let (first, why) = prefix_route::choose(&work, &matched, imbalance);
        metrics::counter!("dsvl_gateway_prefix_routes_total", "choice" => why.label()).increment(1);
        let chosen = order.remove(first);
        order.insert(0, chosen);
        order
    }

    /// Opens a decoder stream on the group [`Self::decoder_order`] puts first (the next ones
    /// on retryable failures) and waits for its first token.
    async fn open_decoder(
        &self,
        request: &GenerateRequest,
        deadline: Instant,
    ) -> Result<Opened, OpenError> {
        let routing = Instant::now();
        let candidates = self.decoder_order(request);
        metrics::histogram!("dsvl_gateway_routing_seconds", "tier" => "decoder")
            .record(routing.elapsed().as_secs_f64());
        let mut last = GatewayError::Unavailable("no healthy decoder group".into());
        for (attempt, (r, hashes)) in candidates.into_iter().enumerate() {
            if attempt > 0 {
                if !self.decoder_retries.withdraw() {
                    break;
                }
                metrics::counter!("dsvl_gateway_retries_total", "tier" => "decoder").increment(1);
            }
            if !r.breaker.allow() {
                continue;
            }
            let guard = InflightGuard::new(r.clone());
            let t = Instant::now();
            match call_decoder(&r, request, deadline).await {
                Err(_) => return Err(OpenError::Fatal(deadline_error("the decoder's prefill"))),
                Ok(Ok((stream, Some(first)))) => {
                    r.breaker.success();
                    // The group now holds (or soon will) this prompt's blocks.
                    if !hashes.is_empty() {
                        r.prefix
                            .lock()
                            .expect("prefix lock poisoned. This is a bug.")
                            .insert(&hashes);
                    }
                    let first_token_seconds = t.elapsed().as_secs_f64();
                    metrics::histogram!("dsvl_upstream_latency_seconds", "tier" => "decoder")
                        .record(first_token_seconds);
                    return Ok(Opened { stream, first, guard, first_token_seconds, replica: r });
                }
                Ok(Ok((_, None))) => {
                    r.breaker.failure();
                    last = GatewayError::Unavailable(format!(
                        "decoder {} closed the stream without a token",
                        r.addr
                    ));
                }
                Ok(Err(s)) if dsvl_proto::convert::asks_to_reencode(&s) => {
                    return Err(OpenError::Reencode(s.message().to_string()))
                }
                Ok(Err(s)) => match s.code() {
                    Code::Unavailable | Code::Unknown => {
                        tracing::warn!(replica = %r.addr, message = s.message(), "decoder group failed before the first token; retrying elsewhere");
                        r.breaker.failure();
                        last = GatewayError::from_upstream("decoder", &s);
                    }
                    Code::ResourceExhausted => last = GatewayError::from_upstream("decoder", &s),
                    _ => return Err(OpenError::Fatal(GatewayError::from_upstream("decoder", &s))),
                },
            }
        }
        Err(OpenError::Fatal(last))
    }

    /// Choices 1..n of a request whose choice 0 is open on `replica`: the same prompt (its
    /// blocks now in that group's prefix cache) with seeds `seed + i`, opened at once. No
    /// retry elsewhere: another group would prefill the prompt again.
    async fn open_siblings(
        &self,
        replica: &Arc<Replica>,
        request: &GenerateRequest,
        prep: &Prepared,
        deadline: Instant,
    ) -> Result<Vec<Opened>, GatewayError> {
        let opens = (1..prep.output.n).map(|i| {
            let mut req = request.clone();
            req.request_id = format!("{}.{i}", request.request_id);
            // From the prefix cache: choice 0's prompt log-probabilities serve every choice.
            req.prompt_logprobs = false;
            if let Some(s) = req.sampling.as_mut() {
                s.seed = s.seed.wrapping_add(u64::from(i));
            }
            async move {
                let guard = InflightGuard::new(replica.clone());
                let t = Instant::now();
                match call_decoder(replica, &req, deadline).await {
                    Err(_) => Err(deadline_error("the decoder's prefill")),
                    Ok(Ok((stream, Some(first)))) => Ok(Opened {
                        stream,
                        first,
                        guard,
                        first_token_seconds: t.elapsed().as_secs_f64(),
                        replica: replica.clone(),
                    }),
                    Ok(Ok((_, None))) => Err(GatewayError::Unavailable(format!(
                        "decoder {} closed the stream without a token",
                        replica.addr
                    ))),
                    Ok(Err(s)) => Err(GatewayError::from_upstream("decoder", &s)),
                }
            }
        });
        futures::future::join_all(opens).await.into_iter().collect()
    }

    /// The reply of max_tokens 0 under `echo`: each of the `n` choices is the prompt and its
    /// figures alone. Choice 0's stream (`choices`, dropped here) brought them; dropping it
    /// cancels the token it was asked for.
    async fn echo_only(
        &self,
        choices: Vec<Opened>,
        before: &impl Fn(u32) -> Preamble,
        prep: &Prepared,
        mut timing: Timing,
        started: Instant,
        tx: &mpsc::Sender<Result<ChatEvent, GatewayError>>,
    ) -> Result<(), GatewayError> {
        let cached_tokens = match choices.first().map(|c| &c.first.event) {
            Some(Some(DecoderEvent::Token(t))) => t.cached_tokens,
            _ => 0,
        };
        drop(choices);
        timing.total_seconds = started.elapsed().as_secs_f64();
        let send =
            |ev: ChatEvent| async { tx.send(Ok(ev)).await.map_err(|_| GatewayError::Cancelled) };
        for index in 0..prep.output.n {
            let Preamble { echo, prompt_logprobs } = before(index);
            if let Some(echo) = echo {
                send(ChatEvent::Delta(echo)).await?;
            }
            tracing::info!(
                choice = index,
                prompt_tokens = prep.prompt.ids.len(),
                completion_tokens = 0,
                finish_reason = "length",
                seconds = timing.total_seconds,
                "request finished"
            );
            send(ChatEvent::Finish(Finish {
                index,
                finish_reason: "length".into(),
                stop_reason: None,
                prompt_tokens: prep.prompt.ids.len() as u32,
                completion_tokens: 0,
                timing,
                token_ids: Vec::new(),
                prompt_token_ids: prep.returned_prompt_ids(),
                cached_tokens,
                prompt_logprobs,
            }))
            .await?;
        }
        Ok(())
    }

    /// Streams the decoder's tokens to `tx` as text deltas, after `before.echo` (the prompt,
    /// under completions' `echo`), until the end, a stop string, the deadline, or the client
    /// leaving; the finish carries `before.prompt_logprobs`.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        opened: Opened,
        index: u32,
        before: Preamble,
        prep: &Prepared,
        mut timing: Timing,
        deadline: Instant,
        started: Instant,
        api: &'static str,
        tx: &mpsc::Sender<Result<ChatEvent, GatewayError>>,
        tenant: &str,
    ) -> Result<(), GatewayError> {
        let Opened { mut stream, first, guard: _guard, .. } = opened;
        let prompt_len = prep.prompt.ids.len() as u32;
        let tok = &self.model.tokenizer;
        let mut detok = IncrementalDecoder::new(true);
        let mut stops = StopText::new(&prep.stop, prep.output.include_stop_str);
        let mut all_ids = Vec::new();
        let mut unsent_ids = Vec::new();
        let mut unsent_logprobs = Vec::new();
        let mut last_token: Option<Instant> = None;
        let mut cached_tokens = 0;
        let mut next = Some(first);
        let send =
            |ev: ChatEvent| async { tx.send(Ok(ev)).await.map_err(|_| GatewayError::Cancelled) };
        let Preamble { echo, prompt_logprobs } = before;
        if let Some(echo) = echo {
            send(ChatEvent::Delta(echo)).await?;
        }
        let (reason, usage, stop_reason) = loop {
            let msg = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    () = tx.closed() => return Err(GatewayError::Cancelled),
                    r = tokio::time::timeout_at(deadline.into(), stream.message()) => match r {
                        Err(_) => return Err(deadline_error("generation")),
                        Ok(Err(s)) => return Err(GatewayError::from_upstream("decoder", &s)),
                        Ok(Ok(None)) => return Err(GatewayError::Unavailable("decoder stream ended without a finish".into())),
                        Ok(Ok(Some(m))) => m,
                    },
                },
            };
            match msg.event {
                Some(DecoderEvent::Token(t)) => {
                    if t.index == 0 {
                        cached_tokens = t.cached_tokens;
                    }
                    let now = Instant::now();
                    if let Some(prev) = last_token.replace(now) {
                        metrics::histogram!("dsvl_inter_token_latency_seconds", "api" => api)
                            .record((now - prev).as_secs_f64());
                    }
                    all_ids.push(t.id);
                    unsent_ids.push(t.id);
                    if prep.output.logprobs {
                        unsent_logprobs.push(self.token_logprob(&t));
                    }
                    // A `stop_token_ids` id that ends the reply leaves its text out,
                    // unless `include_stop_str_in_output` (vLLM's rule; EOS is special,
                    // so its text is skipped anyway).
                    let ends_unshown = !prep.output.include_stop_str
                        && all_ids.len() > prep.output.min_tokens as usize
                        && prep.output.stop_token_ids.contains(&t.id);
                    let piece = if ends_unshown {
                        None
                    } else {
                        detok.push(tok, t.id).map_err(|e| GatewayError::Internal(e.to_string()))?
                    };
                    if let Some(piece) = piece {
                        // Under `min_tokens`, the text of the first tokens is not searched
                        // for stop strings (vLLM's rule).
                        let released = if all_ids.len() <= prep.output.min_tokens as usize {
                            crate::stops::Released { text: piece, stopped: false }
                        } else {
                            stops.push(&piece)
                        };
                        if !released.text.is_empty() || released.stopped {
                            send(ChatEvent::Delta(Delta {
                                index,
                                text: released.text,
                                token_ids: std::mem::take(&mut unsent_ids),
                                logprobs: std::mem::take(&mut unsent_logprobs),
                                prompt_tokens: prompt_len,
                            }))
                            .await?;
                        }
                        if released.stopped {
                            // Dropping the stream (on return) cancels the decoder's work.
                            let matched = stops.matched().unwrap_or_default().to_string();
                            break ("stop", None, Some(StopReason::String(matched)));
                        }
                    }
                }
                Some(DecoderEvent::Finish(f)) => {
                    let mut text = String::new();
                    if let Some(rest) =
                        detok.finish(tok).map_err(|e| GatewayError::Internal(e.to_string()))?
                    {
                        if all_ids.len() <= prep.output.min_tokens as usize {
                            text.push_str(&rest);
                        } else {
                            text.push_str(&stops.push(&rest).text);
                        }
                    }
                    // A stop string completed by the last characters ends it with `stop`.
                    let matched = stops.matched().map(|m| StopReason::String(m.to_string()));
                    text.push_str(&stops.finish());
                    if !text.is_empty() || !unsent_ids.is_empty() {
                        send(ChatEvent::Delta(Delta {
                            index,
                            text,
                            token_ids: std::mem::take(&mut unsent_ids),
                            logprobs: std::mem::take(&mut unsent_logprobs),
                            prompt_tokens: prompt_len,
                        }))
                        .await?;
                    }
                    let last = all_ids.last().copied();
                    let by_token = last
                        .filter(|id| prep.output.stop_token_ids.contains(id))
                        .map(StopReason::TokenId);
                    let reason = if f.reason == FinishReason::Length as i32 && matched.is_none() {
                        "length"
                    } else {
                        "stop"
                    };
                    let stop_reason = if reason == "stop" { matched.or(by_token) } else { None };
                    break (reason, f.usage, stop_reason);
                }
                None => return Err(GatewayError::Internal("decoder sent an empty event".into())),
            }
        };
        timing.total_seconds = started.elapsed().as_secs_f64();
        let span = tracing::Span::current();
        span.record("gen_ai.usage.output_tokens", all_ids.len());
        span.record("gen_ai.response.finish_reasons", reason);
        let prompt_tokens = usage.map_or(prep.prompt.ids.len() as u32, |u| u.prompt_tokens);
        // The access log line: one per answered choice, with the request id and trace ids
        // of the enclosing request span in JSON logs.
        tracing::info!(
            choice = index,
            prompt_tokens,
            completion_tokens = all_ids.len(),
            finish_reason = reason,
            seconds = timing.total_seconds,
            "request finished"
        );
        // Reconcile before the client hears of the end (its next request sees the credit):
        // the tenant paid for `max_new_tokens` of output up front.
        self.credit(tenant, (prep.max_new_tokens as usize).saturating_sub(all_ids.len())).await;
        send(ChatEvent::Finish(Finish {
            index,
            finish_reason: reason.into(),
            stop_reason,
            prompt_tokens,
            completion_tokens: all_ids.len() as u32,
            timing,
            token_ids: all_ids,
            prompt_token_ids: prep.returned_prompt_ids(),
            cached_tokens: usage.map_or(cached_tokens, |u| u.cached_tokens),
            prompt_logprobs,
        }))
        .await
    }
}

impl Gateway {
    /// A token event's log-probabilities with the tokens' texts.
    fn token_logprob(&self, t: &dsvl_proto::internal::TokenEvent) -> TokenLogprob {
        let alt = |id: u32, logprob: f32| Alternative {
            id,
            text: self.model.tokenizer.decode(&[id], false).unwrap_or_default(),
            logprob,
        };
        TokenLogprob {
            token: alt(t.id, t.logprob),
            top: t.top_logprobs.iter().map(|a| alt(a.id, a.logprob)).collect(),
            unscored: false,
            rank: None,
            hidden: self.hidden(t.id),
        }
    }

    /// Whether the choice's text leaves `id`'s text out (special tokens are skipped).
    fn hidden(&self, id: u32) -> bool {
        self.model.tokenizer.decode(&[id], true).is_ok_and(|text| text.is_empty())
    }

    /// The prompt tokens' log-probabilities as choice 0's first decoder event carries them:
    /// the first token unscored, then one entry per later position.
    ///
    /// # Errors
    /// The event does not score every later position of `prompt` (a decoder that predates
    /// `prompt_logprobs` ignores the field: better a clear error than an echo without figures).
    fn prompt_logprobs(
        &self,
        prompt: &[u32],
        first: &GenerateResponse,
    ) -> Result<Vec<TokenLogprob>, GatewayError> {
        let alt = |id: u32, logprob: f32| Alternative {
            id,
            text: self.model.tokenizer.decode(&[id], false).unwrap_or_default(),
            logprob,
        };
        let scored = match &first.event {
            Some(DecoderEvent::Token(t)) => t.prompt_logprobs.as_slice(),
            _ => &[],
        };
        let ids_match = scored.iter().map(|p| p.id).eq(prompt.iter().skip(1).copied());
        if !ids_match {
            return Err(GatewayError::Internal(format!(
                "the decoder scored {} of the prompt's {} later tokens (is it older than this gateway?)",
                scored.len(),
                prompt.len().saturating_sub(1)
            )));
        }
        let head = prompt.first().map(|&id| TokenLogprob {
            token: alt(id, 0.0),
            top: Vec::new(),
            unscored: true,
            rank: None,
            hidden: self.hidden(id),
        });
        Ok(head
            .into_iter()
            .chain(scored.iter().map(|p| TokenLogprob {
                token: alt(p.id, p.logprob),
                top: p.top_logprobs.iter().map(|a| alt(a.id, a.logprob)).collect(),
                unscored: false,
                rank: Some(p.rank),
                hidden: self.hidden(p.id),
            }))
            .collect())
    }
}

/// The ids that end generation: EOS (unless `ignore_eos`) and the request's `stop_token_ids`.
fn stop_ids(prep: &Prepared, eos: u32) -> Vec<u32> {
    let mut ids = prep.output.stop_token_ids.clone();
    if !prep.output.ignore_eos {
        ids.push(eos);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Opens a `Generate` stream on `r` and waits for its first message; `Err` when the deadline
/// passes first.
async fn call_decoder(
    r: &Replica,
    request: &GenerateRequest,
    deadline: Instant,
) -> Result<
    Result<(Streaming<GenerateResponse>, Option<GenerateResponse>), tonic::Status>,
    tokio::time::error::Elapsed,
> {
    let mut req = tonic::Request::new(request.clone());
    req.set_timeout(deadline.saturating_duration_since(Instant::now()));
    dsvl_telemetry::inject_trace_context(req.metadata_mut());
    let mut client = DecoderClient::new(r.channel.clone())
        .max_decoding_message_size(MAX_UPSTREAM_MESSAGE)
        .max_encoding_message_size(MAX_UPSTREAM_MESSAGE);
    let call = async {
        let mut stream = client.generate(req).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    tokio::time::timeout_at(deadline.into(), call).await
}

fn slots(prep: &Prepared, embedded: Option<&crate::images::Embedded>) -> Vec<ImageSlot> {
    let Some(e) = embedded else { return Vec::new() };
    prep.prompt
        .image_spans
        .iter()
        .zip(&e.embeddings)
        .map(|(&(start, _), emb)| ImageSlot {
            position: start as u32,
            embedding: Some(emb.clone()),
        })
        .collect()
}

/// A process-unique request id (`gw-<start time>-<counter>`).
fn next_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<u64> = OnceLock::new();
    let epoch = EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    });
    format!("gw-{epoch:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The request's span, with the OpenTelemetry GenAI attributes (prompt and image content are
/// never recorded).
pub fn request_span(
    served_model: &str,
    input: &ChatInput,
    tenant: &str,
    api: &'static str,
) -> tracing::Span {
    tracing::info_span!(
        "chat",
        otel.kind = "server",
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = "deepseek",
        gen_ai.request.model = if input.model.is_empty() { served_model } else { input.model.as_str() },
        gen_ai.response.model = served_model,
        gen_ai.request.max_tokens = input.max_tokens.unwrap_or(0),
        gen_ai.request.temperature = f64::from(input.sampling.temperature.unwrap_or(SamplingParams::DEFAULTS.temperature)),
        gen_ai.request.top_p = f64::from(input.sampling.top_p.unwrap_or(SamplingParams::DEFAULTS.top_p)),
        gen_ai.response.id = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        error.type = tracing::field::Empty,
        dsvl.api = api,
        dsvl.tenant = tenant,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn in_flight_caps_refuse_with_resource_exhausted_and_free_on_drop() {
        let args = crate::Args::parse_from([
            "dsvl-gateway",
            "--decoder",
            "127.0.0.1:1",
            "--allow-unauthenticated",
            "--insecure",
            "--max-in-flight",
            "3",
            "--tenant-max-concurrency",
            "2",
        ]);
        let config = crate::GatewayConfig::try_from(&args).unwrap();
        let gw = Arc::new(Gateway::new(config, dsvl_telemetry::server::Drain::new()).unwrap());
        let a1 = InFlightRequest::new(&gw, "acme").unwrap();
        let _a2 = InFlightRequest::new(&gw, "acme").unwrap();
        let e = InFlightRequest::new(&gw, "acme").err().expect("tenant cap");
        assert!(
            matches!(&e, GatewayError::Exhausted { message, .. } if message.contains("tenant `acme`")),
            "{e:?}"
        );
        let _g1 = InFlightRequest::new(&gw, "globex").unwrap();
        let e = InFlightRequest::new(&gw, "globex").err().expect("gateway cap");
        assert!(
            matches!(&e, GatewayError::Exhausted { message, .. } if message.contains("limit of 3")),
            "{e:?}"
        );
        assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.http_parts().0, 429);
        drop(a1);
        let _a3 = InFlightRequest::new(&gw, "acme").expect("a slot came back");
    }
}
