//! How a reply goes out over HTTP: OpenAI's chat completion or (legacy) text completion,
//! as one JSON object or as server-sent events, for every choice of the request (`n`), with
//! log-probabilities when asked for, and tool calls parsed out of the text
//! ([`crate::tools`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::chat::{Alternative, ChatEvent, ChatStream, Finish, StopReason, TokenLogprob};
use crate::error::GatewayError;
use crate::http::error_response;
use crate::prepare::ChatInput;
use crate::tools::Tools;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Usage over every choice: each prompt once (its first choice's figures; choices are numbered
/// `per_prompt` to a prompt), the completions summed.
pub(crate) fn usage(finishes: &[Finish], per_prompt: u32) -> Value {
    let firsts = finishes.iter().filter(|f| f.index % per_prompt.max(1) == 0);
    let (prompt, cached) =
        firsts.fold((0, 0), |(p, c), f| (p + f.prompt_tokens, c + f.cached_tokens));
    let completion: u32 = finishes.iter().map(|f| f.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
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

/// How to frame one request's reply.
pub(crate) struct Reply {
    /// Chat or text completion.
    pub shape: Shape,
    /// Completion id.
    pub id: String,
    /// Served model name.
    pub model: String,
    /// Choices to wait for, over every prompt.
    pub n: u32,
    /// Choices per prompt (the request's `n`; fewer than `n` when it has several prompts).
    pub per_prompt: u32,
    /// Whether choices carry `logprobs`.
    pub logprobs: bool,
    /// The tools a chat reply may call (its text is parsed into `tool_calls`).
    pub tools: Option<Arc<Tools>>,
}

impl Reply {
    /// The framing of `input`'s reply.
    pub(crate) fn new(input: &ChatInput, shape: Shape, model: String, id: String) -> Self {
        let (n, logprobs) = (input.output.n.max(1), input.output.logprobs);
        Self { shape, id, model, n, per_prompt: n, logprobs, tools: None }
    }

    /// The framing of `prompts` prompts' replies together, each with this one's choices.
    pub(crate) fn for_prompts(self, prompts: u32) -> Self {
        Self { n: self.per_prompt * prompts.max(1), ..self }
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
                        at += shown_chars(t);
                        o
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| t.token.text.clone()).collect::<Vec<_>>(),
                    // An echoed prompt's first token has neither (`null`s, as OpenAI's).
                    "token_logprobs": tokens.iter().map(|t| if t.unscored { Value::Null } else { json!(t.token.logprob) }).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| if t.unscored { Value::Null } else { Value::Object(t.top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect()) }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// A choice of a whole reply (completions: chat's goes through [`message`]).
    fn whole_choice(self, f: &Finish, text: String, logprobs: Value) -> Value {
        let (index, finish, stop) = (f.index, &f.finish_reason, stop_reason(f));
        match self {
            Self::Chat => {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop})
            }
            Self::Text => {
                let mut choice = json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop});
                if let Some(scores) = &f.prompt_logprobs {
                    choice["prompt_logprobs"] = prompt_logprobs(scores);
                }
                choice
            }
        }
    }

    /// A choice of a stream chunk: new text, or the end (`finish`, no text, and what stopped
    /// it).
    fn chunk_choice(
        self,
        index: u32,
        text: &str,
        logprobs: Value,
        finish: Option<(&str, Value)>,
    ) -> Value {
        match (self, finish) {
            (Self::Chat, None) => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            (Self::Chat, Some((f, stop))) => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": f, "stop_reason": stop})
            }
            (Self::Text, None) => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
            (Self::Text, Some((f, stop))) => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": f, "stop_reason": stop})
            }
        }
    }
}

