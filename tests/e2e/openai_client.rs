//! The official `openai` Python client (PyPI, installed into `tests/python/.venv` by
//! `scripts/setup`), unmodified, against the gateway's HTTP API: models, a multimodal
//! completion streamed and not, authentication and bad-request errors as the client's typed
//! exceptions. Greedy ids must equal the reference's. Then every sampling and output parameter
//! as the client sends it (OpenAI's as arguments, vLLM's through `extra_body`): `n` with
//! `logprobs`/`top_logprobs`, streamed and not, `seed`, the presence and frequency penalties,
//! `logit_bias`, `min_p`, `stop_token_ids` (with `stop_reason`), `ignore_eos`, `min_tokens`,
//! `structured_outputs`' `choice`, the legacy completions'
//! `logprobs`, and lm-evaluation-harness's scoring request (a batch of prompts, `echo`). Then tool calls: `required` and a named function (grammar-constrained, streamed
//! and not) parse into the client's `tool_calls`, a later turn with the role `tool` renders as
//! documented, `auto` answers in text here.

use std::process::Command;

use anyhow::{Context, Result};
use dsvl_e2e::{golden_generated, Cluster, Options};
use dsvl_testkit::{golden_dir, repo_root};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_works_unmodified() -> Result<()> {
    let python = repo_root().join("tests/python/.venv/bin/python");
    anyhow::ensure!(python.exists(), "{} is missing: run ./scripts/setup", python.display());
    let cluster = Cluster::start(Options {
        gateway_args: vec!["--api-keys".into(), "sk-test=acme".into()],
        ..Options::default()
    })
    .await?;
    let want = golden_generated("image")?;
    let script = repo_root().join("tests/python/openai_client_check.py");
    let image = golden_dir().join("rocket.jpg");
    let base = format!("http://{}/v1", cluster.http);
    let eos = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer.special().eos;
    // A token no greedy reply here starts with, to force with logit_bias.
    let forced = 150u32;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .arg("sk-test")
            .arg(image)
            .arg(want.len().to_string())
            .arg(eos.to_string())
            .arg(forced.to_string())
            .output()
    })
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "client script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    let want = golden_generated("image")?;
    let ids = |k: &str| -> Result<Vec<u32>> { Ok(serde_json::from_value(v[k].clone())?) };
    assert_eq!(v["models"], serde_json::json!(["tiny-dsvl"]));
    assert_eq!(ids("token_ids")?, want, "non-streaming ids");
    assert_eq!(ids("stream_token_ids")?, want, "streaming ids");
    assert_eq!(v["text"], v["stream_text"]);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["stream_finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], want.len());
    // The streamed request repeats the first: the official client reads the prefix cache's
    // count (`usage.prompt_tokens_details.cached_tokens`), 0 the first time, then every whole
    // 32-token block short of the prompt's last token.
    let cached = |k: &str| v[k]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let prompt = v["usage"]["prompt_tokens"].as_u64().context("prompt_tokens")?;
    assert_eq!(cached("usage"), Some(0));
    assert_eq!(cached("stream_usage"), Some((prompt - 1) / 32 * 32));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(v["stream_usage"][k], v["usage"][k], "{k}");
    }
    assert_eq!(v["bad_key"], 401);
    assert_eq!(v["remote_url"], 400);
    check_sampling(&v["sampling"], eos, forced)?;
    check_tools(&v["tools"])
}

