//! The sampling and output parameters through the public gRPC API, all real binaries: each
//! parameter is checked against what it must do to the tokens of the bundled random-weight
//! model (exact where the rule allows it, against a counterfactual otherwise, so a parameter
//! that is dropped on the way fails): `logprobs`/`top_logprobs`, `logit_bias`, the presence and
//! frequency penalties, `min_p`, `seed`, `n` (choices share the prefill), `stop_token_ids`,
//! `ignore_eos`, stop strings with `min_tokens` and `include_stop_str_in_output`, vLLM's
//! `stop_reason`, `prompt_logprobs`, `allowed_token_ids` and `bad_words`, and the refusals of
//! values out of range.

use std::collections::HashMap;

use anyhow::{Context, Result};
use dsvl_e2e::{Cluster, Options};
use dsvl_proto::v1::chat_finish::StopReason;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart, SamplingParams, TokenLogprob};
use tonic::Code;

/// One choice of a reply: its ids, per-token log-probabilities, finish reason, cached tokens.
#[derive(Debug, Default, Clone)]
struct Choice {
    ids: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: String,
    stop_reason: Option<StopReason>,
    cached: u32,
    prompt_tokens: u32,
}

fn ask(text: &str, max_tokens: u32, sampling: SamplingParams) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Text(text.into())) }],
        }],
        sampling: Some(sampling),
        max_tokens,
        ..Default::default()
    }
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: Some(0.0), ..Default::default() }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams { temperature: Some(1.0), seed: Some(seed), ..Default::default() }
}