/// The `dsvl` extension of a whole reply: choice 0's, plus every choice's ids when there are
/// several, and every choice's prompt ids (when asked for) when there are several prompts.
fn extensions(finishes: &[Finish], per_prompt: u32) -> Value {
    let mut v = extension(&finishes[0]);
    if finishes.len() > 1 {
        v["choices_token_ids"] = finishes.iter().map(|f| json!(f.token_ids)).collect();
    }
    if finishes.len() > per_prompt as usize && !finishes[0].prompt_token_ids.is_empty() {
        v["choices_prompt_token_ids"] =
            finishes.iter().map(|f| json!(f.prompt_token_ids)).collect();
    }
    v
}

/// The characters `t` adds to the choice's text as `text_offset` counts them: its text alone,
/// none for a special token the text skips (the echoed prompt's BOS).
fn shown_chars(t: &TokenLogprob) -> usize {
    if t.hidden {
        0
    } else {
        t.token.text.chars().count()
    }
}

/// A chat choice's message: the text, or the tool calls parsed out of it (then `content` is
/// null and the finish reason `tool_calls`, when generation stopped by itself).
/// vLLM's `prompt_logprobs`: per prompt position `null` (the first) or, keyed by token id, the
/// prompt token's and its alternatives' `logprob`, `rank` and `decoded_token`.
fn prompt_logprobs(scores: &[TokenLogprob]) -> Value {
    let entry = |a: &Alternative, rank: Option<u32>| json!({"logprob": a.logprob, "rank": rank, "decoded_token": a.text});
    scores
        .iter()
        .map(|t| {
            if t.unscored {
                return Value::Null;
            }
            let mut m = serde_json::Map::new();
            m.insert(t.token.id.to_string(), entry(&t.token, t.rank));
            for (i, a) in t.top.iter().enumerate() {
                m.entry(a.id.to_string()).or_insert_with(|| entry(a, Some(i as u32 + 1)));
            }
            Value::Object(m)
        })
        .collect()
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a choice, else `null`.
fn stop_reason(f: &Finish) -> Value {
    match &f.stop_reason {
        Some(StopReason::String(s)) => json!(s),
        Some(StopReason::TokenId(id)) => json!(id),
        None => Value::Null,
    }
}

fn message(tools: Option<&Tools>, text: String, finish: &str) -> (Value, String) {
    if let Some(calls) = tools.and_then(|t| t.parse_reply(&text)) {
        let reason = if finish == "stop" { "tool_calls" } else { finish };
        return (
            json!({"role": "assistant", "content": null, "tool_calls": tool_calls_json(&calls)}),
            reason.into(),
        );
    }
    (json!({"role": "assistant", "content": text}), finish.into())
}

fn tool_calls_json(calls: &[crate::tools::ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
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
                        match reply.shape {
                            Shape::Chat => {
                                let (msg, reason) =
                                    message(reply.tools.as_deref(), c.text, &f.finish_reason);
                                json!({"index": f.index, "message": msg, "logprobs": lp, "finish_reason": reason, "stop_reason": stop_reason(f)})
                            }
                            Shape::Text => reply.shape.whole_choice(f, c.text, lp),
                        }
                    })
                    .collect();
                let mut whole = json!({
                    "id": reply.id, "object": reply.shape.object(false), "created": unix_now(), "model": reply.model, "system_fingerprint": null,
                    "choices": body,
                    "usage": usage(&finishes, reply.per_prompt),
                    "dsvl": extensions(&finishes, reply.per_prompt),
                });
                // vLLM's chat replies carry the prompt's scores once, beside the choices.
                if let (Shape::Chat, Some(scores)) = (reply.shape, &finishes[0].prompt_logprobs) {
                    whole["prompt_logprobs"] = prompt_logprobs(scores);
                }
                return Json(whole).into_response();
            }
            Err(e) => return error_response(&e),
        }
    }
    error_response(&GatewayError::Internal("the request ended without a result".into()))
}

