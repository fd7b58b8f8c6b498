//! `dsvl.v1.Chat` over gRPC: authentication from `authorization` metadata, the deadline from
//! `grpc-timeout`, trace context from `traceparent`, then [`Gateway::chat`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use dsvl_core::sampling::SamplingRequest;
use dsvl_proto::v1::chat_finish;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::chat_server::Chat;
use dsvl_proto::v1::content_part::Part as ProtoPart;
use dsvl_proto::v1::{
    ChatDelta, ChatFinish, ChatRequest, ChatResponse, ListModelsRequest, ListModelsResponse,
    ModelInfo, PromptLogprob, Timing as ProtoTiming, TokenLogprob, TopLogprob,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::chat::{request_span, Alternative, ChatEvent, Finish, StopReason};
use crate::error::GatewayError;
use crate::prepare::{ChatInput, InMessage, OutputOptions, Part, Role, TemplateOptions};
use crate::tenancy::Tenant;
use crate::Gateway;

/// The gRPC front end.
pub struct ChatService {
    /// Shared state.
    pub gateway: Arc<Gateway>,
}

pub(crate) fn to_input(req: ChatRequest) -> Result<ChatInput, GatewayError> {
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        let parts = m
            .content
            .into_iter()
            .map(|p| match p.part {
                Some(ProtoPart::Text(t)) => Ok(Part::Text(t)),
                Some(ProtoPart::Image(b)) => Ok(Part::Image(b)),
                Some(ProtoPart::ImageUrl(url)) => Ok(Part::ImageUrl(url)),
                None => Err(GatewayError::InvalidArgument(
                    "a content part has neither text nor image".into(),
                )),
            })
            .collect::<Result<_, _>>()?;
        messages.push(InMessage { role: Role::parse(&m.role)?, parts });
    }
    Ok(ChatInput {
        model: req.model,
        messages,
        sampling: req.sampling.as_ref().map(SamplingRequest::from).unwrap_or_default(),
        stop: req.stop,
        max_tokens: (req.max_tokens > 0).then_some(req.max_tokens),
        return_prompt_token_ids: req.return_prompt_token_ids,
        raw_prompt: None,
        output: OutputOptions {
            n: req.n,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            include_stop_str: req.include_stop_str_in_output,
            echo: false,
            prompt_logprobs: req.prompt_logprobs,
            allowed_token_ids: (!req.allowed_token_ids.is_empty()).then_some(req.allowed_token_ids),
            bad_words: req.bad_words,
        },
        template: TemplateOptions {
            continue_final_message: req.continue_final_message,
            add_generation_prompt: req.add_generation_prompt,
            echo: false,
        },
        truncate_prompt_tokens: req.truncate_prompt_tokens,
        cache_salt: req.cache_salt,
        priority: req.priority,
        constraint: req
            .output_format
            .and_then(|f| f.kind)
            .map(|k| {
                use dsvl_proto::internal::constraint::Kind;
                use dsvl_proto::v1::output_format::Kind as Public;
                Ok(dsvl_proto::internal::Constraint {
                    kind: Some(match k {
                        Public::JsonSchema(s) => Kind::JsonSchema(s),
                        Public::JsonObject(b) => Kind::JsonObject(b),
                        Public::Regex(r) => Kind::Regex(r),
                        Public::Lark(l) => Kind::Lark(l),
                        Public::Choice(c) => {
                            crate::structured::choice("output_format.choice", &c.options)?
                        }
                    }),
                })
            })
            .transpose()?,
    })
}

fn top_logprob(a: Alternative) -> TopLogprob {
    TopLogprob { id: a.id, token: a.text, logprob: a.logprob }
}

/// The interceptor in front of [`ChatService`]: the API key is checked from the metadata
/// before tonic reads and decodes the request's message (up to tens of MiB), and the tenant
/// rides in the request's extensions.
pub fn authenticate(
    gw: Arc<Gateway>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match gw.tenancy.authenticate(auth) {
            Ok(tenant) => {
                request.extensions_mut().insert(tenant);
                Ok(request)
            }
            Err(_) => {
                metrics::counter!("dsvl_requests_total", "api" => "grpc", "outcome" => "unauthenticated").increment(1);
                Err(GatewayError::Unauthenticated.to_status())
            }
        }
    }
}

