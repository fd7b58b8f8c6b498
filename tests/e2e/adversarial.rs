//! Attacks on the public edge. Pre-authentication ones, all at once, against a gateway under
//! `prlimit --data=1GiB` (a regression kills the gateway, not the machine): 25 uploads
//! announcing 90 MB and trickling their bodies, 500 gRPC streams declaring 60 MiB messages,
//! 20,000 health watches, 200 connections with trickled headers and 200 silent ones. Nobody
//! holds a key. Throughout, an authenticated request is answered in under a second; afterwards
//! the gateway is alive and its peak memory grew by less than 256 MiB. With a key: request
//! shapes over a limit refused within half a second; an idle connection recycled at its age.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsvl_e2e::{Cluster, Options};
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart};
use futures::StreamExt;

const KEY: &str = "sk-good";

fn hello() -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Text("Hi".into())) }],
        }],
        max_tokens: 1,
        ..Default::default()
    }
}

/// Authenticated requests one after another until `stop`; the slowest answer.
async fn honest_requests(cluster: &Cluster, stop: Arc<tokio::sync::Notify>) -> Result<Duration> {
    let mut worst = Duration::ZERO;
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let mut client = cluster.chat().await?;
        let mut req = tonic::Request::new(hello());
        req.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse()?);
        let t = Instant::now();
        let mut stream = client.generate(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        worst = worst.max(t.elapsed());
        tokio::select! {
            _ = &mut stopped => return Ok(worst),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// `n` uploads announcing 90 MB without a key, each trickling 1 KiB every 100 ms for `for_`.
fn trickled_uploads(
    http: &str,
    n: usize,
    for_: Duration,
) -> Result<Vec<std::thread::JoinHandle<Result<String>>>> {
    let mut threads = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(http)?;
        threads.push(std::thread::spawn(move || -> Result<String> {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            write!(
                s,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 90000000\r\n\r\n"
            )?;
            let t = Instant::now();
            let mut answer = Vec::new();
            while t.elapsed() < for_ {
                if s.write_all(&[b' '; 1024]).is_err() {
                    // The gateway answered and closed: whatever answer it sent is still
                    // readable (or the reset lost it, which the caller reports).
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    let mut buf = [0u8; 256];
                    if let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                        answer.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
                let mut buf = [0u8; 256];
                if let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&buf[..n]);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    Ok(threads)
}

/// `n` gRPC streams without a key, each sending the 5-byte prefix of a 60 MiB message and
/// 16 KiB of it, over 4 raw HTTP/2 connections; the `grpc-status` each got.
async fn declared_giant_messages(addr: &str, n: usize) -> Result<Vec<String>> {
    let mut tasks = Vec::new();
    for c in 0..4 {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (client, conn) = h2::client::handshake(tcp).await?;
        tokio::spawn(conn);
        let addr = addr.to_string();
        for _ in (c..n).step_by(4) {
            let client = client.clone();
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let req = http::Request::post(format!("http://{addr}/dsvl.v1.Chat/Generate"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())?;
                let mut ready = client.ready().await?;
                let (response, mut send) = ready.send_request(req, false)?;
                let mut frame = vec![0u8];
                frame.extend_from_slice(&(60u32 << 20).to_be_bytes());
                frame.extend_from_slice(&[0u8; 16 << 10]);
                // The server may answer (and reset the stream) before taking the data.
                let _ = send.send_data(bytes::Bytes::from(frame), false);
                let response = tokio::time::timeout(Duration::from_secs(10), response)
                    .await
                    .context("no answer to a stream without a key")??;
                let status = response
                    .headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .unwrap_or_else(|| format!("http {}", response.status()));
                anyhow::Ok(status)
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_authentication_floods_leave_the_gateway_bounded_and_responsive() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 0,
        tp: 1,
        redis: false,
        health_ports: true,
        gateway_data_limit: Some(1 << 30),
        gateway_args: ["--api-keys", &format!("{KEY}=acme"), "--http-header-timeout-secs", "2"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await?;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", cluster.gateway.proc.pid()))?;
    let data = limits.lines().find(|l| l.starts_with("Max data size")).context("limits")?;
    assert!(data.contains(&(1u64 << 30).to_string()), "not under prlimit: {data}");
    // Warm up (first request pays lazy initialisation), then take the baseline.
    let stop = Arc::new(tokio::sync::Notify::new());
    stop.notify_one();
    honest_requests(&cluster, stop).await?;
    let before = cluster.gateway.peak_rss()?;

    let stop = Arc::new(tokio::sync::Notify::new());
    let honest = {
        let (cluster, stop) = (&cluster, stop.clone());
        async move { honest_requests(cluster, stop).await }
    };
    let attacks = async {
        let t = Instant::now();
        // Slow and silent connections, held open for the whole attack.
        let mut held = Vec::new();
        for _ in 0..200 {
            let mut s = TcpStream::connect(&cluster.http)?;
            write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")?;
            held.push(s);
            held.push(TcpStream::connect(&cluster.gateway.addr)?);
        }
        let uploads = trickled_uploads(&cluster.http, 25, Duration::from_secs(4))?;
        let statuses = declared_giant_messages(&cluster.gateway.addr, 500).await?;
        let unauthenticated = "16"; // grpc-status UNAUTHENTICATED
        anyhow::ensure!(
            statuses.iter().all(|s| s == unauthenticated),
            "streams without a key: {:?}",
            statuses.iter().filter(|s| *s != unauthenticated).take(5).collect::<Vec<_>>()
        );
        // 20,000 health watches on the public port: it serves only the Chat API.
        let channel = cluster.gateway.channel()?;
        let codes: Vec<tonic::Code> = futures::stream::iter(0..20_000)
            .map(|_| {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                async move {
                    let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
                    match health.watch(req).await {
                        Ok(_) => tonic::Code::Ok,
                        Err(e) => e.code(),
                    }
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        // None is served. Most are UNIMPLEMENTED; a connection that keeps making the server
        // end streams early trips h2's reset-flood guard (GOAWAY ENHANCE_YOUR_CALM, seen as
        // RESOURCE_EXHAUSTED, and UNKNOWN for the streams it cut): the edge protecting itself.
        anyhow::ensure!(!codes.contains(&tonic::Code::Ok), "a health watch was served publicly");
        let unimplemented = codes.iter().filter(|c| **c == tonic::Code::Unimplemented).count();
        anyhow::ensure!(unimplemented >= 1_000, "only {unimplemented} watches were answered");
        for u in uploads {
            let answer = u.join().map_err(|_| anyhow::anyhow!("upload thread panicked"))??;
            anyhow::ensure!(answer.starts_with("HTTP/1.1 401"), "upload without a key: {answer:?}");
        }
        drop(held);
        anyhow::Ok(t.elapsed())
    };
    let (worst, took) = tokio::join!(honest, async {
        let r = attacks.await;
        stop.notify_one();
        r
    });
    let (worst, took) = (worst?, took?);
    eprintln!("attacks took {took:?}; slowest authenticated answer {worst:?}");
    assert!(worst < Duration::from_secs(1), "an authenticated request took {worst:?}");
    let mut gateway = cluster.gateway;
    assert!(gateway.proc.try_wait()?.is_none(), "the gateway died (over its memory limit?)");
    let grew = gateway.peak_rss()?.saturating_sub(before);
    assert!(grew < 256 << 20, "the gateway's peak memory grew by {} MiB", grew >> 20);
    Ok(())
}

/// A client that opens a connection and only answers keep-alive pings cannot hold its slot:
/// at `--grpc-max-connection-age-secs` the gateway sends GOAWAY and closes it; a stream open
/// at that moment still finishes (the grace is the request timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_recycled_at_their_age_and_open_streams_finish() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 0,
        tp: 1,
        redis: false,
        gateway_args: ["--grpc-max-connection-age-secs", "1", "--max-new-tokens", "4000"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await?;
    let t = Instant::now();
    let tcp = tokio::net::TcpStream::connect(&cluster.gateway.addr).await?;
    let (_idle_client, idle) = h2::client::handshake(tcp).await?;
    // When the server closed the idle connection, after its opening.
    let idle = tokio::spawn(async move {
        let _ = idle.await;
        t.elapsed()
    });

    // A long stream, started on its own connection just before that one's age is up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let eos = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer.special().eos;
    let mut long = hello();
    long.max_tokens = 4000;
    long.sampling = Some(dsvl_proto::v1::SamplingParams {
        temperature: Some(0.0),
        logit_bias: [(eos, -100.0)].into(),
        ..Default::default()
    });
    let started = Instant::now();
    let mut stream = cluster.chat().await?.generate(long).await?.into_inner();
    let mut tokens = 0;
    let mut finished = false;
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(dsvl_proto::v1::chat_response::Event::Delta(d)) => tokens += d.token_ids.len(),
            Some(dsvl_proto::v1::chat_response::Event::Finish(_)) => finished = true,
            _ => {}
        }
    }
    let lasted = started.elapsed();
    eprintln!("the stream lasted {lasted:?} ({tokens} tokens)");
    assert!(finished && tokens == 4000, "the stream was cut: {tokens} tokens, finished {finished}");
    // Its connection (opened with it) reached its age while it ran: GOAWAY let it finish.
    assert!(lasted > Duration::from_secs(1), "the stream ({lasted:?}) did not outlive the age");

    // The idle connection was closed by the server, after its age and well before forever.
    let closed_after = tokio::time::timeout(Duration::from_secs(10), idle)
        .await
        .map_err(|_| anyhow::anyhow!("an idle connection outlived its age by 10 s"))??;
    assert!(closed_after >= Duration::from_secs(1), "closed before its age: {closed_after:?}");
    Ok(())
}

/// Requests whose shape is over a limit are refused within half a second, before any
/// tokenizing: 100,000 messages, a 3 MB text for a model of a few thousand positions, 1,000
/// stop strings (and 17, one over the limit); over HTTP and gRPC, with a valid key, while the
/// gateway is under its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_shapes_are_refused_within_half_a_second() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 0,
        tp: 1,
        redis: false,
        gateway_data_limit: Some(1 << 30),
        gateway_args: ["--api-keys", &format!("{KEY}=acme")].map(String::from).to_vec(),
        ..Options::default()
    })
    .await?;
    let message = |text: &str| serde_json::json!({"role": "user", "content": text});
    let bodies = [
        (
            "17 stop strings",
            serde_json::json!({"messages": [message("Hi")], "stop": vec!["s"; 17]}),
        ),
        ("100,000 messages", serde_json::json!({"messages": vec![message("x"); 100_000]})),
        ("a 3 MB text", serde_json::json!({"messages": [message(&"word ".repeat(600_000))]})),
        (
            "1,000 stop strings",
            serde_json::json!({"messages": [message("Hi")], "stop": vec!["s"; 1_000]}),
        ),
    ];
    for (what, body) in &bodies {
        // Serialized before the clock starts: only the gateway's answer is timed.
        let bytes = serde_json::to_vec(body)?;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\nAuthorization: Bearer {KEY}",
            bytes.len()
        );
        let t = Instant::now();
        let r = dsvl_e2e::http_exchange(&cluster.http, &head, &bytes)?;
        let took = t.elapsed();
        assert_eq!(r.status, 400, "{what}: {}", &r.body[..r.body.len().min(300)]);
        eprintln!("{what}: refused after {took:?}");
        assert!(took < Duration::from_millis(500), "{what}: refused after {took:?}");
    }
    // gRPC: the same 100,000 messages.
    let mut client = cluster.chat().await?.max_encoding_message_size(64 << 20);
    let mut req = tonic::Request::new(ChatRequest {
        messages: vec![hello().messages[0].clone(); 100_000],
        max_tokens: 1,
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse()?);
    let t = Instant::now();
    let e = client.generate(req).await.err().context("100,000 messages were accepted")?;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    eprintln!("gRPC, 100,000 messages: refused after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_millis(500), "gRPC refused after {:?}", t.elapsed());
    Ok(())
}
