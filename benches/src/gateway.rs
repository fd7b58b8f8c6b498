//! `dsvl-bench gateway`: what the gateway adds. The same requests go (a) through the gateway
//! and (b) straight to the tiers (the client tokenizes with the same code, asks the
//! vision-encoder for the image's embedding, then streams from the decoder), interleaved in one
//! run against one cluster of real processes on the bundled tiny model. Reports end-to-end
//! latency percentiles of both paths and the difference, throughput under concurrency, and
//! the time of one routing decision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use dsvl_e2e::{golden_image, Cluster, Options};
use dsvl_gateway::prepare::{prepare, ChatInput, InMessage, Part, Role};
use dsvl_gateway::served::ServedModel;
use dsvl_gateway::upstream::{Pool, Tier};
use dsvl_gateway::{Args as GatewayArgs, GatewayConfig};
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::encode_result::Result as EncodeResult;
use dsvl_proto::internal::image_slot::Embedding;
use dsvl_proto::internal::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::internal::{EncodeRequest, GenerateRequest, ImageInput, ImageSlot};
use dsvl_proto::v1::chat_response::Event as ChatEvent;
use dsvl_proto::v1::content_part::Part as ProtoPart;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart};
use tonic::transport::Channel;

/// Arguments of `dsvl-bench gateway`.
#[derive(Args)]
pub struct GatewayBenchArgs {
    /// Sequential rounds (each: one direct and one gateway request of each kind).
    #[arg(long, default_value_t = 60)]
    rounds: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 16)]
    new_tokens: u32,
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
}

struct Clients {
    chat: dsvl_proto::v1::chat_client::ChatClient<Channel>,
    vision: VisionEncoderClient<Channel>,
    decoder: DecoderClient<Channel>,
    config: GatewayConfig,
    model: Arc<ServedModel>,
}

#[derive(Clone)]
struct Request {
    image: Option<Vec<u8>>,
    text: String,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

impl Clients {
    async fn through_gateway(&mut self, r: &Request, new_tokens: u32) -> Result<usize> {
        let mut content = Vec::new();
        if let Some(img) = &r.image {
            content.push(ContentPart { part: Some(ProtoPart::Image(img.clone().into())) });
        }
        content.push(ContentPart { part: Some(ProtoPart::Text(r.text.clone())) });
        let req = ChatRequest {
            messages: vec![ChatMessage { role: "user".into(), content }],
            sampling: Some(dsvl_proto::v1::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: new_tokens,
            ..Default::default()
        };
        let mut stream = self.chat.generate(req).await?.into_inner();
        let mut n = 0;
        while let Some(m) = stream.message().await? {
            if let Some(ChatEvent::Finish(f)) = m.event {
                n = f.token_ids.len();
            }
        }
        Ok(n)
    }

    async fn direct(&mut self, r: &Request, new_tokens: u32) -> Result<usize> {
        let mut parts = Vec::new();
        if let Some(img) = &r.image {
            parts.push(Part::Image(img.clone().into()));
        }
        parts.push(Part::Text(r.text.clone()));
        let input = ChatInput {
            messages: vec![InMessage { role: Role::User, parts }],
            sampling: dsvl_core::SamplingRequest { temperature: Some(0.0), ..Default::default() },
            max_tokens: Some(new_tokens),
            ..Default::default()
        };
        let prep = prepare(&self.config, &self.model, input)?;
        let mut images = Vec::new();
        if let Some(img) = &r.image {
            let resp = self
                .vision
                .encode(EncodeRequest {
                    images: vec![ImageInput {
                        data: img.clone().into(),
                        client_digest: String::new(),
                    }],
                    ..Default::default()
                })
                .await?
                .into_inner();
            let emb = match resp.results.into_iter().next().and_then(|x| x.result) {
                Some(EncodeResult::Ref(r)) => Embedding::Ref(r),
                Some(EncodeResult::Inline(e)) => Embedding::Inline(e),
                other => anyhow::bail!("vision: {other:?}"),
            };
            images.push(ImageSlot {
                position: prep.prompt.image_spans[0].0 as u32,
                embedding: Some(emb),
            });
        }
        let req = GenerateRequest {
            request_id: String::new(),
            prompt_token_ids: prep.prompt.ids.clone(),
            images,
            sampling: Some((&prep.sampling).into()),
            stop_token_ids: vec![self.model.tokenizer.special().eos],
            max_new_tokens: prep.max_new_tokens,
            logprobs: false,
            cache_salt: Default::default(),
            constraint: None,
            ..Default::default()
        };
        let mut stream = self.decoder.generate(req).await?.into_inner();
        let mut n = 0;
        while let Some(m) = stream.message().await? {
            if let Some(dsvl_proto::internal::generate_response::Event::Token(_)) = m.event {
                n += 1;
            }
        }
        Ok(n)
    }
}

async fn clients(cluster: &Cluster) -> Result<Clients> {
    let config = GatewayConfig::try_from(&<GatewayArgs as clap::Parser>::try_parse_from([
        "bench",
        "--decoder",
        "unused:1",
        "--allow-unauthenticated",
    ])?)?;
    Ok(Clients {
        chat: cluster.chat().await?,
        vision: VisionEncoderClient::connect(format!("http://{}", cluster.vision[0].addr))
            .await?
            .max_decoding_message_size(64 << 20),
        decoder: DecoderClient::connect(format!("http://{}", cluster.decoder.addr)).await?,
        model: Arc::new(ServedModel::load(None, config.model_name.clone())?),
        config,
    })
}

fn routing_decision_ns() -> Result<(f64, f64)> {
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let addrs: Vec<String> = (0..16).map(|i| format!("10.0.0.{i}:50061")).collect();
    let vision = Pool::from_addresses(Tier::Vision, &addrs);
    let decoder = Pool::from_addresses(Tier::Decoder, &addrs);
    let digests: Vec<String> = (0..1024)
        .map(|i| dsvl_core::cache_key::ImageDigest::of(format!("image {i}").as_bytes()).to_hex())
        .collect();
    let n = 50_000;
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(vision.by_rendezvous(&digests[i % digests.len()]));
    }
    let hrw = t.elapsed().as_nanos() as f64 / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(decoder.by_least_work());
    }
    Ok((hrw, t.elapsed().as_nanos() as f64 / n as f64))
}

