//! The gateway's contracts at its edge: the public gRPC package alone on reflection, one
//! sampling validator for both protocols (out-of-range values refused by name, never
//! replaced), and hostile metadata that never panics a handler.

use anyhow::Result;
use dsvl_e2e::{
    http_post, reflection_services, reflection_services_v1alpha, Cluster, HttpConn, Options,
};
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart, SamplingParams};
use serde_json::json;
use tonic::Code;

async fn small_cluster() -> Result<Cluster> {
    Cluster::start(Options { vision_replicas: 1, tp: 1, redis: false, ..Options::default() }).await
}

fn hi(sampling: Option<SamplingParams>) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Text("Hi".into())) }],
        }],
        sampling,
        max_tokens: 2,
        ..Default::default()
    }
}

/// Reflection on the gateway lists the public package, health and itself, nothing internal; the
/// vision and decoder tiers list their internal service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_the_served_packages() -> Result<()> {
    let cluster = small_cluster().await?;
    let served = |api: &str| {
        let mut v = vec![
            api.to_string(),
            "grpc.health.v1.Health".into(),
            "grpc.reflection.v1.ServerReflection".into(),
            "grpc.reflection.v1alpha.ServerReflection".into(),
        ];
        v.sort();
        v
    };
    for (addr, api) in [
        (&cluster.gateway.addr, "dsvl.v1.Chat"),
        (&cluster.decoder.addr, "dsvl.internal.v1.Decoder"),
        (&cluster.vision[0].addr, "dsvl.internal.v1.VisionEncoder"),
    ] {
        // Both reflection versions answer, with the same list: what this port serves.
        for mut listed in
            [reflection_services(addr).await?, reflection_services_v1alpha(addr).await?]
        {
            listed.sort();
            assert_eq!(listed, served(api), "reflection on {addr}");
        }
    }
    Ok(())
}

/// Sampling values are resolved and validated once, with the same rules for HTTP and gRPC:
/// 0 is a value (refused where out of range), and the error names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_sampling_is_refused_by_name() -> Result<()> {
    let cluster = small_cluster().await?;
    let cases: &[(&str, serde_json::Value, SamplingParams)] = &[
        (
            "repetition_penalty",
            json!(0),
            SamplingParams { repetition_penalty: Some(0.0), ..Default::default() },
        ),
        ("top_p", json!(0), SamplingParams { top_p: Some(0.0), ..Default::default() }),
        ("top_p", json!(1.5), SamplingParams { top_p: Some(1.5), ..Default::default() }),
        (
            "temperature",
            json!(-1),
            SamplingParams { temperature: Some(-1.0), ..Default::default() },
        ),
        (
            "temperature",
            json!(1000),
            SamplingParams { temperature: Some(1000.0), ..Default::default() },
        ),
    ];
    let mut client = cluster.chat().await?;
    for (field, value, grpc) in cases {
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, *field: value});
        let r = http_post(&cluster.http, "/v1/chat/completions", &[], &body)?;
        assert_eq!(r.status, 400, "{field}={value}: {}", r.body);
        let msg = r.json()?["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(field), "{field}={value}: {msg}");
        let err = client.generate(hi(Some(grpc.clone()))).await.err();
        let err = err.ok_or_else(|| anyhow::anyhow!("gRPC accepted {field}={value}"))?;
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    // A seed that is not an unsigned 64-bit integer is a 400 naming the field (`param` too).
    for seed in [json!(-1), json!(1.5), json!("7"), json!(18_446_744_073_709_551_616.0)] {
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "seed": seed});
        let r = http_post(&cluster.http, "/v1/chat/completions", &[], &body)?;
        assert_eq!(r.status, 400, "seed={seed}: {}", r.body);
        let error = &r.json()?["error"];
        assert_eq!(error["param"], "seed", "seed={seed}: {error}");
        assert!(error["message"].as_str().unwrap_or_default().contains("`seed`"), "{error}");
    }
    // Unset fields take the defaults on both protocols (temperature 1: a sampled reply).
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": 3});
    let r = http_post(&cluster.http, "/v1/chat/completions", &[], &body)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut stream = client.generate(hi(None)).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

