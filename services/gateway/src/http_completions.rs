//! `POST /v1/completions`, OpenAI's (legacy) text completions: the prompt is used as given, a
//! string (tokenized with BOS, no chat template) or token ids, or a list of either (up to the
//! gateway's `--max-prompts`); the reply streams as `text_completion` chunks or comes as one
//! object. Sampling, stop strings, structured outputs and limits are the chat endpoint's.
//! Fields follow the same rule as chat: honoured, a documented no-op, or a 400 naming them
//! (`services/OPENAI_FIELDS.md`).
//!
//! A list of prompts runs as one request per prompt (each against the in-flight caps, quotas
//! and metrics, all under the one deadline), and the reply carries their choices together as
//! OpenAI's does: choice `j` of prompt `i` has index `i * n + j`. If any prompt is refused
//! before it starts, the whole request is, and the others are cancelled; an error after the
//! start ends the whole reply.

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

use crate::chat::{request_span, ChatEvent, ChatStream};
use crate::error::GatewayError;
use crate::http::{error_response, logit_bias, read_request, unique_id};
use crate::http_reply::{sse, whole, Reply, Shape, StreamUsage};
use crate::prepare::{ChatInput, OutputOptions, RawPrompt};
use crate::structured::StructuredFields;
use crate::tenancy::Tenant;
use crate::vllm_extras::VllmExtras;
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
    #[serde(flatten)]
    vllm: VllmExtras,
    #[serde(flatten)]
    structured: StructuredFields,
    #[serde(default)]
    return_prompt_token_ids: bool,
}

/// A legacy completions body as [`completions`] reads it, one input per prompt (for the fuzz
/// targets).
pub(crate) fn legacy_inputs(body: &[u8], max_prompts: u32) -> Result<Vec<ChatInput>, GatewayError> {
    let check = crate::openai_fields::check_completions;
    let far = std::time::Duration::from_secs(60);
    let (_, r) =
        read_request::<LegacyRequest>(&HeaderMap::new(), body, far, Instant::now(), check)?;
    Ok(to_inputs(r, max_prompts)?.inputs)
}

/// The prompts of a request, checked against `max_prompts`.
fn prompts_of(field: PromptField, max_prompts: u32) -> Result<Vec<RawPrompt>, GatewayError> {
    let prompts: Vec<RawPrompt> = match field {
        PromptField::Text(t) => vec![RawPrompt::Text(t)],
        PromptField::Ids(ids) => vec![RawPrompt::Ids(ids)],
        PromptField::Texts(v) => v.into_iter().map(RawPrompt::Text).collect(),
        PromptField::Batches(v) => v.into_iter().map(RawPrompt::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(GatewayError::InvalidArgument("prompt: the list of prompts is empty".into()));
    }
    if prompts.len() > max_prompts as usize {
        return Err(GatewayError::InvalidArgument(format!(
            "prompt: {} prompts; this gateway allows at most {max_prompts} per request",
            prompts.len()
        )));
    }
    Ok(prompts)
}

/// A legacy body read: one input per prompt (the same options for each), whether the reply
/// streams, where a stream reports usage, and the caller's `request_id`.
struct Inputs {
    inputs: Vec<ChatInput>,
    stream: bool,
    usage_in: StreamUsage,
    request_id: Option<String>,
}

fn to_inputs(r: LegacyRequest, max_prompts: u32) -> Result<Inputs, GatewayError> {
    let invalid = |m: &str| GatewayError::InvalidArgument(m.to_string());
    let n = r.n.unwrap_or(1);
    if r.best_of.is_some_and(|b| b != n) {
        return Err(invalid("best_of must be absent or equal to n (no server-side ranking)"));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("suffix is not supported (no fill-in-the-middle)"));
    }
    let prompts = prompts_of(r.prompt, max_prompts)?;
    let flag = |key: &str| {
        r.stream_options.as_ref().and_then(|o| o.get(key)).and_then(Value::as_bool).unwrap_or(false)
    };
    let usage_in = StreamUsage::from_flags(flag("include_usage"), flag("continuous_usage_stats"));
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
        constraint: r.structured.constraint()?,
        raw_prompt: None,
        // The legacy `logprobs: k` asks for the chosen token's and the k most likely ones'.
        output: OutputOptions {
            n,
            logprobs: r.logprobs.is_some(),
            top_logprobs: r.logprobs.unwrap_or(0),
            stop_token_ids: r.stop_token_ids.unwrap_or_default(),
            ignore_eos: r.ignore_eos,
            echo: r.echo.unwrap_or(false),
            ..Default::default()
        },
        // No chat template here.
        ..Default::default()
    };
    let mut input = input;
    let request_id = r.vllm.apply(&mut input, r.stream)?;
    let inputs =
        prompts.into_iter().map(|p| ChatInput { raw_prompt: Some(p), ..input.clone() }).collect();
    Ok(Inputs { inputs, stream: r.stream, usage_in, request_id })
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
    let max_prompts = gw.config.max_prompts;
    let (deadline, read) = match read.and_then(|(d, r)| Ok((d, to_inputs(r, max_prompts)?))) {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let Inputs { inputs, stream: streaming, usage_in, request_id } = read;
    let id = request_id.map_or_else(|| unique_id("cmpl-"), |r| format!("cmpl-{r}"));
    let reply = Reply::new(&inputs[0], Shape::Text, gw.model.name.clone(), id)
        .for_prompts(inputs.len() as u32);
    let per_prompt = reply.per_prompt;
    let opening = inputs.into_iter().map(|input| {
        let span = request_span(&gw.model.name, &input, &tenant.id, "http");
        gw.chat(&tenant, input, deadline, "http").instrument(span)
    });
    // Dropping the streams already open (on the first refusal) cancels their generation.
    let rx = match futures::future::join_all(opening).await.into_iter().collect() {
        Ok(streams) => merged(streams, per_prompt),
        Err(e) => return error_response(&e),
    };
    if streaming {
        sse(rx, reply, usage_in).into_response()
    } else {
        whole(rx, reply).await
    }
}

