//! The prefix cache through the gateway, all real binaries: the cached count in the OpenAI
//! usage (`prompt_tokens_details.cached_tokens`) and in the gRPC finish; tenants that never
//! hit each other's blocks; and prefix-aware routing against least-work routing over two
//! decoder groups with concurrent multi-turn image conversations (the cached share of prompt
//! tokens of each, printed for benches/README.md).

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use dsvl_e2e::{
    golden_case, golden_generated, grpc_messages, http_post, Cluster, HttpResponse, Options,
};
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::ChatRequest;
use serde_json::{json, Value};

fn png_data_url(rgb: [u8; 3]) -> String {
    let pixels: Vec<u8> =
        (0..64 * 64).flat_map(|i| [rgb[0], rgb[1] ^ (i % 7) as u8, rgb[2]]).collect();
    let png = dsvl_testkit::png_rgb8(64, 64, &pixels);
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn chat(cluster: &Cluster, key: Option<&str>, messages: &Value, n: u32) -> Result<Value> {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let body = json!({"messages": messages, "temperature": 0, "max_tokens": n});
    let r: HttpResponse = http_post(&cluster.http, "/v1/chat/completions", &headers, &body)?;
    anyhow::ensure!(r.status == 200, "{}", r.body);
    r.json()
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens")
}

/// Same prompt and image from two API keys: each tenant hits only its own cached blocks; the
/// gRPC finish carries the same count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_reported_and_never_cross_tenants() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        gateway_args: vec!["--api-keys".into(), "sk-acme=acme,sk-globex=globex".into()],
        ..Options::default()
    })
    .await?;
    let messages = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url([200, 30, 90])}},
        {"type": "text", "text": "What is in the picture?"}]}]);
    let first = chat(&cluster, Some("sk-acme"), &messages, 4)?;
    let prompt = first["usage"]["prompt_tokens"].as_u64().context("prompt_tokens")?;
    assert_eq!(cached(&first), 0, "cold cache");
    let again = chat(&cluster, Some("sk-acme"), &messages, 4)?;
    let whole_blocks = (prompt - 1) / 32 * 32;
    assert_eq!(cached(&again), whole_blocks, "the same tenant's second request");
    assert_eq!(again["dsvl"]["token_ids"], first["dsvl"]["token_ids"]);
    let other = chat(&cluster, Some("sk-globex"), &messages, 4)?;
    assert_eq!(cached(&other), 0, "another tenant never sees acme's blocks");
    assert_eq!(other["dsvl"]["token_ids"], first["dsvl"]["token_ids"]);
    assert_eq!(cached(&chat(&cluster, Some("sk-globex"), &messages, 4)?), whole_blocks);

    // gRPC: the golden text conversation twice, the second from the cache.
    let golden = golden_case("text_only")?;
    let want = golden_generated("text")?;
    let mut finishes = Vec::new();
    for _ in 0..2 {
        let mut client = cluster.chat().await?;
        let mut req = tonic::Request::new(ChatRequest {
            messages: grpc_messages(&golden["conversation"])?,
            sampling: Some(dsvl_proto::v1::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: want.len() as u32,
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", "Bearer sk-acme".parse()?);
        let mut stream = client.generate(req).await?.into_inner();
        while let Some(m) = stream.message().await? {
            if let Some(Event::Finish(f)) = m.event {
                finishes.push(f);
            }
        }
    }
    assert_eq!(finishes[0].token_ids, want);
    assert_eq!(finishes[1].token_ids, want, "golden ids from a warm cache");
    assert!(finishes[0].cached_tokens <= 32, "only the shared system prompt block at most");
    assert_eq!(finishes[1].cached_tokens, (finishes[1].prompt_tokens - 1) / 32 * 32);
    Ok(())
}

/// Four concurrent three-turn conversations, each about its own image, over two decoder
/// groups: the prompt tokens answered from the cache with prefix-aware and with least-work
/// routing. Returns (cached share of all prompt tokens, cached tokens of each later turn).
async fn conversations(routing: &str) -> Result<(f64, Vec<u64>)> {
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        decoder_groups: 2,
        gateway_args: vec!["--decoder-routing".into(), routing.into()],
        ..Options::default()
    })
    .await?;
    let cluster = std::sync::Arc::new(cluster);
    let mut tasks = Vec::new();
    for c in 0..4u8 {
        let cluster = cluster.clone();
        tasks.push(tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64)>> {
            let mut messages = vec![json!({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url([40 * c, 255 - 30 * c, 7])}},
                {"type": "text", "text": "Describe the picture."}]})];
            let mut turns = Vec::new();
            for turn in 0..3 {
                let r = chat(&cluster, None, &Value::Array(messages.clone()), 6)?;
                turns.push((r["usage"]["prompt_tokens"].as_u64().unwrap_or(0), cached(&r)));
                let reply = r["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
                messages.push(json!({"role": "assistant", "content": reply}));
                messages.push(json!({"role": "user", "content": format!("And then, part {turn}?")}));
            }
            Ok(turns)
        }));
    }
    let (mut prompt, mut hit, mut later) = (0u64, 0u64, Vec::new());
    for t in tasks {
        let turns = t.await??;
        for (i, (p, c)) in turns.into_iter().enumerate() {
            prompt += p;
            hit += c;
            if i > 0 {
                later.push(c);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok((hit as f64 / prompt.max(1) as f64, later))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_routing_keeps_conversations_on_their_cache() -> Result<()> {
    let (prefix_share, prefix_later) = conversations("prefix").await?;
    let (least_share, least_later) = conversations("least-work").await?;
    println!(
        "cached share of prompt tokens, 4 concurrent 3-turn image conversations over 2 decoder \
         groups: prefix-aware {prefix_share:.3} (later turns {prefix_later:?}), least-work \
         {least_share:.3} (later turns {least_later:?})"
    );
    // Every later turn under prefix routing found at least its image (576 positions) cached.
    assert!(prefix_later.iter().all(|&c| c >= 576), "{prefix_later:?}");
    assert!(prefix_share >= least_share, "{prefix_share} < {least_share}");
    Ok(())
}
