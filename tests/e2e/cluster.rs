//! The whole cluster through the gateway, as deployed: gateway + 2 vision-encoder replicas +
//! a decoder group at TP 2 (rank processes) + a real redis-server, all real binaries on
//! loopback. Golden greedy ids through gRPC and HTTP, encode-once caching, a vision replica
//! killed mid-run, client disconnects, deadlines, authentication and quotas.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use dsvl_e2e::{
    golden_case, golden_generated, golden_image, grpc_messages, http_post, Cluster, Options,
};
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::LoadRequest;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatFinish, ChatMessage, ChatRequest, ContentPart};
use serde_json::{json, Value};
use tonic::Code;

const IMAGE_TAG: &str = "<image_placeholder>";

/// The same conversation in OpenAI's format (images as base64 data URLs).
fn openai_messages(conv: &Value) -> Result<Value> {
    let mut out = Vec::new();
    for m in conv.as_array().context("conversation")? {
        let images: Vec<&str> = m["images"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut parts = Vec::new();
        for (i, text) in m["content"].as_str().unwrap_or("").split(IMAGE_TAG).enumerate() {
            if i > 0 {
                let b64 =
                    base64::engine::general_purpose::STANDARD.encode(golden_image(images[i - 1])?);
                parts.push(json!({"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{b64}")}}));
            }
            if !text.is_empty() {
                parts.push(json!({"type": "text", "text": text}));
            }
        }
        out.push(json!({"role": m["role"].as_str().unwrap_or("").to_lowercase(), "content": if parts.is_empty() { json!("") } else { json!(parts) }}));
    }
    Ok(Value::Array(out))
}

fn greedy_request(messages: Vec<ChatMessage>, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages,
        // Greedy: the golden ids.
        sampling: Some(dsvl_proto::v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens,
        return_prompt_token_ids: true,
        ..Default::default()
    }
}

/// Runs a gRPC chat to the end; returns the finish message and the concatenated text.
async fn grpc_chat(
    cluster: &Cluster,
    request: ChatRequest,
    timeout: Duration,
    key: Option<&str>,
) -> Result<(ChatFinish, String), tonic::Status> {
    let mut client = cluster.chat().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(request);
    req.set_timeout(timeout);
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Delta(d)) => {
                text.push_str(&d.text);
                ids.extend(d.token_ids);
            }
            Some(Event::Finish(f)) => {
                assert_eq!(ids, f.token_ids, "delta ids add up to the finish ids");
                return Ok((f, text));
            }
            None => {}
        }
    }
    Err(tonic::Status::internal("no finish"))
}