/// The events of every prompt's stream as one stream, choice `j` of prompt `i` renumbered
/// `i * per_prompt + j`. It ends after the first error, and when it is dropped (the client
/// went away) the prompts' streams are dropped with it, which cancels their generation.
fn merged(streams: Vec<ChatStream>, per_prompt: u32) -> ChatStream {
    use futures::StreamExt;
    if streams.len() == 1 {
        return streams.into_iter().next().expect("one stream");
    }
    let mut all = futures::stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        let offset = i as u32 * per_prompt;
        tokio_stream::wrappers::ReceiverStream::new(s).map(move |ev| {
            ev.map(|ev| match ev {
                ChatEvent::Delta(mut d) => {
                    d.index += offset;
                    ChatEvent::Delta(d)
                }
                ChatEvent::Finish(mut f) => {
                    f.index += offset;
                    ChatEvent::Finish(f)
                }
            })
        })
    }));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = all.next() => {
                    let Some(ev) = ev else { break };
                    let failed = ev.is_err();
                    if tx.send(ev).await.is_err() || failed {
                        break;
                    }
                }
                () = tx.closed() => break,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Delta, Finish};
    use tokio::sync::mpsc;

    fn delta(index: u32, text: &str) -> Result<ChatEvent, GatewayError> {
        Ok(ChatEvent::Delta(Delta { index, text: text.into(), ..Delta::default() }))
    }

    fn finish(index: u32) -> Result<ChatEvent, GatewayError> {
        Ok(ChatEvent::Finish(Finish { index, ..Finish::default() }))
    }

    fn index_of(ev: &Result<ChatEvent, GatewayError>) -> u32 {
        match ev {
            Ok(ChatEvent::Delta(d)) => d.index,
            Ok(ChatEvent::Finish(f)) => f.index,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn prompts_are_one_or_a_list_within_the_cap() {
        let texts = |n: usize| PromptField::Texts(vec!["a".into(); n]);
        assert_eq!(prompts_of(PromptField::Text("a".into()), 1).unwrap().len(), 1);
        assert_eq!(prompts_of(PromptField::Ids(vec![1, 2]), 1).unwrap().len(), 1);
        assert_eq!(prompts_of(texts(3), 3).unwrap().len(), 3);
        assert_eq!(prompts_of(PromptField::Batches(vec![vec![1]; 2]), 2).unwrap().len(), 2);
        let err = prompts_of(texts(4), 3).unwrap_err().to_string();
        assert!(err.contains("4 prompts") && err.contains("at most 3"), "{err}");
        let err = prompts_of(PromptField::Texts(Vec::new()), 3).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[tokio::test]
    async fn merged_streams_renumber_choices_by_prompt_and_end_with_all_of_them() {
        let (a_tx, a) = mpsc::channel(8);
        let (b_tx, b) = mpsc::channel(8);
        let mut rx = merged(vec![a, b], 2);
        for ev in [delta(0, "x"), delta(1, "y"), finish(0), finish(1)] {
            a_tx.send(ev).await.unwrap();
        }
        for ev in [delta(1, "z"), finish(1), finish(0)] {
            b_tx.send(ev).await.unwrap();
        }
        drop((a_tx, b_tx));
        let mut from_a = Vec::new();
        let mut from_b = Vec::new();
        while let Some(ev) = rx.recv().await {
            let i = index_of(&ev);
            if i < 2 {
                from_a.push(i)
            } else {
                from_b.push(i)
            }
        }
        assert_eq!(from_a, [0, 1, 0, 1], "prompt 0 keeps its numbers, in order");
        assert_eq!(from_b, [3, 3, 2], "prompt 1's choices come after prompt 0's");
    }

    #[tokio::test]
    async fn merged_streams_end_at_the_first_error_and_drop_the_others() {
        let (a_tx, a) = mpsc::channel(8);
        let (b_tx, b) = mpsc::channel(8);
        let mut rx = merged(vec![a, b], 1);
        b_tx.send(Err(GatewayError::Internal("boom".into()))).await.unwrap();
        assert!(rx.recv().await.unwrap().is_err());
        let after = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
        assert!(after.expect("the stream ends").is_none(), "nothing after the error");
        // The other prompt's stream was dropped: its sender sees the end (its generation stops).
        tokio::time::timeout(std::time::Duration::from_secs(5), a_tx.closed()).await.unwrap();
    }

    #[tokio::test]
    async fn dropping_the_merged_stream_drops_every_prompts_stream() {
        let (a_tx, a) = mpsc::channel(8);
        let (b_tx, b) = mpsc::channel(8);
        let rx = merged(vec![a, b], 1);
        drop(rx);
        let closed = async { tokio::join!(a_tx.closed(), b_tx.closed()) };
        tokio::time::timeout(std::time::Duration::from_secs(5), closed).await.unwrap();
    }
}
