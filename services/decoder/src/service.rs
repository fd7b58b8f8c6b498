//! The `dsvl.internal.v1.Decoder` gRPC service: validation, embeddings in, the engine's event stream out.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use dsvl_cache::RedisCache;
use dsvl_core::prefix::ImageSpan;
use dsvl_core::sampling::MAX_TOP_LOGPROBS;

/// Most stop token ids one request may carry.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// Most `bad_words` sequences per request (each is checked at every step of the sequence).
pub const MAX_BAD_WORDS: usize = 256;
/// Most tokens in one `bad_words` sequence.
pub const MAX_BAD_WORD_TOKENS: usize = 64;
use dsvl_engine::constraint::{Constraint, Grammar};
use dsvl_engine::engine::EngineHandle;
use dsvl_engine::scheduler::{Event, NewRequest, PrefixKey};
use dsvl_engine::{FinishReason, SamplingParams, TokenFilter};
use dsvl_models::llm::ImageRows;
use dsvl_proto::internal::decoder_server::Decoder;
use dsvl_proto::internal::generate_response::Event as Out;
use dsvl_proto::internal::{
    FinishEvent, GenerateRequest, GenerateResponse, LoadRequest, LoadResponse, PromptTokenLogprob,
    TokenEvent, TopLogprob, Usage,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::embeddings;
use crate::error::ServiceError;
use crate::group::ModelInfo;

/// The running group, once it has started.
pub struct Ready {
    pub(crate) engine: EngineHandle,
    pub(crate) info: ModelInfo,
}

/// Shared by all requests.
pub struct DecoderService {
    pub(crate) ready: Arc<std::sync::OnceLock<Ready>>,
    pub(crate) cache: Option<Arc<RedisCache>>,
    pub(crate) seal: dsvl_core::EmbeddingSeal,
    pub(crate) max_waiting: usize,
    pub(crate) drain: Arc<dsvl_telemetry::server::Drain>,
}

impl DecoderService {
    fn state(&self) -> Result<&Ready, ServiceError> {
        if self.drain.is_draining() {
            return Err(ServiceError::Draining);
        }
        let r = self.ready.get().ok_or(ServiceError::Starting)?;
        if !r.engine.is_alive() {
            return Err(ServiceError::GroupFailed);
        }
        Ok(r)
    }
}

impl Ready {
    fn validate(&self, req: &GenerateRequest) -> Result<(), ServiceError> {
        let n = req.prompt_token_ids.len();
        if n == 0 {
            return Err(ServiceError::InvalidArgument("empty prompt".into()));
        }
        if n + 1 > self.info.max_positions {
            return Err(ServiceError::InvalidArgument(format!(
                "the prompt has {n} tokens; the model takes at most {} positions",
                self.info.max_positions
            )));
        }
        if let Some(bad) =
            req.prompt_token_ids.iter().find(|&&t| t as usize >= self.info.vocab_size)
        {
            return Err(ServiceError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.info.vocab_size
            )));
        }
        if req.max_new_tokens == 0 {
            // Resolved by the caller (the gateway resolves its API's "unset"): no default here.
            return Err(ServiceError::InvalidArgument("max_new_tokens must be at least 1".into()));
        }
        if req.min_new_tokens > req.max_new_tokens {
            return Err(ServiceError::InvalidArgument(format!(
                "min_new_tokens is {}, more than max_new_tokens {}",
                req.min_new_tokens, req.max_new_tokens
            )));
        }
        let constrained = req.constraint.as_ref().is_some_and(|c| c.kind.is_some());
        if req.min_new_tokens > 0 && constrained {
            return Err(ServiceError::InvalidArgument(
                "min_new_tokens cannot be combined with a constraint: the grammar decides where \
                 the output ends"
                    .into(),
            ));
        }
        if constrained && !(req.allowed_token_ids.is_empty() && req.bad_words.is_empty()) {
            return Err(ServiceError::InvalidArgument(
                "allowed_token_ids and bad_words cannot be combined with a constraint: the \
                 grammar decides which tokens may come"
                    .into(),
            ));
        }
        if req.allowed_token_ids.len() > self.info.vocab_size {
            return Err(ServiceError::InvalidArgument(format!(
                "{} allowed_token_ids; at most the vocabulary's {}",
                req.allowed_token_ids.len(),
                self.info.vocab_size
            )));
        }
        if req.bad_words.len() > MAX_BAD_WORDS {
            return Err(ServiceError::InvalidArgument(format!(
                "{} bad_words; at most {MAX_BAD_WORDS}",
                req.bad_words.len()
            )));
        }
        if let Some(w) =
            req.bad_words.iter().find(|w| w.ids.is_empty() || w.ids.len() > MAX_BAD_WORD_TOKENS)
        {
            return Err(ServiceError::InvalidArgument(format!(
                "a bad word of {} tokens; each has 1 to {MAX_BAD_WORD_TOKENS}",
                w.ids.len()
            )));
        }
        let filtered =
            req.allowed_token_ids.iter().chain(req.bad_words.iter().flat_map(|w| &w.ids));
        if let Some(bad) = filtered.clone().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(ServiceError::InvalidArgument(format!(
                "allowed_token_ids / bad_words: token id {bad} is outside the vocabulary of {}",
                self.info.vocab_size
            )));
        }
        let sampling = req
            .sampling
            .as_ref()
            .ok_or_else(|| ServiceError::InvalidArgument("sampling is required".into()))?;
        let params = SamplingParams::from(sampling);
        params
            .validate()
            .and_then(|()| params.validate_vocab(self.info.vocab_size))
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        // Checked at every step of the sequence: a hostile caller's ten million ids would cost
        // ten million comparisons per token (the gateway itself sends at most 64).
        if req.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ServiceError::InvalidArgument(format!(
                "{} stop_token_ids; at most {MAX_STOP_TOKEN_IDS}",
                req.stop_token_ids.len()
            )));
        }
        for (field, asked) in [
            ("top_logprobs", req.top_logprobs),
            ("prompt_top_logprobs", req.prompt_top_logprobs.unwrap_or(0)),
        ] {
            if asked > MAX_TOP_LOGPROBS {
                return Err(ServiceError::InvalidArgument(format!(
                    "{field} is {asked}; at most {MAX_TOP_LOGPROBS}"
                )));
            }
        }
        Ok(())
    }

    /// The request's grammar compiled (on a blocking thread: a large schema takes a while), or
    /// INVALID_ARGUMENT naming what is wrong with it.
    async fn constraint(&self, req: &GenerateRequest) -> Result<Option<Constraint>, ServiceError> {
        use dsvl_proto::internal::constraint::Kind;
        let Some(kind) = req.constraint.as_ref().and_then(|c| c.kind.clone()) else {
            return Ok(None);
        };
        let grammar = match kind {
            Kind::JsonSchema(text) => {
                Grammar::JsonSchema(serde_json::from_str(&text).map_err(|e| {
                    ServiceError::InvalidArgument(format!("invalid JSON schema: not JSON: {e}"))
                })?)
            }
            Kind::JsonObject(_) => Grammar::JsonObject,
            Kind::Regex(rx) => Grammar::Regex(rx),
            Kind::Lark(lark) => Grammar::Lark(lark),
        };
        let compiler = self.info.constraints.clone();
        tokio::task::spawn_blocking(move || compiler.compile(&grammar))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .map(Some)
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))
    }

    /// Image rows at their positions, and each image's span with its content key (for the
    /// prefix cache: the embedding-cache key of a ref, the BLAKE3 of inline data); checks the
    /// slots against the prompt.
    async fn images(
        &self,
        req: &GenerateRequest,
        cache: Option<&Arc<RedisCache>>,
        seal: &dsvl_core::EmbeddingSeal,
    ) -> Result<Option<(ImageRows, Vec<ImageSpan>)>, ServiceError> {
        let image_token = self.info.vision.as_ref().map(|(t, _)| *t);
        let slots_in_prompt =
            image_token.map_or(0, |t| req.prompt_token_ids.iter().filter(|&&x| x == t).count());
        if req.images.is_empty() {
            if slots_in_prompt > 0 {
                return Err(ServiceError::InvalidArgument(format!(
                    "the prompt has {slots_in_prompt} image-token positions but no images"
                )));
            }
            return Ok(None);
        }
        let Some(image_token) = image_token else {
            return Err(ServiceError::InvalidArgument(
                "this model is text-only: it cannot take images".into(),
            ));
        };
        let k = self.info.image_tokens;
        // The count first, before anything is sized from the request's slot list.
        if req.images.len().checked_mul(k) != Some(slots_in_prompt) {
            return Err(ServiceError::InvalidArgument(format!(
                "{slots_in_prompt} image-token positions in the prompt but {} images of {k} tokens",
                req.images.len()
            )));
        }
        let mut slots = req.images.clone();
        slots.sort_by_key(|s| s.position);
        let mut positions = Vec::with_capacity(slots.len() * k);
        for s in &slots {
            let p = s.position as usize;
            let run = req.prompt_token_ids.get(p..p + k).ok_or_else(|| {
                ServiceError::InvalidArgument(format!("image at {p} runs past the prompt"))
            })?;
            if run.iter().any(|&t| t != image_token) {
                return Err(ServiceError::InvalidArgument(format!(
                    "positions {p}..{} are not all image tokens ({image_token})",
                    p + k
                )));
            }
            if positions.last().is_some_and(|&last: &u32| last as usize >= p) {
                return Err(ServiceError::InvalidArgument("image slots overlap".into()));
            }
            positions.extend((p..p + k).map(|x| x as u32));
        }
        if positions.len() != slots_in_prompt {
            return Err(ServiceError::InvalidArgument(format!(
                "{} image-token positions in the prompt but {} images",
                slots_in_prompt,
                slots.len()
            )));
        }
        let spans = dsvl_proto::convert::prefix_spans(&slots, k);
        let rows = embeddings::fetch(&slots, &self.info, cache, seal, self.info.dtype).await?;
        let rows = Tensor::cat(&rows, 0).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Some((ImageRows { positions, rows }, spans)))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Decoder for DecoderService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let span = tracing::info_span!(
            "decoder.generate",
            request_id = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty
        );
        dsvl_telemetry::extract_trace_context(request.metadata(), &span);
        let started = Instant::now();
        let deadline =
            dsvl_telemetry::answer_by(request.metadata(), started).map_err(ServiceError::from)?;
        let ready = self.state()?;
        let req = request.into_inner();
        span.record("request_id", req.request_id.as_str());
        span.record("prompt_tokens", req.prompt_token_ids.len());
        ready.validate(&req)?;
        if ready.engine.load().occupancy.waiting >= self.max_waiting {
            return Err(ServiceError::Overloaded.into());
        }
        let constraint = ready.constraint(&req).await?;
        let (image, images) = match ready.images(&req, self.cache.as_ref(), &self.seal).await? {
            Some((rows, spans)) => (Some(rows), spans),
            None => (None, Vec::new()),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let max_new = req.max_new_tokens as usize;
        let new = NewRequest {
            prompt: req.prompt_token_ids.clone(),
            image,
            params: req.sampling.as_ref().map(SamplingParams::from).unwrap_or_default(),
            max_new_tokens: max_new,
            stop_ids: req.stop_token_ids.clone(),
            min_new_tokens: req.min_new_tokens as usize,
            priority: req.priority,
            filter: TokenFilter {
                allowed: (!req.allowed_token_ids.is_empty()).then(|| req.allowed_token_ids.clone()),
                bad_words: req.bad_words.iter().map(|w| w.ids.clone()).collect(),
            },
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs as usize,
            deadline,
            keep_logits: false,
            prompt_logprobs: req.prompt_logprobs,
            prompt_top_logprobs: req.prompt_top_logprobs.unwrap_or(req.top_logprobs) as usize,
            events: tx,
            prefix: PrefixKey { salt: req.cache_salt.to_vec(), images },
            constraint,
        };
        ready.engine.submit(new).map_err(|_| Status::from(ServiceError::GroupFailed))?;
        let guard = self.drain.track();
        let logprobs = req.logprobs;
        let stream = async_stream_from(move |yield_tx| async move {
            let _guard = guard;
            let mut index = 0u32;
            // With prompt_logprobs: they come before the first token, and go out on it.
            let mut prompt_entries = Vec::new();
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => match ev { Some(ev) => ev, None => break },
                    // The client went away: drop the engine's receiver now, so even a queued
                    // sequence is dropped at the next step.
                    () = yield_tx.closed() => break,
                };
                let item = match ev {
                    // Never asked for by the service.
                    Event::PromptLogits(_) => continue,
                    Event::PromptLogprobs(entries) => {
                        prompt_entries = entries
                            .into_iter()
                            .map(|e| PromptTokenLogprob {
                                id: e.id,
                                logprob: e.logprob,
                                rank: e.rank,
                                top_logprobs: e
                                    .top
                                    .into_iter()
                                    .map(|(id, logprob)| TopLogprob { id, logprob })
                                    .collect(),
                            })
                            .collect();
                        continue;
                    }
                    Event::Token { id, logprob, top, cached_tokens, .. } => {
                        let e = TokenEvent {
                            id,
                            logprob: if logprobs { logprob.unwrap_or(0.0) } else { 0.0 },
                            index,
                            cached_tokens: cached_tokens.unwrap_or(0) as u32,
                            top_logprobs: top
                                .into_iter()
                                .map(|(id, logprob)| TopLogprob { id, logprob })
                                .collect(),
                            prompt_logprobs: std::mem::take(&mut prompt_entries),
                        };
                        index += 1;
                        Ok(GenerateResponse { event: Some(Out::Token(e)) })
                    }
                    Event::Finished { reason, usage } => {
                        let reason = match reason {
                            FinishReason::Stop => dsvl_proto::internal::FinishReason::Stop,
                            FinishReason::Length | FinishReason::Cancelled => {
                                dsvl_proto::internal::FinishReason::Length
                            }
                        };
                        Ok(GenerateResponse {
                            event: Some(Out::Finish(FinishEvent {
                                reason: reason as i32,
                                usage: Some(Usage {
                                    prompt_tokens: usage.prompt_tokens as u32,
                                    completion_tokens: usage.completion_tokens as u32,
                                    queue_seconds: usage.queue_seconds,
                                    time_to_first_token_seconds: usage.time_to_first_token_seconds,
                                    cached_tokens: usage.cached_tokens as u32,
                                }),
                            })),
                        })
                    }
                    Event::Failed(f) => Err(ServiceError::from(f).into()),
                };
                let last = !matches!(item, Ok(GenerateResponse { event: Some(Out::Token(_)) }));
                if yield_tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        let Some(r) = self.ready.get() else {
            return Ok(Response::new(LoadResponse::default()));
        };
        let l = r.engine.load();
        Ok(Response::new(LoadResponse {
            waiting: l.occupancy.waiting as u32,
            running: l.occupancy.running as u32,
            kv_blocks_used: l.occupancy.blocks_used as u32,
            kv_blocks_total: l.occupancy.blocks_total as u32,
            tokens_per_second: l.tokens_per_second,
            ready: r.engine.is_alive() && !self.drain.is_draining(),
            tensor_parallel: r.info.tp as u32,
            max_positions: r.info.max_positions as u32,
            kv_blocks_cached: l.occupancy.blocks_cached as u32,
            prefix_cache_queried_tokens: l.occupancy.prefix_queried_tokens,
            prefix_cache_hit_tokens: l.occupancy.prefix_hit_tokens,
            kv_block_size: r.info.block_size as u32,
        }))
    }
}

/// A stream fed by a task through a small channel; dropping the stream (client gone) drops the
/// receiver, which ends the task, which drops the engine's event receiver: the scheduler frees
/// the sequence at its next step.
fn async_stream_from<F, Fut>(body: F) -> GenerateStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<GenerateResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
