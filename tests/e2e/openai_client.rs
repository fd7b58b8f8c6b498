//! The official `openai` Python client (PyPI, installed into `tests/python/.venv` by
//! `scripts/setup`), unmodified, against the gateway's HTTP API: models, a multimodal
//! completion streamed and not, authentication and bad-request errors as the client's typed
//! exceptions. Greedy ids must equal the reference's.

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
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .arg("sk-test")
            .arg(image)
            .arg(want.len().to_string())
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
    Ok(())
}
