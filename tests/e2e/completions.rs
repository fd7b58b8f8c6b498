//! `POST /v1/completions` through the real gateway and decoder: the golden text prompt's token
//! ids as a raw prompt give the golden greedy ids, streamed or not; a text prompt is tokenized
//! without the chat template; a list of prompts gives each prompt's choices, numbered prompt by
//! prompt; `echo` returns the prompt, with its tokens' log-probabilities when asked; refused
//! fields are 400s naming them; `/v1/models` reports the context length; the tokenizer
//! endpoints give the ids the completions endpoint uses; a chat reply begun by the caller
//! (`continue_final_message`) is the completion of the prompt left open; vLLM's
//! `prompt_logprobs` give the echo's figures with ranks; `truncate_prompt_tokens`, `cache_salt`
//! and `request_id` do what vLLM's do.

use anyhow::{Context, Result};
use dsvl_e2e::{golden_case, golden_generated, http_post, Cluster, Options};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_with_token_ids_and_text() -> Result<()> {
    let cluster =
        Cluster::start(Options { vision_replicas: 0, tp: 1, redis: false, ..Options::default() })
            .await?;
    let ids: Vec<u32> = serde_json::from_value(golden_case("text_only")?["input_ids"].clone())?;
    let want = golden_generated("text")?;
    let body = json!({"prompt": ids, "temperature": 0, "max_tokens": want.len()});
    let r = http_post(&cluster.http, "/v1/completions", &[], &body)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    assert_eq!(v["object"], "text_completion");
    let got: Vec<u32> = serde_json::from_value(v["dsvl"]["token_ids"].clone())?;
    assert_eq!(got, want, "raw ids = the chat template's ids: the golden reply");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let text = v["choices"][0]["text"].as_str().context("text")?.to_string();

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = http_post(&cluster.http, "/v1/completions", &[], &streamed)?;
    assert_eq!(r.status, 200);
    let events = r.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?;
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, text, "streamed text = whole text");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().context("a chunk")?["choices"][0]["stop_reason"], Value::Null);

    // A stop string: the text is cut before it, and vLLM's stop_reason names it, whole or
    // streamed (on the choice's last chunk).
    let from = text.char_indices().nth(3).context("4 characters")?.0;
    let to = text[from..].char_indices().nth(3).map_or(text.len(), |(i, _)| from + i);
    let stop = &text[from..to];
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    let v = completion(&cluster, &stopped)?;
    let choice = &v["choices"][0];
    assert_eq!((&choice["finish_reason"], &choice["stop_reason"]), (&json!("stop"), &json!(stop)));
    assert_eq!(choice["text"], json!(&text[..text.find(stop).context("stop")?]));
    stopped["stream"] = json!(true);
    let chunks = streamed_chunks(&cluster, &stopped)?;
    let last = &chunks.last().context("a chunk")?["choices"][0];
    assert_eq!((&last["finish_reason"], &last["stop_reason"]), (&json!("stop"), &json!(stop)));

    // A text prompt: BOS + its tokens, no template; OpenAI's default of 16 new tokens.
    let r = http_post(
        &cluster.http,
        "/v1/completions",
        &[],
        &json!({"prompt": "Once upon a time", "temperature": 0, "return_prompt_token_ids": true}),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let prompt_ids = v["dsvl"]["prompt_token_ids"].as_array().context("prompt ids")?;
    assert_eq!(prompt_ids[0], 1000, "BOS first");
    // The chat template alone (system prompt, roles) is over 40 tokens here.
    assert!(prompt_ids.len() < 30, "no chat template around the text: {prompt_ids:?}");

    for (bad, field) in [
        (json!({"prompt": "x", "best_of": 2}), "best_of"),
        (json!({"prompt": "x", "logit_bias": {"999999": 2}}), "logit_bias token id 999999"),
        (json!({"prompt": "x", "logit_bias": {"a": 2}}), "logit_bias: key `a`"),
        (json!({"prompt": "x", "logprobs": 21}), "top_logprobs is 21"),
        (json!({"prompt": "x", "n": 99}), "at most 8"),
        (json!({"prompt": vec!["a"; 65]}), "at most 64 per request"),
        (json!({"prompt": [[1, 2], []]}), "empty"),
        (json!({"prompt": "x", "frobnicate": 1}), "unknown field `frobnicate`"),
    ] {
        let r = http_post(&cluster.http, "/v1/completions", &[], &bad)?;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.json()?["error"]["message"].as_str().unwrap_or("").contains(field), "{}", r.body);
    }
    several_prompts(&cluster, &ids)?;
    echo(&cluster, &ids)?;
    tokenizer_endpoints(&cluster)?;
    continued_reply(&cluster)?;
    vllm_prompt_logprobs(&cluster)?;
    truncation_salt_and_id(&cluster, &ids)?;
    continuous_usage(&cluster, &ids)?;
    let m = dsvl_testkit::http_get(&cluster.http, "/v1/models")?;
    assert!(m.contains("\"max_model_len\":16384"), "{m}");
    // One model by id: the same object; an unknown id is OpenAI's 404 naming it.
    let listed: serde_json::Value = serde_json::from_str(&m)?;
    let id = listed["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let one = dsvl_e2e::http_get_response(&cluster.http, &format!("/v1/models/{id}"))?;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()?, listed["data"][0]);
    assert_eq!(one.json()?["modalities"], json!(["text", "image"]));
    let missing = dsvl_e2e::http_get_response(&cluster.http, "/v1/models/no-such/model")?;
    assert_eq!(missing.status, 404, "{}", missing.body);
    let error = &missing.json()?["error"];
    assert_eq!(
        (error["code"].as_str(), error["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    assert!(error["message"].as_str().unwrap_or_default().contains("no-such/model"), "{error}");
    Ok(())
}

/// A list of prompts (text, then token ids) with `n = 2`: choice `2i + j` is prompt `i`'s, with
/// the text and ids that prompt gives alone; usage counts each prompt once; streamed, each
/// index's pieces join to the same text and the usage chunk and `[DONE]` come last.
fn several_prompts(cluster: &Cluster, golden_ids: &[u32]) -> Result<()> {
    let post = |body: &Value| completion(cluster, body);
    let prompts = [json!("Once upon a time"), json!(golden_ids)];
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| post(&json!({"prompt": p, "temperature": 0, "max_tokens": 6})))
        .collect::<Result<_>>()?;
    let texts = [json!(["Once upon a time", "a second prompt"]), json!([golden_ids, golden_ids])];
    // The text list and the id list each against the prompts alone.
    let second = post(&json!({"prompt": "a second prompt", "temperature": 0, "max_tokens": 6}))?;
    for (list, wants) in texts.iter().zip([[&alone[0], &second], [&alone[1], &alone[1]]]) {
        let body = json!({"prompt": list, "temperature": 0, "max_tokens": 6, "n": 2, "return_prompt_token_ids": true});
        let v = post(&body)?;
        let choices = v["choices"].as_array().context("choices")?;
        assert_eq!(choices.len(), 4, "{v}");
        for (at, c) in choices.iter().enumerate() {
            let want = wants[at / 2];
            assert_eq!(c["index"], at, "{v}");
            assert_eq!(c["text"], want["choices"][0]["text"], "choice {at}: {v}");
            assert_eq!(v["dsvl"]["choices_token_ids"][at], want["dsvl"]["token_ids"], "{at}");
        }
        let prompt_tokens =
            wants.iter().map(|w| w["usage"]["prompt_tokens"].as_u64()).sum::<Option<u64>>();
        assert_eq!(v["usage"]["prompt_tokens"].as_u64(), prompt_tokens, "{v}");
        let completion =
            wants.iter().map(|w| w["usage"]["completion_tokens"].as_u64()).sum::<Option<u64>>();
        assert_eq!(v["usage"]["completion_tokens"].as_u64(), completion.map(|c| 2 * c), "{v}");
        let prompt_ids = v["dsvl"]["choices_prompt_token_ids"].as_array().context("prompt ids")?;
        assert_eq!(prompt_ids.len(), 4);
        assert_eq!(
            prompt_ids[3].as_array().map(Vec::len),
            wants[1]["usage"]["prompt_tokens"].as_u64().map(|n| n as usize)
        );

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let chunks = streamed_chunks(cluster, &streamed)?;
        for (at, c) in choices.iter().enumerate() {
            assert_eq!(joined_text(&chunks, at), c["text"].as_str().unwrap_or_default(), "{at}");
        }
        let last = chunks.last().context("a usage chunk")?;
        assert_eq!(last["usage"], v["usage"], "the stream's usage is the whole reply's");
    }
    Ok(())
}

/// `echo`: each choice's text is the prompt then the completion (the same completion as
/// without echo); with `logprobs: 2` the lists start with one entry per prompt token, the first
/// `null`, the others log-probabilities with their alternatives, then the generated tokens'
/// figures as without echo, with `text_offset` running on. The other choices (n = 2) echo the
/// same; the prompt is computed whole (no cached tokens, though the cache holds it by then);
/// streamed, each choice's pieces join to the whole text.
fn echo(cluster: &Cluster, ids: &[u32]) -> Result<()> {
    let post = |body: &Value| completion(cluster, body);
    let plain_body = json!({"prompt": ids, "temperature": 0, "max_tokens": 3, "logprobs": 2});
    let plain = post(&plain_body)?;
    let mut body = plain_body.clone();
    body["echo"] = json!(true);
    body["n"] = json!(2);
    let v = post(&body)?;
    let plain_choice = &plain["choices"][0];
    let plain_text = plain_choice["text"].as_str().context("text")?;
    let lists = |c: &Value, key: &str| -> Result<Vec<Value>> {
        c["logprobs"][key].as_array().cloned().with_context(|| format!("{key}: {c}"))
    };
    for c in v["choices"].as_array().context("choices")? {
        let text = c["text"].as_str().context("text")?;
        let prompt_text = text.strip_suffix(plain_text).context("the completion comes last")?;
        assert!(!prompt_text.is_empty(), "the prompt comes first: {text:?}");
        let tokens = lists(c, "tokens")?;
        let figures = lists(c, "token_logprobs")?;
        let tops = lists(c, "top_logprobs")?;
        let generated = lists(plain_choice, "tokens")?.len();
        assert_eq!(tokens.len(), ids.len() + generated, "{c}");
        assert!(figures[0].is_null() && tops[0].is_null(), "the first prompt token has none");
        for p in 1..ids.len() {
            let lp = figures[p].as_f64().context("a prompt token's logprob")?;
            assert!(lp <= 0.0, "position {p}: {lp}");
            let alternatives = tops[p].as_object().context("alternatives")?;
            assert!(!alternatives.is_empty() && alternatives.len() <= 2, "{}", tops[p]);
            let best = alternatives.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
            assert!(lp <= best + 1e-6, "position {p}: no alternative likelier than the best");
        }
        assert_eq!(figures[ids.len()..], lists(plain_choice, "token_logprobs")?[..], "{c}");
        assert_eq!(tokens[ids.len()..], lists(plain_choice, "tokens")?[..]);
        // text_offset indexes the text: each prompt token's text starts at its offset (BOS,
        // which the text skips, at 0 and none wide), the completion where the prompt ends.
        let offsets: Vec<usize> = lists(c, "text_offset")?
            .iter()
            .map(|o| o.as_u64().map(|o| o as usize))
            .collect::<Option<_>>()
            .context("offsets")?;
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(offsets[0], 0, "{c}");
        for p in 1..ids.len() {
            let token = tokens[p].as_str().context("a token")?;
            let from: String = chars[offsets[p]..].iter().collect();
            assert!(from.starts_with(token), "token {p} {token:?} at {}: {c}", offsets[p]);
        }
        assert_eq!(offsets[ids.len()], prompt_text.chars().count(), "offsets run on: {c}");
        assert_eq!(c["logprobs"], v["choices"][0]["logprobs"], "every choice echoes the same");
    }
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "computed whole: {v}");
    let body_choice0 = v["choices"][0].clone();

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = streamed_chunks(cluster, &streamed)?;
    for (at, c) in v["choices"].as_array().context("choices")?.iter().enumerate() {
        assert_eq!(joined_text(&chunks, at), c["text"].as_str().unwrap_or_default(), "{at}");
    }

    // max_tokens 0 with echo: the prompt and its figures alone, nothing generated, whole or
    // streamed; without echo, 0 is refused.
    let zero = json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 0});
    let v = post(&zero)?;
    let c = &v["choices"][0];
    assert_eq!(lists(c, "tokens")?.len(), ids.len(), "{v}");
    assert_eq!(
        lists(c, "token_logprobs")?[1..],
        lists(&body_choice0, "token_logprobs")?[1..ids.len()]
    );
    assert_eq!(
        (c["finish_reason"].as_str(), v["usage"]["completion_tokens"].as_u64()),
        (Some("length"), Some(0))
    );
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    let mut streamed = zero.clone();
    streamed["stream"] = json!(true);
    streamed_chunks(cluster, &streamed)?;
    // n = 2: both choices are the echo, from one decoder request (no sibling streams).
    let first_tokens =
        || cluster.decoder.metric("dsvl_decoder_time_to_first_token_seconds_count", &[]);
    let before = first_tokens()?;
    let mut two = zero.clone();
    two["n"] = json!(2);
    let v = post(&two)?;
    let both = v["choices"].as_array().context("choices")?;
    assert_eq!(both.len(), 2, "{v}");
    assert_eq!((&both[0]["text"], &both[0]["logprobs"]), (&c["text"], &c["logprobs"]));
    assert_eq!((&both[1]["text"], &both[1]["logprobs"]), (&c["text"], &c["logprobs"]));
    assert_eq!(
        (both[1]["index"].as_u64(), v["usage"]["completion_tokens"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(first_tokens()? - before, 1.0, "one decoder request for both choices");
    let r =
        http_post(&cluster.http, "/v1/completions", &[], &json!({"prompt": ids, "max_tokens": 0}))?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("0 only with echo"), "{}", r.body);

    // The reference's prompt and greedy reply, scored: the reference's prompt logits, and a
    // greedy reply (`tls.rs` runs the same at TP 2).
    dsvl_e2e::check_golden_scoring(&post(&dsvl_e2e::golden_scoring_body()?)?)?;

    // A text prompt echoes as given; without logprobs, none are computed.
    let v = post(
        &json!({"prompt": "Once upon a time", "echo": true, "max_tokens": 2, "temperature": 0}),
    )?;
    let text = v["choices"][0]["text"].as_str().context("text")?;
    assert!(text.starts_with("Once upon a time"), "{text:?}");
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    Ok(())
}

/// `continue_final_message`: the chat prompt ends with the begun assistant message, open, and
/// the reply is what the completions endpoint gives for those ids (greedy, the same tokens);
/// with `add_generation_prompt` true as well it is a 400.
fn continued_reply(cluster: &Cluster) -> Result<()> {
    let chat = |extra: Value| -> Result<dsvl_e2e::HttpResponse> {
        let mut body = json!({"messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "My favourite colour is"}],
            "temperature": 0, "max_tokens": 8, "return_prompt_token_ids": true});
        for (k, v) in extra.as_object().context("object")? {
            body[k] = v.clone();
        }
        http_post(&cluster.http, "/v1/chat/completions", &[], &body)
    };
    let r = chat(json!({"continue_final_message": true}))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    let prompt = v["dsvl"]["prompt_token_ids"].clone();
    let back = http_post(&cluster.http, "/detokenize", &[], &json!({"tokens": prompt}))?.json()?;
    let text = back["prompt"].as_str().context("prompt")?;
    assert!(text.ends_with("Assistant: My favourite colour is"), "{text:?}");
    let alone = completion(cluster, &json!({"prompt": prompt, "temperature": 0, "max_tokens": 8}))?;
    assert_eq!(v["dsvl"]["token_ids"], alone["dsvl"]["token_ids"], "{v} / {alone}");
    assert_eq!(v["choices"][0]["message"]["content"], alone["choices"][0]["text"]);
    // vLLM chat's echo: the content starts with the message being continued.
    let echoed = chat(json!({"continue_final_message": true, "echo": true}))?.json()?;
    let content = echoed["choices"][0]["message"]["content"].as_str().context("content")?;
    let reply = v["choices"][0]["message"]["content"].as_str().context("content")?;
    assert_eq!(content, format!("My favourite colour is{reply}"), "{echoed}");
    // Left closed (the default), the prompt differs: the message ends with its separator.
    let closed = chat(json!({}))?.json()?;
    assert_ne!(closed["dsvl"]["prompt_token_ids"], prompt, "{closed}");
    let r = chat(json!({"continue_final_message": true, "add_generation_prompt": true}))?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("cannot both be true"), "{}", r.body);
    Ok(())
}