/// Golden `one_image` and `text_only` through gRPC, HTTP and HTTP streaming; the image is
/// encoded once for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_ids_through_grpc_and_http_with_one_encode() -> Result<()> {
    // Each tier logs in to Redis as its own least-privilege user (dsvl_cache::acl).
    let mut cluster = Cluster::start(Options { redis_acl: true, ..Options::default() }).await?;
    // The Kubernetes probes' health names (deploy/k8s): every service reports `startup` and
    // `liveness` once started.
    for probe in ["startup", "liveness"] {
        cluster.gateway.wait_serving(probe, Duration::from_secs(5)).await?;
        cluster.decoder.wait_serving(probe, Duration::from_secs(5)).await?;
        for v in &mut cluster.vision {
            v.wait_serving(probe, Duration::from_secs(5)).await?;
        }
    }
    for (case, prefix) in [("one_image", "image"), ("text_only", "text")] {
        let golden = golden_case(case)?;
        let want_prompt: Vec<u32> = serde_json::from_value(golden["input_ids"].clone())?;
        let want = golden_generated(prefix)?;
        let n = want.len() as u32;

        let (f, text) = grpc_chat(
            &cluster,
            greedy_request(grpc_messages(&golden["conversation"])?, n),
            Duration::from_secs(120),
            None,
        )
        .await?;
        assert_eq!(f.prompt_token_ids, want_prompt, "{case}: prompt ids through the gateway");
        assert_eq!(f.token_ids, want, "{case}: greedy ids via gRPC");
        assert_eq!(f.completion_tokens, n);

        let body = json!({"model": "tiny-dsvl", "messages": openai_messages(&golden["conversation"])?, "temperature": 0, "max_tokens": n});
        let r = http_post(&cluster.http, "/v1/chat/completions", &[], &body)?;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json()?;
        let ids: Vec<u32> = serde_json::from_value(v["dsvl"]["token_ids"].clone())?;
        assert_eq!(ids, want, "{case}: greedy ids via HTTP");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
        assert_eq!(v["usage"]["completion_tokens"], n);

        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        stream_body["stream_options"] = json!({"include_usage": true});
        let r = http_post(&cluster.http, "/v1/chat/completions", &[], &stream_body)?;
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap_or_default().starts_with("text/event-stream"));
        let events = r.sse_data();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e))
            .collect::<Result<_, _>>()?;
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: Vec<u32> = chunks
            .iter()
            .filter_map(|c| {
                c["dsvl"]["token_ids"]
                    .as_array()
                    .filter(|_| c["choices"][0]["finish_reason"].is_null())
            })
            .flatten()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(streamed, want, "{case}: greedy ids via SSE");
        let text_streamed: String =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text_streamed, text);
        assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"
            || c["choices"][0]["finish_reason"] == "stop"));
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], n, "usage chunk last");
    }
    // rocket.jpg went through the cluster three times (gRPC, HTTP, SSE): encoded once.
    assert_eq!(cluster.images_encoded(), 1.0, "the same image is encoded once");
    let g = &cluster.gateway;
    assert_eq!(g.metric("dsvl_requests_total", &[("outcome", "ok")])?, 6.0);
    assert_eq!(g.metric("dsvl_time_to_first_token_seconds_count", &[])?, 6.0);
    assert_eq!(g.metric("dsvl_e2e_latency_seconds_count", &[])?, 6.0);
    assert_eq!(
        g.metric("dsvl_gateway_requests_in_flight", &[])?,
        0.0,
        "every finished request left the in-flight gauge"
    );
    assert!(g.metric("dsvl_inter_token_latency_seconds_count", &[])? >= 6.0 * 14.0);
    assert_eq!(g.metric("dsvl_upstream_latency_seconds_count", &[("tier", "decoder")])?, 6.0);
    // The image went to the vision tier once; the two later requests found its key in Redis.
    assert_eq!(g.metric("dsvl_upstream_latency_seconds_count", &[("tier", "vision")])?, 1.0);
    Ok(())
}

/// With one vision replica SIGKILLed, image requests still succeed (retried on the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_vision_replica_killed_mid_run() -> Result<()> {
    let mut cluster = Cluster::start(Options::default()).await?;
    let images = [
        "rocket.jpg",
        "chelsea.png",
        "camera_gray.png",
        "logo_rgba.png",
        "astronaut_wide_1600x300.png",
    ];
    let ask = |img: &str| -> Result<ChatRequest> {
        Ok(greedy_request(
            vec![ChatMessage {
                role: "user".into(),
                content: vec![
                    ContentPart { part: Some(Part::Image(golden_image(img)?.into())) },
                    ContentPart { part: Some(Part::Text("What is this?".into())) },
                ],
            }],
            4,
        ))
    };
    grpc_chat(&cluster, ask(images[0])?, Duration::from_secs(120), None).await?;
    // Kill the replica that rendezvous hashing picks for the next image (the gateway's rule:
    // highest blake3(digest|addr)), so the failover path is taken for sure.
    let digest = blake3::hash(&golden_image(images[1])?).to_hex().to_string();
    let victim = (0..cluster.vision.len())
        .max_by_key(|&i| {
            *blake3::hash(format!("{digest}|{}", cluster.vision[i].addr).as_bytes()).as_bytes()
        })
        .unwrap();
    cluster.vision[victim].proc.kill();
    // Right after the kill the gateway still believes the replica is healthy: requests routed
    // there fail over to the survivor.
    for img in &images[1..] {
        let (f, _) = grpc_chat(&cluster, ask(img)?, Duration::from_secs(120), None)
            .await
            .map_err(|s| anyhow::anyhow!("{img}: {s}"))?;
        assert_eq!(f.completion_tokens, 4);
    }
    assert!(
        cluster.gateway.metric("dsvl_gateway_retries_total", &[("tier", "vision")])? >= 1.0,
        "a vision retry happened"
    );
    Ok(())
}