/// A streamed chat choice under tools: text is held back while it may be a tool call (always
/// for `required` and named calls; for `auto`, once its first non-blank character is `{`),
/// then sent as `tool_calls` or, when it does not parse, as content at the end.
#[derive(Default)]
struct Held {
    /// Known to be plain text: streaming as usual.
    streaming: bool,
    text: String,
    logprobs: Vec<TokenLogprob>,
}

/// Where a stream reports usage (`stream_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum StreamUsage {
    /// Nowhere.
    #[default]
    Never,
    /// In a last chunk without choices (`include_usage`).
    Last,
    /// There, and in every chunk of a choice: its prompt and its tokens so far (vLLM's
    /// `continuous_usage_stats`, which it honours only with `include_usage`).
    Every,
}

impl StreamUsage {
    /// From `stream_options`' two flags.
    pub(crate) fn from_flags(include_usage: bool, continuous: bool) -> Self {
        match (include_usage, continuous) {
            (false, _) => Self::Never,
            (true, false) => Self::Last,
            (true, true) => Self::Every,
        }
    }
}

/// A chunk's `usage` under [`StreamUsage::Every`].
fn running_usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The reply as server-sent events framed like OpenAI's (`[DONE]` last, after every choice's
/// end).
pub(crate) fn sse(
    rx: ChatStream,
    reply: Reply,
    usage_in: StreamUsage,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = unix_now();
    let Reply { shape, id, model, n, per_prompt, logprobs, tools } = reply;
    // A chunk: the choices, and top-level keys besides (`dsvl`, `usage`).
    let chunk = move |choices: Value, extra: Option<Value>| {
        let mut v = json!({"id": id, "object": shape.object(true), "created": created, "model": model, "system_fingerprint": null, "choices": choices});
        if let Some(Value::Object(extra)) = extra {
            for (k, x) in extra {
                v[k] = x;
            }
        }
        Event::default().data(v.to_string())
    };
    // Chat streams open each choice with the assistant's role: at once, or with usage in every
    // chunk just before the first event, which brings the prompt's size (vLLM's opening chunks
    // carry the prompt and 0 tokens).
    let every = usage_in == StreamUsage::Every;
    let opening = |i: u32| json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
    let chat = matches!(shape, Shape::Chat);
    let first: Vec<Event> =
        if chat && !every { (0..n).map(|i| chunk(opening(i), None)).collect() } else { Vec::new() };
    let mut opened = !(chat && every);
    let tools = tools.filter(|_| matches!(shape, Shape::Chat));
    let always = tools.as_ref().is_some_and(|t| t.choice != crate::tools::Choice::Auto);
    let mut held: Vec<Held> = (0..n).map(|_| Held::default()).collect();
    let mut finishes: Vec<Finish> = Vec::new();
    let mut chars = vec![0usize; n as usize];
    // Each choice's tokens so far, for usage in every chunk.
    let mut generated = vec![0u32; n as usize];
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |ev| {
        let mut out = Vec::new();
        if !opened {
            opened = true;
            let prompt = match &ev {
                Ok(ChatEvent::Delta(d)) => Some(d.prompt_tokens),
                Ok(ChatEvent::Finish(f)) => Some(f.prompt_tokens),
                Err(_) => None,
            };
            let usage = |p: u32| json!({"usage": running_usage(p, 0)});
            out.extend((0..n).map(|i| chunk(opening(i), prompt.map(usage))));
        }
        out.extend(match ev {
        Ok(ChatEvent::Delta(d)) => {
            generated[d.index as usize] += d.token_ids.len() as u32;
            let so_far = every.then(|| running_usage(d.prompt_tokens, generated[d.index as usize]));
            let (mut text, mut lps) = (d.text, d.logprobs);
            let h = &mut held[d.index as usize];
            if tools.is_some() && !h.streaming {
                h.text.push_str(&text);
                h.logprobs.append(&mut lps);
                let start = h.text.trim_start();
                if always || start.is_empty() || start.starts_with('{') {
                    return Vec::new(); // blank so far, or maybe a call: hold
                }
                // `auto` and plain text: stream from here on, the held text first.
                h.streaming = true;
                text = std::mem::take(&mut h.text);
                lps = std::mem::take(&mut h.logprobs);
            }
            let at = &mut chars[d.index as usize];
            let lp = shape.logprobs(logprobs, &lps, *at);
            *at += lps.iter().map(shown_chars).sum::<usize>();
            let mut extra = json!({"dsvl": {"token_ids": d.token_ids}});
            if let Some(u) = so_far {
                extra["usage"] = u;
            }
            vec![chunk(json!([shape.chunk_choice(d.index, &text, lp, None)]), Some(extra))]
        }
        Ok(ChatEvent::Finish(f)) => {
            let mut out = Vec::new();
            let so_far = every.then(|| running_usage(f.prompt_tokens, f.completion_tokens));
            let with_usage = |extra: Option<Value>| match (&so_far, extra) {
                (Some(u), Some(mut e)) => {
                    e["usage"] = u.clone();
                    Some(e)
                }
                (Some(u), None) => Some(json!({"usage": u})),
                (None, e) => e,
            };
            let mut reason = f.finish_reason.clone();
            let h = &mut held[f.index as usize];
            if !h.text.is_empty() {
                let text = std::mem::take(&mut h.text);
                let lps = std::mem::take(&mut h.logprobs);
                match tools.as_deref().and_then(|t| t.parse_reply(&text)) {
                    Some(calls) => {
                        if reason == "stop" {
                            reason = "tool_calls".into();
                        }
                        let lp = shape.logprobs(logprobs, &lps, 0);
                        out.push(chunk(
                            json!([{"index": f.index, "delta": {"tool_calls": tool_calls_json(&calls)}, "logprobs": lp, "finish_reason": null}]),
                            with_usage(None),
                        ));
                    }
                    None => {
                        let lp = shape.logprobs(logprobs, &lps, chars[f.index as usize]);
                        out.push(chunk(
                            json!([shape.chunk_choice(f.index, &text, lp, None)]),
                            with_usage(None),
                        ));
                    }
                }
            }
            out.push(chunk(
                json!([shape.chunk_choice(f.index, "", Value::Null, Some((&reason, stop_reason(&f))))]),
                with_usage(Some(json!({"dsvl": extension(&f)}))),
            ));
            finishes.push(f);
            if finishes.len() == n as usize {
                if usage_in != StreamUsage::Never {
                    out.push(chunk(json!([]), Some(json!({"usage": usage(&finishes, per_prompt)}))));
                }
                out.push(Event::default().data("[DONE]"));
            }
            out
        }
        // After the first byte the status code is sent; OpenAI reports late errors as an
        // `error` event in the stream.
        Err(e) => vec![Event::default().data(e.openai_body().to_string())],
        });
        out
    });
    let all = futures::stream::iter(first).chain(events.flat_map(futures::stream::iter)).map(Ok);
    Sse::new(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(index: u32, prompt: u32, cached: u32, completion: u32) -> Finish {
        Finish {
            index,
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: completion,
            ..Finish::default()
        }
    }

    #[test]
    fn usage_counts_each_prompt_once_and_every_completion() {
        // One prompt, n = 3: the prompt once.
        let one = [finish(0, 10, 4, 5), finish(1, 10, 4, 6), finish(2, 10, 4, 7)];
        let u = usage(&one, 3);
        assert_eq!(
            (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()),
            (Some(10), Some(18))
        );
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 4);
        // Two prompts, n = 2: choices 0-1 are the first prompt's, 2-3 the second's.
        let two =
            [finish(0, 10, 4, 1), finish(1, 10, 4, 2), finish(2, 7, 0, 3), finish(3, 7, 0, 4)];
        let u = usage(&two, 2);
        assert_eq!((u["prompt_tokens"].as_u64(), u["total_tokens"].as_u64()), (Some(17), Some(27)));
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 4);
    }
}