fn check_tools(t: &Value) -> Result<()> {
    let r = &t["required"];
    assert_eq!(r["finish_reason"], "tool_calls", "{r}");
    assert_eq!(r["content"], Value::Null);
    let calls = r["calls"].as_array().context("calls")?;
    assert!(!calls.is_empty());
    for c in calls {
        assert_eq!(c["type"], "function");
        assert!(c["id"].as_str().is_some_and(|i| i.starts_with("call_")), "{c}");
        match c["name"].as_str() {
            Some("get_weather") => {
                assert!(c["arguments"]["city"].as_str().is_some_and(|s| s.chars().count() <= 12))
            }
            Some("get_time") => {
                assert!(["utc", "local"].contains(&c["arguments"]["zone"].as_str().unwrap_or("")))
            }
            other => panic!("not a listed tool: {other:?}"),
        }
    }
    let named = &t["named_stream"];
    assert_eq!(named["finish_reason"], "tool_calls", "{named}");
    assert_eq!(named["content"], "", "a call streams no content");
    let calls = named["calls"].as_array().context("calls")?;
    assert_eq!(calls.len(), 1, "{named}");
    assert_eq!(calls[0]["name"], "get_time");
    assert!(["utc", "local"].contains(&calls[0]["arguments"]["zone"].as_str().unwrap_or("")));
    // The later turn's prompt, as documented: the tools at the end of the system prompt, the
    // call as the reply format, the result in a user turn.
    let f = &t["follow_up"];
    assert!(f["content"].as_str().is_some(), "{f}");
    let ids: Vec<u32> = serde_json::from_value(f["prompt_ids"].clone())?;
    let tok = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer;
    let prompt = tok.decode(&ids, false)?;
    let id = f["call_id"].as_str().context("id")?;
    for piece in [
        "You can call the following tools.",
        r#""name":"get_weather""#,
        r#""description":"Weather in a city""#,
        r#"Assistant: {"tool_calls":[{"#,
        &format!(
            "User: Tool result ({}, {id}):
Sunny, 21 C",
            calls_name(t)
        ),
    ] {
        assert!(
            prompt.contains(piece),
            "`{piece}` not in the prompt:
{prompt}"
        );
    }
    assert_eq!(t["auto"]["tool_calls"], Value::Null, "{}", t["auto"]);
    assert!(t["auto"]["content"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(t["unknown_call"], 400);
    Ok(())
}

fn calls_name(t: &Value) -> String {
    t["required"]["calls"][0]["name"].as_str().unwrap_or_default().to_string()
}

fn check_sampling(s: &Value, eos: u32, forced: u32) -> Result<()> {
    let ids = |v: &Value| -> Result<Vec<u32>> { Ok(serde_json::from_value(v.clone())?) };
    let greedy = ids(&s["greedy"])?;
    assert_eq!(greedy.len(), 16);
    // n = 2 with logprobs: choice i is what seed 11 + i gives alone; 3 alternatives per token,
    // the chosen token's log-probability never above the best one's.
    let n = s["n"].as_array().context("n")?;
    assert_eq!(n.len(), 2);
    let choice_ids: Vec<Vec<u32>> = serde_json::from_value(s["n_ids"].clone())?;
    assert_eq!(ids(&s["seed_11"])?, choice_ids[0], "choice 0 samples with the seed");
    assert_eq!(ids(&s["seed_12"])?, choice_ids[1], "choice 1 with seed + 1");
    for (i, c) in n.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        let lps = c["logprobs"].as_array().context("logprobs")?;
        assert_eq!(lps.len(), 6);
        let top = c["top"].as_array().context("top")?;
        for (lp, alts) in lps.iter().zip(top) {
            let alts = alts.as_array().context("alternatives")?;
            assert_eq!(alts.len(), 3);
            assert!(lp.as_f64() <= alts[0].as_f64().map(|a| a + 1e-5), "{lp} vs {alts:?}");
        }
        let tokens: String =
            c["tokens"].as_array().context("tokens")?.iter().filter_map(Value::as_str).collect();
        assert_eq!(Some(tokens.as_str()), c["content"].as_str(), "the tokens spell the content");
    }
    assert_eq!(s["n_usage"]["completion_tokens"], 12, "usage counts both choices");
    for i in ["0", "1"] {
        let streamed = &s["stream_n"][i];
        let whole = &n[i.parse::<usize>()?];
        assert_eq!(streamed["content"], whole["content"], "choice {i} streamed");
        // The same tokens; their log-probabilities agree to rounding only, since the two
        // requests may be batched with different neighbours (row 1 of a batch-2 matmul or
        // a batch-1 GEMV sum in different orders).
        let (a, b) = (streamed["logprobs"].as_array(), whole["logprobs"].as_array());
        let (a, b) = (a.context("streamed logprobs")?, b.context("logprobs")?);
        assert_eq!(a.len(), b.len(), "choice {i} streamed logprobs");
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            assert!((x - y).abs() < 1e-4, "choice {i} streamed logprobs: {a:?} vs {b:?}");
        }
        assert_eq!(streamed["finish_reason"], "length");
    }
    // Negative penalties make this model repeat (its greedy reply repeats nothing).
    let distinct = |v: &[u32]| v.iter().collect::<std::collections::HashSet<_>>().len();
    assert_eq!(distinct(&greedy), greedy.len());
    let penalised = ids(&s["penalised"])?;
    assert!(distinct(&penalised) < penalised.len() / 2, "{penalised:?}");
    assert_eq!(ids(&s["forced"])?, vec![forced; 4]);
    assert_eq!(ids(&s["min_p"])?, greedy, "min_p 1 keeps only the most likely token");
    let cut = greedy.iter().position(|&t| t == greedy[3]).context("stop")? + 1;
    assert_eq!(ids(&s["stopped"][0])?, greedy[..cut]);
    assert_eq!(s["stopped"][1], "stop");
    assert_eq!(s["stopped"][2], greedy[3], "vLLM's stop_reason names the stop id");
    // min_tokens holds the forced EOS back for three tokens; a choice list is matched whole.
    let min_tokens = ids(&s["min_tokens"][0])?;
    assert_eq!(
        (min_tokens.len(), min_tokens[3], &s["min_tokens"][1]),
        (4, eos, &Value::from("stop"))
    );
    assert!(["rockets fly", "rockets fall"].contains(&s["choice"].as_str().unwrap_or("")), "{s}");
    assert_eq!(ids(&s["ignore_eos"][0])?, vec![eos; 4]);
    assert_eq!(s["ignore_eos"][1], "length");
    // Legacy completions: logprobs 2 is the chosen token's and two alternatives.
    let legacy = s["legacy"].as_array().context("legacy")?;
    assert_eq!(legacy.len(), 2);
    for c in legacy {
        assert_eq!(c["token_logprobs"].as_array().map(Vec::len), Some(5), "{c}");
        assert_eq!(c["top"], serde_json::json!([2, 2, 2, 2, 2]), "{c}");
        let tokens: Vec<&str> =
            c["tokens"].as_array().context("tokens")?.iter().filter_map(Value::as_str).collect();
        let offsets = ids(&c["offsets"])?;
        assert_eq!(offsets[0], 0);
        assert_eq!(
            offsets[4] as usize,
            tokens[..4].iter().map(|t| t.chars().count()).sum::<usize>()
        );
    }
    assert_ne!(legacy[0]["tokens"], legacy[1]["tokens"], "two different samples");
    // lm-evaluation-harness's scoring request: a batch of two prompts (6 and 9 tokens), each
    // echoed with one figure per token (the first null) and one alternative, then the new one.
    let scoring = s["scoring"].as_array().context("scoring")?;
    assert_eq!(scoring.len(), 2, "{}", s["scoring"]);
    for (i, (c, len)) in scoring.iter().zip([6usize, 9]).enumerate() {
        assert_eq!(c["index"], i);
        let figures = c["token_logprobs"].as_array().context("token_logprobs")?;
        assert_eq!(figures.len(), len + 1, "{c}");
        assert!(figures[0].is_null() && figures[1..].iter().all(Value::is_f64), "{c}");
        let mut top = vec![serde_json::json!(null)];
        top.extend(std::iter::repeat_n(serde_json::json!(1), len));
        assert_eq!(c["top"], serde_json::json!(top), "{c}");
    }
    assert_eq!(s["too_many_top"], 400);
    Ok(())
}