/// The tenant [`authenticate`] put in the request.
fn authenticated<T>(request: &Request<T>) -> Result<Tenant, Status> {
    request
        .extensions()
        .get::<Tenant>()
        .cloned()
        .ok_or_else(|| Status::internal("no tenant: the authentication interceptor did not run"))
}

/// The public message of a finished reply.
fn finish_message(f: Finish) -> ChatFinish {
    let t = f.timing;
    ChatFinish {
        finish_reason: f.finish_reason,
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
        timing: Some(ProtoTiming {
            tokenize_seconds: t.tokenize_seconds,
            vision_seconds: t.vision_seconds,
            decoder_first_token_seconds: t.decoder_first_token_seconds,
            total_seconds: t.total_seconds,
            images_cached: t.images_cached,
        }),
        token_ids: f.token_ids,
        prompt_token_ids: f.prompt_token_ids,
        cached_tokens: f.cached_tokens,
        prompt_logprobs: f
            .prompt_logprobs
            .iter()
            .flat_map(|scores| scores.iter().filter(|t| !t.unscored))
            .map(|t| PromptLogprob {
                id: t.token.id,
                token: t.token.text.clone(),
                logprob: t.token.logprob,
                rank: t.rank.unwrap_or(0),
                top: t.top.iter().cloned().map(top_logprob).collect(),
            })
            .collect(),
        stop_reason: f.stop_reason.map(|r| match r {
            StopReason::String(s) => chat_finish::StopReason::StopString(s),
            StopReason::TokenId(id) => chat_finish::StopReason::StopTokenId(id),
        }),
    }
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Chat for ChatService {
    type GenerateStream = ChatStream;

    async fn generate(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<ChatStream>, Status> {
        let gw = &self.gateway;
        let started = Instant::now();
        // Answer a little before the caller's deadline so it gets our DEADLINE_EXCEEDED, not
        // tonic's bare cancel.
        let cap = started + gw.config.request_timeout;
        let deadline = dsvl_telemetry::answer_by(request.metadata(), started)
            .map_err(|e| GatewayError::InvalidArgument(e.to_string()).to_status())?
            .map_or(cap, |d| d.min(cap));
        let tenant = authenticated(&request)?;
        let metadata = request.metadata().clone();
        let input = to_input(request.into_inner()).map_err(|e| e.to_status())?;
        let span = request_span(&gw.model.name, &input, &tenant.id, "grpc");
        dsvl_telemetry::extract_trace_context(&metadata, &span);
        let rx = gw
            .chat(&tenant, input, deadline, "grpc")
            .instrument(span)
            .await
            .map_err(|e| e.to_status())?;
        let stream = ReceiverStream::new(rx).map(|item| {
            item.map(|ev| match ev {
                ChatEvent::Delta(d) => ChatResponse {
                    index: d.index,
                    event: Some(Event::Delta(ChatDelta {
                        text: d.text,
                        token_ids: d.token_ids,
                        logprobs: d
                            .logprobs
                            .into_iter()
                            .map(|l| TokenLogprob {
                                id: l.token.id,
                                token: l.token.text,
                                logprob: l.token.logprob,
                                top: l.top.into_iter().map(top_logprob).collect(),
                            })
                            .collect(),
                    })),
                },
                ChatEvent::Finish(f) => {
                    ChatResponse { index: f.index, event: Some(Event::Finish(finish_message(f))) }
                }
            })
            .map_err(|e| e.to_status())
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        authenticated(&request)?;
        Ok(Response::new(ListModelsResponse { models: vec![self.gateway.model_info()] }))
    }
}

impl Gateway {
    /// The served model for `ListModels` and `/v1/models`.
    pub fn model_info(&self) -> ModelInfo {
        ModelInfo {
            id: self.model.name.clone(),
            vision: self.model.vision,
            max_positions: self.model.max_positions as u32,
        }
    }
}