async fn run(cluster: &Cluster, req: ChatRequest) -> Result<Vec<Choice>, tonic::Status> {
    let mut client = cluster.chat().await.map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let mut choices: HashMap<u32, Choice> = HashMap::new();
    while let Some(m) = stream.message().await? {
        let c = choices.entry(m.index).or_default();
        match m.event {
            Some(Event::Delta(d)) => {
                c.text.push_str(&d.text);
                c.logprobs.extend(d.logprobs);
            }
            Some(Event::Finish(f)) => {
                c.ids = f.token_ids;
                c.finish = f.finish_reason;
                c.stop_reason = f.stop_reason;
                c.cached = f.cached_tokens;
                c.prompt_tokens = f.prompt_tokens;
            }
            None => {}
        }
    }
    let mut out: Vec<(u32, Choice)> = choices.into_iter().collect();
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

async fn one(cluster: &Cluster, req: ChatRequest) -> Result<Choice> {
    let mut v = run(cluster, req).await?;
    anyhow::ensure!(v.len() == 1, "one choice expected, got {}", v.len());
    Ok(v.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_and_output_parameters_over_grpc() -> Result<()> {
    let cluster =
        Cluster::start(Options { vision_replicas: 1, tp: 1, redis: false, ..Options::default() })
            .await?;
    let served = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?;
    let eos = served.tokenizer.special().eos;
    let prompt = "Tell me about rockets.";
    let base = one(&cluster, ask(prompt, 16, greedy())).await?;
    assert_eq!(base.ids.len(), 16, "{base:?}");

    // logprobs + top_logprobs: one entry per token; greedy picks the head of the list.
    let req = ChatRequest { logprobs: true, top_logprobs: 5, ..ask(prompt, 16, greedy()) };
    let c = one(&cluster, req).await?;
    assert_eq!(c.ids, base.ids, "asking for logprobs does not change the tokens");
    assert_eq!(c.logprobs.len(), c.ids.len());
    for (lp, &id) in c.logprobs.iter().zip(&c.ids) {
        assert_eq!(lp.id, id);
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].id, id, "greedy takes the most likely token");
        assert!((lp.top[0].logprob - lp.logprob).abs() < 1e-5, "{lp:?}");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob), "{lp:?}");
        assert!(lp.logprob <= 0.0 && lp.top.iter().all(|t| !t.token.is_empty() || t.id == eos));
    }

    // logit_bias: +100 forces a token (greedy too), -100 bans the greedy one.
    let forced = (0..200u32).find(|t| !base.ids.contains(t) && *t != eos).context("a token")?;
    let biased = |bias: HashMap<u32, f32>| SamplingParams { logit_bias: bias, ..greedy() };
    let c = one(&cluster, ask(prompt, 6, biased(HashMap::from([(forced, 100.0)])))).await?;
    assert_eq!(c.ids, vec![forced; 6]);
    let c = one(&cluster, ask(prompt, 6, biased(HashMap::from([(base.ids[0], -100.0)])))).await?;
    assert_ne!(c.ids[0], base.ids[0]);

    // Presence and frequency penalties (greedy), negative here: they reward repeating, and
    // this model's unpenalised reply repeats no token. Every chosen token is the argmax of the
    // penalised scores among the 20 most likely raw ones, and the reply now repeats.
    let (freq, pres) = (-1.5f32, -2.0f32);
    let distinct = |ids: &[u32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert_eq!(distinct(&base.ids), base.ids.len(), "{:?}", base.ids);
    let penalised =
        SamplingParams { presence_penalty: Some(pres), frequency_penalty: Some(freq), ..greedy() };
    let req = ChatRequest { logprobs: true, top_logprobs: 20, ..ask(prompt, 16, penalised) };
    let c = one(&cluster, req).await?;
    assert!(distinct(&c.ids) < c.ids.len() / 2, "the penalties make it repeat: {:?}", c.ids);
    let mut counts: HashMap<u32, f32> = HashMap::new();
    for lp in &c.logprobs {
        let score = |id: u32, raw: f32| {
            let n = counts.get(&id).copied().unwrap_or(0.0);
            raw - n * freq - if n > 0.0 { pres } else { 0.0 }
        };
        let chosen = score(lp.id, lp.logprob);
        for alt in &lp.top {
            assert!(chosen >= score(alt.id, alt.logprob) - 1e-4, "{lp:?} with {counts:?}");
        }
        *counts.entry(lp.id).or_default() += 1.0;
    }

    // seed: the same seed gives the same tokens, another seed others; min_p 1 keeps only the
    // most likely token, so sampling at temperature 1 becomes greedy.
    let s7 = one(&cluster, ask(prompt, 16, sampled(7))).await?;
    assert_eq!(one(&cluster, ask(prompt, 16, sampled(7))).await?.ids, s7.ids);
    assert_ne!(one(&cluster, ask(prompt, 16, sampled(8))).await?.ids, s7.ids);
    assert_ne!(s7.ids, base.ids, "sampling at temperature 1 is not greedy here");
    // No seed: a fresh random seed per request (OpenAI's meaning), so identical requests
    // differ, and so do the choices of one request.
    let unseeded = || SamplingParams { temperature: Some(1.0), ..Default::default() };
    let u1 = one(&cluster, ask(prompt, 16, unseeded())).await?;
    assert_ne!(one(&cluster, ask(prompt, 16, unseeded())).await?.ids, u1.ids);
    let choices = run(&cluster, ChatRequest { n: 2, ..ask(prompt, 16, unseeded()) }).await?;
    assert_ne!(choices[0].ids, choices[1].ids);
    let min_p = SamplingParams { min_p: Some(1.0), ..sampled(7) };
    assert_eq!(one(&cluster, ask(prompt, 16, min_p)).await?.ids, base.ids);

    // n: three choices of a new prompt; choice i samples with seed + i, and choices 1 and 2
    // take the prompt's whole blocks from the prefix cache.
    let other = "Why is the sky blue on a clear day?";
    let choices = run(&cluster, ChatRequest { n: 3, ..ask(other, 10, sampled(40)) }).await?;
    assert_eq!(choices.len(), 3);
    let whole_blocks = (choices[0].prompt_tokens - 1) / 32 * 32;
    // Choice 0 finds at most the system prompt's block from the earlier requests.
    assert!(choices[0].cached < whole_blocks, "{choices:?}");
    for (i, c) in choices.iter().enumerate() {
        let alone = one(&cluster, ask(other, 10, sampled(40 + i as u64))).await?;
        assert_eq!(c.ids, alone.ids, "choice {i}");
        if i > 0 {
            assert_eq!(c.cached, whole_blocks, "choice {i} shares the prefill");
        }
    }
    assert_ne!(choices[0].ids, choices[1].ids);

    // stop_token_ids end the reply after the id, as stop: the id is in the token ids, its
    // text only under include_stop_str_in_output (vLLM's rule).
    let stop = base.ids[3];
    let cut = base.ids.iter().position(|&t| t == stop).context("stop")? + 1;
    let c = one(&cluster, ChatRequest { stop_token_ids: vec![stop], ..ask(prompt, 16, greedy()) })
        .await?;
    assert_eq!((c.ids.as_slice(), c.finish.as_str()), (&base.ids[..cut], "stop"));
    assert_eq!(c.stop_reason, Some(StopReason::StopTokenId(stop)), "vLLM's stop_reason");
    let text_of = |ids: &[u32]| served.tokenizer.decode(ids, true);
    let (without, with) = (text_of(&base.ids[..cut - 1])?, text_of(&base.ids[..cut])?);
    assert_ne!(without, with, "the stop token has text");
    assert_eq!(c.text, without);
    let req = ChatRequest {
        stop_token_ids: vec![stop],
        include_stop_str_in_output: true,
        ..ask(prompt, 16, greedy())
    };
    let c = one(&cluster, req).await?;
    assert_eq!((c.ids.as_slice(), c.text.as_str()), (&base.ids[..cut], with.as_str()));

    // ignore_eos: with EOS forced, the reply ends at once, unless EOS is ignored.
    let to_eos = || biased(HashMap::from([(eos, 100.0)]));
    let c = one(&cluster, ask(prompt, 4, to_eos())).await?;
    assert_eq!((c.ids.as_slice(), c.finish.as_str()), (&[eos][..], "stop"));
    assert_eq!(c.stop_reason, None, "EOS has no stop_reason");
    let c = one(&cluster, ChatRequest { ignore_eos: true, ..ask(prompt, 4, to_eos()) }).await?;
    assert_eq!((c.ids.as_slice(), c.finish.as_str()), (&[eos; 4][..], "length"));

    // allowed_token_ids: every token is one of them (greedy: the likelier of the two).
    let allowed = vec![base.ids[5], forced];
    let c = one(
        &cluster,
        ChatRequest { allowed_token_ids: allowed.clone(), ..ask(prompt, 8, greedy()) },
    )
    .await?;
    assert!(c.ids.iter().all(|t| allowed.contains(t)) && c.ids.len() == 8, "{c:?}");
    // bad_words: a word that is one token as tokenized never appears, so the greedy reply,
    // which has it, changes.
    let tok = &served.tokenizer;
    let (word, id) = base
        .ids
        .iter()
        .map(|&t| (tok.decode(&[t], false).unwrap_or_default(), t))
        .find(|(w, t)| {
            !w.trim().is_empty() && tok.encode_with(w.trim_start(), false).ok() == Some(vec![*t])
        })
        .context("a greedy token that is a word of its own")?;
    let c =
        one(&cluster, ChatRequest { bad_words: vec![word.clone()], ..ask(prompt, 16, greedy()) })
            .await?;
    assert!(!c.ids.contains(&id), "{word:?} ({id}) in {c:?}");
    assert_ne!(c.ids, base.ids);

    // min_tokens: EOS (forced) and stop_token_ids wait for the minimum, then end the reply.
    let c = one(&cluster, ChatRequest { min_tokens: 3, ..ask(prompt, 6, to_eos()) }).await?;
    assert_eq!((c.ids.len(), c.ids[3], c.finish.as_str()), (4, eos, "stop"), "{c:?}");
    assert!(!c.ids[..3].contains(&eos), "{c:?}");
    let req = ChatRequest {
        stop_token_ids: vec![stop],
        min_tokens: cut as u32,
        ..ask(prompt, 16, greedy())
    };
    let c = one(&cluster, req).await?;
    assert!(c.ids.len() > cut && !c.ids[..cut].contains(&stop), "{c:?}");
    assert_eq!(c.finish, if c.ids.last() == Some(&stop) { "stop" } else { "length" });

    // Stop strings: the text is cut before the first match, or after it when asked to keep
    // it; under min_tokens the first tokens' text is not searched.
    assert_eq!(base.finish, "length", "{base:?}");
    let from = base.text.char_indices().nth(4).context("4 characters")?.0;
    let to = base.text[from..].char_indices().nth(3).map_or(base.text.len(), |(i, _)| from + i);
    let stop_str = base.text[from..to].to_string();
    let at = base.text.find(&stop_str).context("the stop string")?;
    let with_stop = |min_tokens, include_stop_str_in_output| ChatRequest {
        stop: vec![stop_str.clone()],
        min_tokens,
        include_stop_str_in_output,
        ..ask(prompt, 16, greedy())
    };
    let c = one(&cluster, with_stop(0, false)).await?;
    assert_eq!((c.text.as_str(), c.finish.as_str()), (&base.text[..at], "stop"), "{stop_str:?}");
    assert_eq!(c.stop_reason, Some(StopReason::StopString(stop_str.clone())));
    let c = one(&cluster, with_stop(0, true)).await?;
    let kept = &base.text[..at + stop_str.len()];
    assert_eq!((c.text.as_str(), c.finish.as_str()), (kept, "stop"), "{stop_str:?}");
    let c = one(&cluster, with_stop(16, false)).await?;
    assert_eq!((c.text.as_str(), c.finish.as_str()), (base.text.as_str(), "length"));
    assert_eq!(c.stop_reason, None);

    // prompt_logprobs: every prompt token after the first, scored whole (none from the
    // cache), with its rank and the alternatives asked for, on the finish.
    let mut client = cluster.chat().await?;
    let req = ChatRequest { prompt_logprobs: Some(2), ..ask(prompt, 2, greedy()) };
    let mut stream = client.generate(req).await?.into_inner();
    let mut finish = None;
    while let Some(m) = stream.message().await? {
        if let Some(Event::Finish(f)) = m.event {
            finish = Some(f);
        }
    }
    let f = finish.context("a finish")?;
    assert_eq!(f.prompt_logprobs.len() as u32, f.prompt_tokens - 1);
    assert_eq!(f.cached_tokens, 0, "the prompt is computed whole");
    for e in &f.prompt_logprobs {
        assert!(e.rank >= 1 && e.logprob <= 0.0 && e.top.len() == 2, "{e:?}");
        assert_eq!(e.rank == 1, e.top[0].id == e.id, "{e:?}");
        assert!(e.logprob <= e.top[0].logprob + 1e-6, "{e:?}");
    }

    // Out of range: INVALID_ARGUMENT naming the field.
    for (req, field) in [
        (
            ask(prompt, 4, SamplingParams { presence_penalty: Some(2.5), ..greedy() }),
            "presence_penalty",
        ),
        (ask(prompt, 4, SamplingParams { min_p: Some(1.5), ..greedy() }), "min_p"),
        (ask(prompt, 4, biased(HashMap::from([(1 << 30, 1.0)]))), "logit_bias"),
        (
            ChatRequest { logprobs: true, top_logprobs: 21, ..ask(prompt, 4, greedy()) },
            "top_logprobs",
        ),
        (ChatRequest { top_logprobs: 2, ..ask(prompt, 4, greedy()) }, "top_logprobs"),
        (ChatRequest { n: 9, ..ask(prompt, 4, greedy()) }, "n is 9"),
        (ChatRequest { min_tokens: 5, ..ask(prompt, 4, greedy()) }, "min_tokens 5"),
        (ChatRequest { prompt_logprobs: Some(21), ..ask(prompt, 4, greedy()) }, "prompt_logprobs"),
        (
            ChatRequest { allowed_token_ids: vec![1 << 30], ..ask(prompt, 4, greedy()) },
            "outside the vocabulary",
        ),
        (ChatRequest { bad_words: vec![" ".into()], ..ask(prompt, 4, greedy()) }, "bad_words"),
        (
            ChatRequest {
                min_tokens: 2,
                output_format: Some(dsvl_proto::v1::OutputFormat {
                    kind: Some(dsvl_proto::v1::output_format::Kind::Regex("a+".into())),
                }),
                ..ask(prompt, 4, greedy())
            },
            "min_tokens cannot be combined",
        ),
    ] {
        let e = run(&cluster, req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    Ok(())
}
