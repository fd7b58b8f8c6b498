//! Every hop over TLS: the vision replica and the decoder group (two ranks) serve mutual TLS,
//! the gateway calls them with its own certificate and serves TLS on its public gRPC and HTTP
//! listeners, and every tier reaches Redis over mutual TLS as its own ACL user. The internal
//! tiers accept only the gateway's name (`--tls-client-names`), not any certificate of the
//! cluster's authority. The golden greedy ids come back through both public APIs, and the internal tiers
//! refuse callers without a certificate from the cluster's authority.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsvl_e2e::{golden_case, golden_generated, grpc_messages, Cluster, Options, Svc};
use dsvl_loadgen::{
    BuiltIn, Client, ConnectOptions, Load, Mix, Mode, Report, Slo, TlsFiles, Until, Workload,
};
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::{ChatRequest, SamplingParams};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// `POST path` over HTTPS (HTTP/1.0, so the answer ends with the connection), trusting `ca`.
fn https_post(
    addr: &str,
    ca: &std::path::Path,
    path: &str,
    body: &serde_json::Value,
) -> Result<String> {
    let config = dsvl_tls::client_config(
        &dsvl_tls::ClientFiles { ca: ca.to_path_buf(), identity: None },
        &[dsvl_tls::ALPN_HTTP1],
    )?;
    let name = dsvl_tls::server_name(addr)?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = serde_json::to_vec(body)?;
    write!(
        tls,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    tls.write_all(&body)?;
    let mut answer = Vec::new();
    // A peer that closes without close_notify still delivered the whole HTTP/1.0 answer.
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

async fn health(svc: &Svc, tls: Option<dsvl_tls::ClientFiles>) -> Result<i32> {
    let mut client = HealthClient::new(dsvl_e2e::channel(&svc.addr, tls.as_ref())?);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        client.check(HealthCheckRequest { service: String::new() }),
    )
    .await
    .context("health check hung")??;
    Ok(r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hop_speaks_tls_and_the_tiers_refuse_strangers() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 2,
        redis: true,
        redis_acl: true,
        tls: true,
        ..Options::default()
    })
    .await?;
    let pki = cluster.pki.as_ref().context("pki")?;
    let redis = cluster.redis.as_ref().context("redis")?;
    assert!(redis.tls_port.is_some(), "the tiers reach Redis on its TLS port");

    // The golden conversation with an image, greedy, through gRPC over TLS.
    let golden = golden_case("one_image")?;
    let want = golden_generated("image")?;
    let request = ChatRequest {
        messages: grpc_messages(&golden["conversation"])?,
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_tokens: want.len() as u32,
        ..Default::default()
    };
    let mut stream = cluster.chat().await?.generate(request).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        if let Some(Event::Finish(f)) = m.event {
            ids = f.token_ids;
        }
    }
    assert_eq!(ids, want, "greedy ids over TLS");
    // The embedding went to Redis over TLS (as the vision tier's ACL user) and the decoder
    // read it back from there.
    assert!(redis.dbsize()? > 0, "nothing reached Redis over TLS");
    assert_eq!(cluster.vision[0].metric("dsvl_cache_errors_total", &[])?, 0.0);
    assert_eq!(cluster.decoder.metric("dsvl_cache_errors_total", &[])?, 0.0);

    // The same over HTTPS.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 3});
    let answer = tokio::task::spawn_blocking({
        let (http, ca) = (cluster.http.clone(), pki.client.ca.clone());
        move || https_post(&http, &ca, "/v1/chat/completions", &body)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("chat.completion"), "{answer}");
    // Prompt log-probabilities at TP 2: every prompt row's logits are gathered from both ranks.
    let answer = tokio::task::spawn_blocking({
        let (http, ca) = (cluster.http.clone(), pki.client.ca.clone());
        let body = dsvl_e2e::golden_scoring_body()?;
        move || https_post(&http, &ca, "/v1/completions", &body)
    })
    .await??;
    let json = answer.split_once("\r\n\r\n").map(|(_, b)| b).context("a body")?;
    dsvl_e2e::check_golden_scoring(&serde_json::from_str(json)?)?;
    // The load generator over both TLS listeners (`dsvl-bench serve --url https://… --ca-file`):
    // text and image requests, streamed, every one complete and counted.
    for url in [format!("https://{}", cluster.http), format!("grpcs://{}", cluster.gateway.addr)] {
        let tls = TlsFiles { ca: Some(pki.client.ca.clone()), identity: None };
        let client = Client::connect(&url, ConnectOptions { tls, ..ConnectOptions::default() })
            .await
            .with_context(|| format!("load generator to {url}"))?;
        let workload = Arc::new(Workload::built_in(BuiltIn {
            mix: Mix { text: 1, image: 1, multiturn: 0, long: 0 },
            max_tokens: 4,
            long_words: 0,
            distinct_images: 2,
            images: None,
            seed: 3,
            cycle: None,
            extra: serde_json::Map::new(),
            urgent: None,
        })?);
        let load = Load {
            mode: Mode::Closed { concurrency: 2 },
            until: Until::Requests(6),
            deadline: Duration::from_secs(60),
            hang_after: Duration::from_secs(10),
            warmup: 0,
            seed: 3,
            first_index: 0,
            progress: false,
        };
        let r = dsvl_loadgen::run(&client, workload, &load).await?;
        let report = Report::new(&r.outcomes, r.duration, Slo::default());
        assert_eq!((report.completed, report.failed), (6, 0), "{url}: {report:?}");
        assert!(report.output_tokens_per_s > 0.0, "{url}: no tokens counted: {report:?}");
    }
    // Without the cluster's authority the gateway's certificate is not trusted.
    let stranger_ca = tempfile::NamedTempFile::new()?;
    std::fs::write(stranger_ca.path(), dsvl_tls::DevCa::new("another CA")?.ca_pem())?;
    let tls = TlsFiles { ca: Some(stranger_ca.path().to_path_buf()), identity: None };
    let e = Client::connect(
        &format!("https://{}", cluster.http),
        ConnectOptions { tls, ..ConnectOptions::default() },
    )
    .await
    .err()
    .context("a gateway certificate from another authority was trusted")?;
    assert!(e.to_string().contains("certificate"), "{e}");

    // Plain HTTP to the TLS listener gets no HTTP answer.
    let plain = dsvl_e2e::http_post(&cluster.http, "/v1/models", &[], &serde_json::json!({}));
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status == 0), "plain text was served");

    // The internal tiers: a certificate from the authority gets in; no certificate, another
    // authority's certificate or plain text do not.
    let stranger = {
        let dir = tempfile::tempdir()?;
        let other = dsvl_tls::DevCa::new("another CA")?;
        let leaf = other.write_leaf(dir.path(), "client", &["127.0.0.1"])?;
        (dir, leaf)
    };
    for svc in [&cluster.vision[0], &cluster.decoder] {
        assert_eq!(health(svc, Some(pki.client.client())).await?, 1, "{}: member", svc.addr);
        let no_cert = dsvl_tls::ClientFiles { ca: pki.client.ca.clone(), identity: None };
        assert!(health(svc, Some(no_cert)).await.is_err(), "{}: no certificate", svc.addr);
        let other = dsvl_tls::ClientFiles {
            ca: pki.client.ca.clone(),
            identity: Some((stranger.1.cert.clone(), stranger.1.key.clone())),
        };
        assert!(health(svc, Some(other)).await.is_err(), "{}: another authority", svc.addr);
        // Redis's certificate is from the cluster's authority but is not the gateway's name.
        let sibling = dsvl_tls::ClientFiles {
            ca: pki.client.ca.clone(),
            identity: Some((pki.redis.cert.clone(), pki.redis.key.clone())),
        };
        assert!(health(svc, Some(sibling)).await.is_err(), "{}: not the gateway", svc.addr);
        assert!(health(svc, None).await.is_err(), "{}: plain text", svc.addr);
    }
    Ok(())
}