/// A client that goes away mid-stream frees its decoder slot; a deadline that passes comes
/// back as DEADLINE_EXCEEDED (gRPC) and 504 (HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_free_the_slot_and_deadlines_are_reported() -> Result<()> {
    let opts = Options {
        vision_replicas: 1,
        gateway_args: vec!["--max-new-tokens".into(), "16000".into()],
        ..Options::default()
    };
    let cluster = Cluster::start(opts).await?;
    // End-of-sentence banned: greedy tokens of random weights differ with the processor's GEMM
    // path, and a stream that ends early would prove nothing.
    let eos = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer.special().eos;
    let text = |max| {
        let mut request = greedy_request(
            vec![ChatMessage {
                role: "user".into(),
                content: vec![ContentPart {
                    part: Some(Part::Text("Tell me a long story.".into())),
                }],
            }],
            max,
        );
        if let Some(sampling) = request.sampling.as_mut() {
            sampling.logit_bias.insert(eos, -100.0);
        }
        request
    };
    let mut load = DecoderClient::connect(format!("http://{}", cluster.decoder.addr)).await?;

    // Disconnect: read one delta, drop the stream.
    let mut client = cluster.chat().await?;
    let mut stream = client.generate(text(15_000)).await?.into_inner();
    stream.message().await?.context("a first delta")?;
    dsvl_e2e::wait_for_running(&cluster.decoder.addr, 1).await?;
    drop(stream);
    drop(client);
    let t = Instant::now();
    loop {
        let l = load.load(LoadRequest {}).await?.into_inner();
        if l.running == 0 && l.kv_blocks_used == 0 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(5),
            "slot not freed after disconnect: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Deadline over gRPC: generation outlives 400 ms.
    let err = match grpc_chat(&cluster, text(15_000), Duration::from_millis(400), None).await {
        Ok((f, _)) => anyhow::bail!(
            "finished within the deadline: {} tokens, {}",
            f.completion_tokens,
            f.finish_reason
        ),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // Deadline over HTTP (non-streaming): 504 in OpenAI's error shape.
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0, "max_tokens": 15000});
    let r =
        http_post(&cluster.http, "/v1/chat/completions", &[("X-Request-Timeout", "0.4")], &body)?;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()?["error"]["code"], "deadline_exceeded");
    // Nothing left running after either.
    let t = Instant::now();
    while load.load(LoadRequest {}).await?.into_inner().running > 0 {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(5), "expired requests still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// API keys and per-tenant quotas: 401 for unknown keys, 429 (+ Retry-After) over quota, on
/// both protocols; bad requests are 400 with OpenAI's error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_quotas_and_validation() -> Result<()> {
    let opts = Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        gateway_args: vec![
            "--api-keys".into(),
            "sk-acme=acme,sk-globex=globex".into(),
            "--tenant-requests-per-minute".into(),
            "3".into(),
        ],
        ..Options::default()
    };
    let cluster = Cluster::start(opts).await?;
    let body =
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 2});
    for auth in [None, Some("Bearer sk-nope")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let r = http_post(&cluster.http, "/v1/chat/completions", &headers, &body)?;
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.json()?["error"]["code"], "invalid_api_key");
        // The tokenizer endpoints sit behind the key too.
        let r = http_post(&cluster.http, "/tokenize", &headers, &json!({"prompt": "Hi"}))?;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let key = [("Authorization", "Bearer sk-globex")];
    let r = http_post(&cluster.http, "/tokenize", &key, &json!({"prompt": "Hi"}))?;
    assert_eq!(r.status, 200, "{}", r.body);
    let req = || {
        greedy_request(
            vec![ChatMessage {
                role: "user".into(),
                content: vec![ContentPart { part: Some(Part::Text("Hi".into())) }],
            }],
            2,
        )
    };
    let err = grpc_chat(&cluster, req(), Duration::from_secs(60), Some("sk-nope"))
        .await
        .expect_err("unknown key");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Validation: 400s.
    let acme = [("Authorization", "Bearer sk-acme")];
    let bad = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]});
    let r = http_post(&cluster.http, "/v1/chat/completions", &acme, &bad)?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()?["error"]["message"].as_str().unwrap().contains("data: URL"));
    let r = http_post(&cluster.http, "/v1/chat/completions", &acme, &json!({"messages": "nope"}))?;
    assert_eq!(r.status, 400);
    // Quota: 3 requests per minute for acme (the two 400s above were charged nothing? they
    // failed validation before admission).
    for _ in 0..3 {
        let r = http_post(&cluster.http, "/v1/chat/completions", &acme, &body)?;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = http_post(&cluster.http, "/v1/chat/completions", &acme, &body)?;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
    let err = grpc_chat(&cluster, req(), Duration::from_secs(60), Some("sk-acme"))
        .await
        .expect_err("over quota");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.metadata().get("retry-after").is_some());
    // Another tenant is not affected.
    grpc_chat(&cluster, req(), Duration::from_secs(60), Some("sk-globex")).await?;
    Ok(())
}