/// Runs the benchmark.
pub fn run(args: GatewayBenchArgs) -> Result<()> {
    let (hrw_ns, least_ns) = routing_decision_ns()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        eprintln!("starting the cluster (redis, vision-encoder, decoder, gateway)…");
        let cluster = Cluster::start(Options { vision_replicas: 1, tp: 1, redis: true, ..Options::default() }).await?;
        let mut c = clients(&cluster).await?;
        let kinds = [
            ("text", Request { image: None, text: "Hello! What can you do? Count: 1, 22, 333, 4444.".into() }),
            ("image (cached)", Request { image: Some(golden_image("rocket.jpg")?), text: "Describe each stage of this image.".into() }),
        ];
        // Warm up both paths (and put the image in the cache).
        for (_, r) in &kinds {
            c.direct(r, args.new_tokens).await?;
            c.through_gateway(r, args.new_tokens).await?;
        }
        println!("\nGateway overhead, tiny model, CPU, dev profile; {} rounds, {} new tokens, sequential", args.rounds, args.new_tokens);
        println!("{:<16} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11}", "request", "direct p50", "gw p50", "direct p99", "gw p99", "added p50", "added p99");
        for (name, r) in &kinds {
            let (mut direct, mut gateway) = (Vec::new(), Vec::new());
            for i in 0..args.rounds {
                // Alternate the order so neither path always runs second.
                for leg in [i % 2, 1 - i % 2] {
                    let t = Instant::now();
                    let n = if leg == 0 { c.direct(r, args.new_tokens).await? } else { c.through_gateway(r, args.new_tokens).await? };
                    anyhow::ensure!(n as u32 == args.new_tokens || n > 0, "no tokens");
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if leg == 0 { direct.push(ms) } else { gateway.push(ms) }
                }
            }
            let (d50, g50, d99, g99) = (percentile(&mut direct, 0.5), percentile(&mut gateway, 0.5), percentile(&mut direct, 0.99), percentile(&mut gateway, 0.99));
            println!(
                "{name:<16} {d50:>8.2}ms {g50:>8.2}ms {d99:>8.2}ms {g99:>8.2}ms {:>+8.2}ms {:>+8.2}ms   ({:+.1}% at p50)",
                g50 - d50,
                g99 - d99,
                100.0 * (g50 / d50 - 1.0)
            );
        }

        println!("\nThroughput, {} concurrent clients, {:.0}s per phase, text requests", args.concurrency, args.seconds);
        let mut rates = Vec::new();
        for gateway in [false, true, false, true] {
            let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
            let mut tasks = Vec::new();
            for _ in 0..args.concurrency {
                let mut c = clients(&cluster).await?;
                let r = kinds[0].1.clone();
                let n = args.new_tokens;
                tasks.push(tokio::spawn(async move {
                    let mut done = 0usize;
                    while Instant::now() < stop {
                        let ok = if gateway { c.through_gateway(&r, n).await } else { c.direct(&r, n).await };
                        ok.map(|_| done += 1)?;
                    }
                    anyhow::Ok(done)
                }));
            }
            let t = Instant::now();
            let mut done = 0;
            for task in tasks {
                done += task.await.context("client task")??;
            }
            let rate = done as f64 / t.elapsed().as_secs_f64();
            println!("  {:<8} {rate:>8.2} requests/s", if gateway { "gateway" } else { "direct" });
            rates.push((gateway, rate));
        }
        let mean = |g: bool| rates.iter().filter(|r| r.0 == g).map(|r| r.1).sum::<f64>() / 2.0;
        println!("  gateway/direct throughput: {:.3}", mean(true) / mean(false));
        let live = cluster.gateway.metric("dsvl_gateway_routing_seconds_sum", &[])? / cluster.gateway.metric("dsvl_gateway_routing_seconds_count", &[])?.max(1.0);
        println!("\nRouting decision (16 replicas, in process): rendezvous {:.2} µs, least-work {:.2} µs; live mean in the gateway {:.2} µs", hrw_ns / 1e3, least_ns / 1e3, live * 1e6);
        anyhow::Ok(())
    })
}
