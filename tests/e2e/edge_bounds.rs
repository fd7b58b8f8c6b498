//! The public edge refuses a caller without a valid key before it reads what the caller sends:
//! over HTTP the key is checked from the headers while an 80 MB body is still only announced,
//! over gRPC before tonic decodes a message larger than the server accepts. A valid key then
//! meets the size limit, which shows the order.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsvl_e2e::{Cluster, Options};
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_before_bodies_and_messages_are_read() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        gateway_args: ["--api-keys", "sk-good=acme", "--max-images", "1", "--max-image-mib", "1"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await?;

    // HTTP: headers announcing 80 MB, no body: 401 at once (the body is never waited for).
    let mut s = TcpStream::connect(&cluster.http)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let t = Instant::now();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-bad\r\nContent-Type: application/json\r\nContent-Length: 80000000\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).context("no answer before the body")?;
    let status = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // gRPC: a 6 MiB message (over the 5 MiB this gateway decodes) with a bad key is
    // UNAUTHENTICATED; with the good key the size limit answers instead, with
    // RESOURCE_EXHAUSTED as the gRPC status guide says (tonic's own code is OUT_OF_RANGE).
    let big = || ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Image(vec![7u8; 6 << 20].into())) }],
        }],
        max_tokens: 1,
        ..Default::default()
    };
    for (key, want) in [("sk-bad", Code::Unauthenticated), ("sk-good", Code::ResourceExhausted)] {
        let mut client = cluster.chat().await?.max_encoding_message_size(64 << 20);
        let mut req = tonic::Request::new(big());
        req.metadata_mut().insert("authorization", format!("Bearer {key}").parse()?);
        let e = client.generate(req).await.err().context("refused")?;
        assert_eq!(e.code(), want, "{key}: {e:?}");
    }
    Ok(())
}

/// Slow clients: headers trickled past the header timeout get the connection closed, a body
/// that stops mid-way fails after the idle timeout, and an honest request is answered quickly
/// all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_stalled_bodies_are_cut_off() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 0,
        tp: 1,
        redis: false,
        gateway_args: [
            "--api-keys",
            "sk-good=acme",
            "--http-header-timeout-secs",
            "1",
            "--http-body-idle-secs",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await?;
    let read_all = |mut s: TcpStream| -> Result<(String, Duration)> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let t = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Ok((String::from_utf8_lossy(&got).into_owned(), t.elapsed()))
    };

    // 50 connections that never finish their headers, and one that never says anything.
    let mut slow = vec![TcpStream::connect(&cluster.http)?];
    for _ in 0..50 {
        let mut s = TcpStream::connect(&cluster.http)?;
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")?;
        slow.push(s);
    }
    // A body that stops after 10 of its announced 1000 bytes (authenticated, so it is read).
    let mut stalled = TcpStream::connect(&cluster.http)?;
    write!(
        stalled,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-good\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"messages"
    )?;
    // Meanwhile an honest request is answered at once.
    let t = Instant::now();
    let body =
        serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let r = dsvl_e2e::http_post(
        &cluster.http,
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-good")],
        &body,
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let (answer, took) = read_all(stalled)?;
    assert!(took < Duration::from_secs(4), "the stalled body held on for {took:?}");
    // 408 in OpenAI's error shape, naming what happened.
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| answer.clone())?;
    assert_eq!(v["error"]["code"], "request_timeout", "{answer}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("stopped arriving")));
    for (i, s) in slow.into_iter().enumerate() {
        let (answer, took) = read_all(s)?;
        assert!(took < Duration::from_secs(4), "connection {i} held on for {took:?}");
        assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    }
    Ok(())
}

/// A local image server counting the requests it answers: a 32x32 PNG at any path.
fn counting_image_server() -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let png = dsvl_testkit::png_rgb8(32, 32, &[90u8; 32 * 32 * 3]);
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                png.len()
            );
            let _ = s.write_all(&png);
        }
    });
    Ok((port, hits))
}

/// Image URLs are fetched only once the request has passed the count limit and the tenant's
/// image quota: refused requests never reach the image server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_are_fetched_only_after_counts_and_quotas() -> Result<()> {
    use std::sync::atomic::Ordering;
    let (port, hits) = counting_image_server()?;
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        gateway_args: [
            "--api-keys",
            "sk-good=acme",
            "--max-images",
            "1",
            "--tenant-images-per-minute",
            "1",
            "--image-url-allow",
            "localhost",
            "--image-url-allow-internal",
            "--image-url-ports",
            &port.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await?;
    let url = format!("http://localhost:{port}/cat.png");
    let ask = |images: usize| {
        let mut content = vec![serde_json::json!({"type": "text", "text": "What is this?"})];
        content.extend(
            (0..images)
                .map(|_| serde_json::json!({"type": "image_url", "image_url": {"url": url}})),
        );
        let body = serde_json::json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2});
        dsvl_e2e::http_post(
            &cluster.http,
            "/v1/chat/completions",
            &[("Authorization", "Bearer sk-good")],
            &body,
        )
    };
    let r = ask(2)?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "fetched before the count check");
    let r = ask(1)?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let r = ask(1)?;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "fetched before the quota check");
    Ok(())
}