/// As in Kubernetes: every service has an internal health port in plain text (kubelet's gRPC
/// probes present no certificate) while its main port is mutual TLS; the gateway's public gRPC
/// port then serves only the Chat API (no health watches, no reflection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_live_on_the_internal_port() -> Result<()> {
    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        redis: false,
        tls: true,
        health_ports: true,
        ..Options::default()
    })
    .await?;
    // The cluster started, so every health port answered SERVING in plain text.
    for svc in [&cluster.gateway, &cluster.vision[0], &cluster.decoder] {
        let health = svc.health.as_deref().context("a health port")?;
        assert!(!dsvl_e2e::reflection_services(health).await?.is_empty(), "{health}");
    }
    let gateway_health = cluster.gateway.health.as_deref().context("gateway health port")?;
    // The health port lists what it serves: health and reflection, not Chat.
    let mut listed = dsvl_e2e::reflection_services(gateway_health).await?;
    listed.sort();
    assert_eq!(
        listed,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"
        ],
        "{listed:?}"
    );

    // The public port: Chat answers, health and reflection do not exist there.
    let public = cluster.gateway.channel()?;
    let e = HealthClient::new(public.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect_err("health on the public port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(
        dsvl_e2e::reflection_services_on(public, "public").await.is_err(),
        "reflection on the public port"
    );
    let request = ChatRequest {
        messages: vec![dsvl_proto::v1::ChatMessage {
            role: "user".into(),
            content: vec![dsvl_proto::v1::ContentPart {
                part: Some(dsvl_proto::v1::content_part::Part::Text("Hi".into())),
            }],
        }],
        max_tokens: 2,
        ..Default::default()
    };
    let mut stream = cluster.chat().await?.generate(request).await?.into_inner();
    while stream.message().await?.is_some() {}

    // The vision tier's main port still refuses plain text.
    assert!(health(&cluster.vision[0], None).await.is_err(), "plain text on the main port");
    Ok(())
}