/// vLLM's `prompt_logprobs` on the reference's prompt and greedy reply: per position `null`
/// first, then keyed by token id the prompt token's figure (the echo's), its rank (1 on the
/// greedy reply's tokens) and the alternatives ranked 1 and 2; in a chat reply once, beside
/// the choices; refused with streaming and below 0.
fn vllm_prompt_logprobs(cluster: &Cluster) -> Result<()> {
    let mut scoring = dsvl_e2e::golden_scoring_body()?;
    let echoed = completion(cluster, &scoring)?;
    let figures = echoed["choices"][0]["logprobs"]["token_logprobs"].clone();
    let ids: Vec<u32> = serde_json::from_value(scoring["prompt"].clone())?;
    let reply_from = ids.len() - golden_generated("text")?.len();
    let body = json!({"prompt": ids, "prompt_logprobs": 2, "max_tokens": 1, "temperature": 0});
    let v = completion(cluster, &body)?;
    let scores = v["choices"][0]["prompt_logprobs"].as_array().context("prompt_logprobs")?;
    assert_eq!(scores.len(), ids.len());
    assert!(scores[0].is_null(), "{}", scores[0]);
    for (p, entry) in scores.iter().enumerate().skip(1) {
        let entry = entry.as_object().with_context(|| format!("position {p}"))?;
        let own = &entry[&ids[p].to_string()];
        let (lp, rank) = (own["logprob"].as_f64().context("logprob")?, own["rank"].as_u64());
        let echo = figures[p].as_f64().context("echo figure")?;
        assert!((lp - echo).abs() < 1e-5, "position {p}: {lp} against the echo's {echo}");
        if p >= reply_from {
            assert_eq!(rank, Some(1), "position {p}: a greedy token ranks first");
        }
        let mut ranks: Vec<u64> = entry.values().filter_map(|e| e["rank"].as_u64()).collect();
        ranks.sort_unstable();
        ranks.dedup();
        assert!(ranks.starts_with(&[1, 2]) && entry.len() <= 3, "position {p}: {entry:?}");
        assert!(entry.values().all(|e| e["decoded_token"].is_string()), "{entry:?}");
    }
    // Chat: once, beside the choices.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                      "prompt_logprobs": 0});
    let r = http_post(&cluster.http, "/v1/chat/completions", &[], &chat)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()?;
    let scores = v["prompt_logprobs"].as_array().context("prompt_logprobs")?;
    assert_eq!(Some(scores.len() as u64), v["usage"]["prompt_tokens"].as_u64(), "{v}");
    assert!(scores[1].as_object().is_some_and(|e| e.len() == 1), "the token alone: {v}");
    assert!(v["choices"][0].get("prompt_logprobs").is_none(), "{v}");
    scoring["stream"] = json!(true);
    scoring["prompt_logprobs"] = json!(1);
    for (bad, why) in [
        (scoring, "not available when stream is true"),
        (json!({"prompt": "x", "prompt_logprobs": -1}), "is not supported"),
        (json!({"prompt": "x", "prompt_logprobs": 21}), "at most 20"),
    ] {
        let r = http_post(&cluster.http, "/v1/completions", &[], &bad)?;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains(why), "{}", r.body);
    }
    Ok(())
}