/// Deadline headers of absurd size are capped, garbage is a 400 / INVALID_ARGUMENT naming the
/// header; nothing panics, and the same connection (HTTP keep-alive, one gRPC channel) serves
/// the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_deadline_headers_never_panic() -> Result<()> {
    let cluster = small_cluster().await?;
    let body =
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 2});
    let mut conn = HttpConn::connect(&cluster.http)?;
    for &(name, value, accepted) in dsvl_testkit::HOSTILE_HTTP_TIMEOUTS {
        let r = conn.post("/v1/chat/completions", &[(name, value)], &body)?;
        if accepted {
            assert_eq!(r.status, 200, "{name}: {value}: {}", r.body);
        } else {
            assert_eq!(r.status, 400, "{name}: {value}: {}", r.body);
            let msg = r.json()?["error"]["message"].as_str().unwrap_or_default().to_lowercase();
            assert!(msg.contains(&name.to_lowercase()), "{msg}");
        }
        let r = conn.post("/v1/chat/completions", &[], &body)?;
        assert_eq!(r.status, 200, "after {name}: {value}: {}", r.body);
    }
    let mut client = cluster.chat().await?;
    let req = || hi(Some(SamplingParams { temperature: Some(0.0), ..Default::default() }));
    for &(value, accepted) in dsvl_testkit::HOSTILE_GRPC_TIMEOUTS {
        let mut r = tonic::Request::new(req());
        r.metadata_mut().insert("grpc-timeout", value.parse()?);
        match client.generate(r).await {
            Ok(stream) if accepted => {
                let mut stream = stream.into_inner();
                while stream.message().await?.is_some() {}
            }
            Err(s) if !accepted && s.code() == Code::InvalidArgument => {
                assert!(s.message().contains("grpc-timeout"), "{s:?}")
            }
            other => anyhow::bail!("grpc-timeout {value:?}: {:?}", other.map(|_| "a stream")),
        }
        let mut stream = client.generate(req()).await?.into_inner();
        while stream.message().await?.is_some() {}
    }
    Ok(())
}

/// SIGTERM to the gateway: new requests are refused (UNAVAILABLE) while the open stream runs to
/// its end, then the process exits 0: the drain every service shares (`dsvl_telemetry::server`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_drains_open_streams_on_sigterm() -> Result<()> {
    use dsvl_proto::v1::chat_response::Event;
    let opts = Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        gateway_args: vec![
            "--max-new-tokens".into(),
            "4000".into(),
            "--drain-secs".into(),
            "60".into(),
        ],
        ..Options::default()
    };
    let mut cluster = Cluster::start(opts).await?;
    let mut client = cluster.chat().await?;
    let greedy = Some(SamplingParams { temperature: Some(0.0), ..Default::default() });
    // The end-of-sentence token is banned so the stream is long on every processor: greedy
    // tokens of a random-weight model differ with the GEMM path (AVX2 or AVX-512), and one of
    // them may end early.
    let eos = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer.special().eos;
    let mut long = hi(Some(SamplingParams {
        logit_bias: [(eos, -100.0)].into(),
        ..greedy.clone().unwrap_or_default()
    }));
    long.max_tokens = 4000;
    long.messages[0].content[0].part = Some(Part::Text("Tell me a long story.".into()));
    let mut stream = client.generate(long).await?.into_inner();
    stream.message().await?.ok_or_else(|| anyhow::anyhow!("no first delta"))?;
    dsvl_e2e::wait_for_running(&cluster.decoder.addr, 1).await?;
    let pid = cluster.gateway.proc.pid().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status()?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let refused = client.generate(hi(greedy)).await.err();
    let refused =
        refused.ok_or_else(|| anyhow::anyhow!("a new request was accepted while draining"))?;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut finished = false;
    while let Some(m) = stream.message().await? {
        finished |= matches!(m.event, Some(Event::Finish(_)));
    }
    assert!(finished, "the open stream ended without its final message");
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = cluster.gateway.proc.try_wait()? {
            assert!(status.success(), "{status:?}");
            break;
        }
        anyhow::ensure!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the gateway did not exit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One row of the error table.
