//! The three services in one test process: each library's `run(config, listeners, shutdown)`
//! on `127.0.0.1:0`, no binaries, no Redis. The fast path for testing a service's behaviour;
//! the process-level tests (`cluster.rs`, each service's `tests/`) keep testing the real
//! binaries. One golden request through the gateway, then every service shuts down cleanly.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use dsvl_e2e::{golden_case, golden_generated, grpc_messages};
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::{ChatRequest, SamplingParams};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A service running on this test's runtime; `stop` resolves its shutdown future.
struct InProcess<E> {
    addr: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E: Send + 'static> InProcess<E> {
    async fn spawn<F, Fut>(run: F) -> Result<Self>
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stop, rx) = oneshot::channel();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        let task = tokio::spawn(run(listener, shutdown));
        Ok(Self { addr, stop, task })
    }

    async fn wait_serving(&self, service: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let endpoint = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))?;
            if let Ok(ch) = endpoint.connect().await {
                let r = HealthClient::new(ch)
                    .check(HealthCheckRequest { service: service.into() })
                    .await;
                if r.is_ok_and(|r| r.into_inner().status == 1) {
                    return Ok(());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "{service} never became SERVING");
            anyhow::ensure!(!self.task.is_finished(), "{service} stopped during start-up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Shuts down and returns `run`'s result.
    async fn stop(self) -> Result<Result<(), E>> {
        let _ = self.stop.send(());
        Ok(tokio::time::timeout(Duration::from_secs(30), self.task).await??)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_in_one_process() -> Result<()> {
    let vision = InProcess::spawn(|listener, shutdown| {
        let cfg = dsvl_vision::VisionConfig::try_from(&dsvl_vision::Args::parse_from([
            "dsvl-vision",
            "--insecure",
        ]))
        .expect("vision config");
        dsvl_vision::run(cfg, listener, shutdown)
    })
    .await?;
    let decoder = InProcess::spawn(|listener, shutdown| {
        let args = dsvl_decoder::Args::parse_from([
            "dsvl-decoder",
            "--rendezvous-port",
            "0",
            "--insecure",
        ]);
        let cfg = dsvl_decoder::DecoderConfig::try_from(&args).expect("decoder config");
        dsvl_decoder::run(args, cfg, listener, shutdown)
    })
    .await?;
    vision.wait_serving("dsvl.internal.v1.VisionEncoder").await?;
    decoder.wait_serving("dsvl.internal.v1.Decoder").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let (vision_addr, decoder_addr) = (vision.addr.clone(), decoder.addr.clone());
    let gateway = InProcess::spawn(move |grpc, shutdown| {
        let args = dsvl_gateway::Args::parse_from([
            "dsvl-gateway",
            "--vision",
            &vision_addr,
            "--decoder",
            &decoder_addr,
            "--refresh-secs",
            "1",
            "--allow-unauthenticated",
            "--insecure",
        ]);
        let cfg = dsvl_gateway::GatewayConfig::try_from(&args).expect("gateway config");
        dsvl_gateway::run(cfg, grpc, http, shutdown)
    })
    .await?;
    gateway.wait_serving("dsvl.v1.Chat").await?;

    // The golden image conversation, greedy: the reference's ids.
    let case = golden_case("one_image")?;
    let want = golden_generated("image")?;
    let request = ChatRequest {
        messages: grpc_messages(&case["conversation"])?,
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_tokens: want.len() as u32,
        ..Default::default()
    };
    let mut client = ChatClient::connect(format!("http://{}", gateway.addr))
        .await?
        .max_encoding_message_size(64 << 20);
    let mut stream = client.generate(request).await?.into_inner();
    let mut ids = None;
    while let Some(m) = stream.message().await? {
        if let Some(Event::Finish(f)) = m.event {
            ids = Some(f.token_ids);
        }
    }
    assert_eq!(ids.context("no finish")?, want, "golden ids through the in-process cluster");

    gateway.stop().await?.map_err(|e| anyhow::anyhow!("gateway: {e}"))?;
    decoder.stop().await?.map_err(|e| anyhow::anyhow!("decoder: {e}"))?;
    vision.stop().await?.map_err(|e| anyhow::anyhow!("vision: {e}"))?;
    Ok(())
}