/// vLLM's `truncate_prompt_tokens` (the prompt's last k tokens: the same reply as those ids
/// alone), `cache_salt` (cached blocks shared only under the same salt) and `request_id` (the
/// reply's id).
fn truncation_salt_and_id(cluster: &Cluster, ids: &[u32]) -> Result<()> {
    let tail = &ids[ids.len() - 20..];
    let cut = completion(
        cluster,
        &json!({"prompt": ids, "truncate_prompt_tokens": 20, "max_tokens": 4, "temperature": 0,
                "return_prompt_token_ids": true, "request_id": "trace-42"}),
    )?;
    assert_eq!(cut["id"], "cmpl-trace-42");
    assert_eq!(cut["usage"]["prompt_tokens"], 20, "{cut}");
    assert_eq!(cut["dsvl"]["prompt_token_ids"], json!(tail));
    let alone = completion(cluster, &json!({"prompt": tail, "max_tokens": 4, "temperature": 0}))?;
    assert_eq!(cut["dsvl"]["token_ids"], alone["dsvl"]["token_ids"]);
    // A long prompt's blocks are found again only under the salt they were cached with.
    let salted = |salt: &str| {
        let body = json!({"prompt": ids, "max_tokens": 1, "cache_salt": salt});
        completion(cluster, &body)
            .map(|v| v["usage"]["prompt_tokens_details"]["cached_tokens"].clone())
    };
    salted("first")?;
    assert!(salted("first")?.as_u64().unwrap_or(0) >= 32, "the same salt finds the blocks");
    assert_eq!(salted("second")?, json!(0), "another salt does not");
    Ok(())
}