type Case<'a> = (&'a str, String, Vec<u8>, u16, &'a [&'a str]);

/// Every HTTP error, the framework's included, is OpenAI's JSON error with the right status and
/// a message about the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_error_has_the_openai_shape() -> Result<()> {
    let cluster = small_cluster().await?;
    let json_post = |len: usize| {
        format!("POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len}")
    };
    let part = r#"{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}"#;
    // (what, request head, body, status, words the message must contain)
    let cases: Vec<Case> = vec![
        ("unknown route", "GET /v1/nothing HTTP/1.0".into(), vec![], 404, &["unknown route"]),
        (
            "wrong method",
            "GET /v1/chat/completions HTTP/1.0".into(),
            vec![],
            405,
            &["GET is not allowed on /v1/chat/completions", "POST"],
        ),
        (
            "wrong content type",
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: 2"
                .into(),
            b"{}".to_vec(),
            415,
            &["application/json", "text/plain"],
        ),
        (
            "no content type",
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2".into(),
            b"{}".to_vec(),
            415,
            &["no Content-Type"],
        ),
        ("truncated JSON", json_post(1), b"{".to_vec(), 400, &["ends before its JSON", "line 1"]),
        ("not JSON", json_post(5), b"hello".to_vec(), 400, &["not valid JSON", "column"]),
        ("wrong shape", json_post(16), br#"{"messages": 42}"#.to_vec(), 400, &["`messages`"]),
        (
            "unknown part type",
            json_post(part.len()),
            part.as_bytes().to_vec(),
            400,
            &["audio", "image_url"],
        ),
        ("body too large", json_post(1 << 30), b"{}".to_vec(), 413, &["larger than this gateway"]),
    ];
    for (what, head, body, status, words) in cases {
        let r = dsvl_e2e::http_exchange(&cluster.http, &head, &body)?;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let ct = r.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/json"), "{what}: content-type {ct}");
        let error = &r.json()?["error"];
        for key in ["message", "type", "param", "code"] {
            assert!(error.get(key).is_some(), "{what}: no `{key}` in {error}");
        }
        let message = error["message"].as_str().unwrap_or_default();
        for w in words {
            assert!(message.contains(w), "{what}: `{w}` not in {message:?}");
        }
    }
    Ok(())
}

/// An image by URL on gRPC (`ContentPart.image_url`, what `dsvl chat` sends for a URL) is the
/// same image as its bytes: a `data:` URL gives the same greedy tokens; a remote host outside
/// the fetch policy is refused by name before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_image_urls_follow_the_http_rules() -> Result<()> {
    use base64::Engine;
    let cluster = small_cluster().await?;
    let png = dsvl_e2e::golden_image("chelsea.png")?;
    let ask = |image: Part| ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![
                ContentPart { part: Some(image) },
                ContentPart { part: Some(Part::Text("What is this?".into())) },
            ],
        }],
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_tokens: 4,
        ..Default::default()
    };
    let tokens = |request: ChatRequest| {
        let cluster = &cluster;
        async move {
            let mut stream = cluster.chat().await?.generate(request).await?.into_inner();
            let mut ids = Vec::new();
            while let Some(m) = stream.message().await? {
                if let Some(dsvl_proto::v1::chat_response::Event::Finish(f)) = m.event {
                    ids = f.token_ids;
                }
            }
            anyhow::Ok(ids)
        }
    };
    let by_bytes = tokens(ask(Part::Image(png.clone().into()))).await?;
    let data_url =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let by_url = tokens(ask(Part::ImageUrl(data_url))).await?;
    assert_eq!(by_bytes.len(), 4);
    assert_eq!(by_url, by_bytes, "a data: URL is the same image");

    let refused = tokens(ask(Part::ImageUrl("http://example.com/cat.png".into())))
        .await
        .expect_err("a host outside the fetch policy");
    let status = refused.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("example.com"), "names the host: {}", status.message());
    Ok(())
}