/// Quotas are the tenant's across gateway replicas (buckets in the shared Redis), and output
/// tokens charged up front but not generated come back when the request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_are_shared_by_gateway_replicas_and_reconciled() -> Result<()> {
    let opts = Options {
        vision_replicas: 0,
        tp: 1,
        redis: true,
        redis_acl: true,
        gateway_replicas: 2,
        gateway_args: vec![
            "--api-keys".into(),
            "sk-acme=acme,sk-globex=globex".into(),
            "--tenant-quotas".into(),
            "acme:rpm=4,globex:tpm=2000".into(),
        ],
        ..Options::default()
    };
    let cluster = Cluster::start(opts).await?;
    let gateways = [cluster.http.clone(), cluster.more_gateways[0].1.clone()];
    let acme = [("Authorization", "Bearer sk-acme")];
    let body =
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 2});
    // Four requests spread over both replicas use acme's four per minute; a fifth is refused
    // on either (each replica alone would still have two).
    for i in 0..4 {
        let r = http_post(&gateways[i % 2], "/v1/chat/completions", &acme, &body)?;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for g in &gateways {
        let r = http_post(g, "/v1/chat/completions", &acme, &body)?;
        assert_eq!(r.status, 429, "{}", r.body);
    }

    // globex has 2000 tokens per minute; a request reserves its prompt + 1000 output tokens.
    // With the end-of-sentence token forced first, each generates at most one token, and the
    // unused reservation comes back before the reply: five such requests fit in the minute,
    // where without the credit the second would already be refused.
    let tokenizer: Value = serde_json::from_slice(&std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-dsvl/tokenizer.json"),
    )?)?;
    let eos = tokenizer["added_tokens"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["content"] == "<｜end▁of▁sentence｜>"))
        .and_then(|t| t["id"].as_u64())
        .expect("the bundled tokenizer has an end-of-sentence token");
    let globex = [("Authorization", "Bearer sk-globex")];
    let short = json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
        "max_tokens": 1000, "logit_bias": {eos.to_string(): 100}});
    for i in 0..5 {
        let r = http_post(&gateways[i % 2], "/v1/chat/completions", &globex, &short)?;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        let usage = &r.json()?["usage"];
        assert!(usage["completion_tokens"].as_u64().is_some_and(|n| n <= 1), "{}", r.body);
        let prompt = usage["prompt_tokens"].as_u64().expect("usage");
        assert!(2 * (prompt + 1000) > 2000, "without the credit the second would fit anyway");
    }
    Ok(())
}
