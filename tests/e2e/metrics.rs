//! Every tier's `/metrics` after real traffic, against the one list of metrics
//! (`dsvl_telemetry::catalog`): each exported family is listed for its tier with its type,
//! the exposition passes `promtool check metrics` (Debian's `prometheus` package, installed by
//! `scripts/setup`), the decoder's vLLM-named series agree with dsvl's own and carry
//! `model_name`, and a real Prometheus scraping the decoder with the shipped rename rule
//! (`deploy/prometheus/vllm-names.yml`) stores them under vLLM's `vllm:*` names.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsvl_e2e::{http_post, Cluster, Options};
use dsvl_telemetry::catalog::{Kind, Tier, METRICS};
use dsvl_testkit::{free_port, http_get, metric_sum, repo_root, ServiceProcess};
use serde_json::{json, Value};

fn promtool_check(text: &str) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool is missing: run ./scripts/setup")?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "promtool check metrics: {said}");
    Ok(said)
}

/// `(name, type)` of every `# TYPE` line.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tier_exports_the_catalog_in_a_linted_exposition() -> Result<()> {
    let cluster =
        Cluster::start(Options { vision_replicas: 1, tp: 1, redis: true, ..Options::default() })
            .await?;
    // Traffic that touches every tier: an image chat (vision, shared cache, decoder), a text
    // chat with two choices (prefix hits), a stop by EOS and a refused request.
    let png = dsvl_testkit::png_rgb8(32, 32, &[90u8; 32 * 32 * 3]);
    let image = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png)
    );
    let eos = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer.special().eos;
    let bodies = [
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}], "temperature": 0, "max_tokens": 4}),
        json!({"messages": [{"role": "user", "content": "Hello there"}], "n": 2, "seed": 1, "max_tokens": 5}),
        json!({"messages": [{"role": "user", "content": "Stop"}], "temperature": 0, "max_tokens": 5, "logit_bias": {eos.to_string(): 100}}),
    ];
    let mut completion_tokens = 0;
    for body in &bodies {
        let r = http_post(&cluster.http, "/v1/chat/completions", &[], body)?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        completion_tokens += r.json()?["usage"]["completion_tokens"].as_u64().context("usage")?;
    }
    let r = http_post(&cluster.http, "/v1/chat/completions", &[], &json!({"messages": []}))?;
    assert_eq!(r.status, 400);

    for (tier, addr) in [
        (Tier::Gateway, &cluster.gateway.metrics),
        (Tier::Vision, &cluster.vision[0].metrics),
        (Tier::Decoder, &cluster.decoder.metrics),
    ] {
        let text = http_get(addr, "/metrics")?;
        promtool_check(&text).with_context(|| format!("{tier:?}"))?;
        let found = families(&text);
        assert!(found.len() > 5, "{tier:?}: {text}");
        for (name, kind) in &found {
            let m = METRICS.iter().find(|m| m.name == name && m.tiers.contains(&tier));
            let m = m.with_context(|| format!("{tier:?} exports `{name}`, not in the catalog"))?;
            let want = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert_eq!(kind, want, "{name}");
        }
        if tier != Tier::Vision {
            let unlabelled = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .find(|l| !l.contains("model_name=\"tiny-dsvl\""));
            assert_eq!(unlabelled, None, "{tier:?}: every series carries model_name");
        }
    }

    // The decoder's vLLM series agree with its own and with the replies.
    let d = http_get(&cluster.decoder.metrics, "/metrics")?;
    let m = |name: &str, labels: &[(&str, &str)]| metric_sum(&d, name, labels);
    let generated = m("vllm_generation_tokens_total", &[("model_name", "tiny-dsvl")]);
    assert_eq!(generated, completion_tokens as f64);
    assert_eq!(generated, m("dsvl_decoder_generated_tokens_total", &[]));
    assert_eq!(m("vllm_request_success_total", &[("finished_reason", "length")]), 3.0);
    assert_eq!(m("vllm_request_success_total", &[("finished_reason", "stop")]), 1.0);
    assert_eq!(m("vllm_request_prompt_tokens_count", &[]), 4.0);
    assert_eq!(m("vllm_prompt_tokens_total", &[]), m("vllm_request_prompt_tokens_sum", &[]));
    assert_eq!(
        m("vllm_prefix_cache_hits_total", &[]),
        m("dsvl_decoder_prefix_cache_hits_total", &[])
    );
    assert!(m("vllm_prefix_cache_hits_total", &[]) > 0.0, "the second choice hit the cache");
    assert_eq!(m("vllm_request_decode_time_seconds_count", &[]), 4.0);
    assert_eq!(m("vllm_num_requests_running", &[]), 0.0);
    assert!(d.contains("vllm_kv_cache_usage_perc{"), "{d}");

    // A real Prometheus with the shipped rename stores them under vLLM's names.
    let rule = std::fs::read_to_string(repo_root().join("deploy/prometheus/vllm-names.yml"))?;
    let dir = tempfile::tempdir()?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: decoder\n    static_configs:\n      - targets: [\"{}\"]\n{}",
        cluster.decoder.metrics,
        rule.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let web = format!("127.0.0.1:{}", free_port());
    let _prometheus = ServiceProcess::spawn(
        "prometheus",
        &[
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={web}"),
        ],
    )?;
    let query = |q: &str| -> Result<Value> {
        let body = http_get(&web, &format!("/api/v1/query?query={q}"))?;
        Ok(serde_json::from_str::<Value>(&body)?["data"]["result"].clone())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        if let Ok(v) = query("vllm:generation_tokens_total") {
            if v.as_array().is_some_and(|a| !a.is_empty()) {
                break v;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "Prometheus never stored the series");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(stored[0]["metric"]["model_name"], "tiny-dsvl", "{stored}");
    assert_eq!(stored[0]["value"][1], json!(generated.to_string()), "{stored}");
    assert_eq!(query("vllm_generation_tokens_total")?, json!([]), "renamed, not copied");
    Ok(())
}