/// The answer to a `/v1/completions` body, which must succeed.
fn completion(cluster: &Cluster, body: &Value) -> Result<Value> {
    let r = http_post(&cluster.http, "/v1/completions", &[], body)?;
    anyhow::ensure!(r.status == 200, "{body}: {}", r.body);
    r.json()
}

/// vLLM's `continuous_usage_stats` (with `include_usage`), on completions (n = 2) and chat:
/// every chunk of a choice carries usage, the prompt's tokens and that choice's tokens so far
/// (its token ids up to that chunk; all of them on its finishing chunk), and the last chunk
/// the whole reply's, as with `include_usage` alone; the role chunks that open a chat stream
/// carry the prompt and 0 tokens, as vLLM's.
fn continuous_usage(cluster: &Cluster, ids: &[u32]) -> Result<()> {
    let check = |chunks: &[Value], prompt: u64, n: u64| -> Result<()> {
        let (last, rest) = chunks.split_last().context("chunks")?;
        let mut so_far = std::collections::HashMap::<u64, u64>::new();
        let (mut finished, mut openings) = (0, 0);
        for c in rest {
            let choice = &c["choices"][0];
            if choice["delta"].get("role").is_some() {
                let u = &c["usage"];
                assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{c}");
                assert_eq!(u["completion_tokens"].as_u64(), Some(0), "{c}");
                openings += 1;
                continue;
            }
            let i = choice["index"].as_u64().context("index")?;
            let chunk_ids = c["dsvl"]["token_ids"].as_array().map_or(0, Vec::len) as u64;
            let count = so_far.entry(i).or_default();
            if choice["finish_reason"].is_null() {
                *count += chunk_ids;
            } else {
                assert_eq!(*count, chunk_ids, "its finishing chunk holds all of choice {i}'s ids");
                finished += 1;
            }
            let u = &c["usage"];
            assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{c}");
            assert_eq!(u["completion_tokens"].as_u64(), Some(*count), "{c}");
            assert_eq!(u["total_tokens"].as_u64(), Some(prompt + *count), "{c}");
        }
        assert_eq!(finished, n);
        let chat = rest[0]["object"] == "chat.completion.chunk";
        assert_eq!(openings, if chat { n } else { 0 }, "a chat stream opens each choice");
        let total: u64 = so_far.values().sum();
        assert!(total > 0);
        assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(total), "{last}");
        assert_eq!(last["choices"], json!([]), "{last}");
        Ok(())
    };
    let options = json!({"include_usage": true, "continuous_usage_stats": true});
    let body = json!({"prompt": ids, "temperature": 1, "seed": 3, "max_tokens": 6, "n": 2,
                      "stream": true, "stream_options": options});
    check(&streamed_chunks(cluster, &body)?, ids.len() as u64, 2)?;
    // Chat: the prompt is the template's, as the whole reply counts it.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                      "stream": true, "stream_options": options});
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let whole = http_post(&cluster.http, "/v1/chat/completions", &[], &whole)?.json()?;
    let prompt = whole["usage"]["prompt_tokens"].as_u64().context("usage")?;
    check(&streamed_chunks_of(cluster, "/v1/chat/completions", &body)?, prompt, 1)
}

/// The chunks of a streamed `/v1/completions` answer, which must end with `[DONE]`.
fn streamed_chunks(cluster: &Cluster, body: &Value) -> Result<Vec<Value>> {
    streamed_chunks_of(cluster, "/v1/completions", body)
}

/// The chunks of a streamed answer from `path`, which must end with `[DONE]`.
fn streamed_chunks_of(cluster: &Cluster, path: &str, body: &Value) -> Result<Vec<Value>> {
    let r = http_post(&cluster.http, path, &[], body)?;
    anyhow::ensure!(r.status == 200, "{body}: {}", r.body);
    let events = r.sse_data();
    anyhow::ensure!(events.last().map(String::as_str) == Some("[DONE]"), "{}", r.body);
    Ok(events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?)
}

/// The text of choice `index` joined over streamed `chunks`.
fn joined_text(chunks: &[Value], index: usize) -> String {
    chunks
        .iter()
        .flat_map(|k| k["choices"].as_array().cloned().unwrap_or_default())
        .filter(|ch| ch["index"] == index)
        .filter_map(|ch| ch["text"].as_str().map(String::from))
        .collect()
}

/// vLLM's tokenizer endpoints, as lm-evaluation-harness's remote tokenizer calls them:
/// `/tokenizer_info` names the special tokens, `/tokenize` gives the ids a completion prompt
/// gets (BOS first; without it when special tokens are not added; a special token's text is
/// its id), `/detokenize` gives the text back; bad ids, unknown fields and another model are
/// 400s.
fn tokenizer_endpoints(cluster: &Cluster) -> Result<()> {
    let info = dsvl_e2e::http_get_response(&cluster.http, "/tokenizer_info")?;
    assert_eq!(info.status, 200, "{}", info.body);
    let info = info.json()?;
    let eos = info["eos_token"].as_str().context("eos_token")?.to_string();
    assert_eq!(info["model_max_length"], 16384, "{info}");
    let post = |path: &str, body: Value| -> Result<Value> {
        let r = http_post(&cluster.http, path, &[], &body)?;
        anyhow::ensure!(r.status == 200, "{path} {body}: {}", r.body);
        r.json()
    };
    let text = "Once upon a time";
    let with_bos = post("/tokenize", json!({"prompt": text}))?;
    let completion = completion(
        cluster,
        &json!({"prompt": text, "max_tokens": 1, "return_prompt_token_ids": true}),
    )?;
    assert_eq!(with_bos["tokens"], completion["dsvl"]["prompt_token_ids"], "{with_bos}");
    assert_eq!(with_bos["count"].as_u64(), with_bos["tokens"].as_array().map(|t| t.len() as u64));
    let bare = post("/tokenize", json!({"prompt": text, "add_special_tokens": false}))?;
    let bare_ids = bare["tokens"].as_array().context("tokens")?;
    assert_eq!(bare_ids[..], with_bos["tokens"].as_array().context("tokens")?[1..], "no BOS");
    let eos_ids = post("/tokenize", json!({"prompt": eos, "add_special_tokens": false}))?;
    assert_eq!(eos_ids["tokens"].as_array().map(Vec::len), Some(1), "{eos_ids}");
    let back = post("/detokenize", json!({"tokens": bare["tokens"]}))?;
    assert_eq!(back["prompt"], text);
    for (path, bad, says) in [
        ("/detokenize", json!({"tokens": [999_999_999u32]}), "not in the vocabulary"),
        ("/tokenize", json!({"prompt": "x", "frobnicate": 1}), "frobnicate"),
        ("/tokenize", json!({"prompt": "x", "model": "another"}), "not served here"),
    ] {
        let r = http_post(&cluster.http, path, &[], &bad)?;
        assert_eq!(r.status, 400, "{path} {bad}: {}", r.body);
        assert!(r.body.contains(says), "{path} {bad}: {}", r.body);
    }
    Ok(())
}
