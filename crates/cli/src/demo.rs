//! `dsvl demo`: the main job on embedded defaults. Brings up the local cluster (gateway,
//! vision-encoder, decoder with `--tp` ranks) on the bundled tiny model, sends a multimodal
//! chat request with a bundled image through the gateway twice (the second time the image
//! comes from the embedding cache), streams the answers with a per-tier latency breakdown, and
//! stops everything.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart};

use crate::cluster::{Cluster, ClusterSpec};
use crate::model_args::ModelArgs;
use crate::procs::free_port;

/// The bundled sample image (a photo of a rocket launch, from the reference's examples).
const SAMPLE_IMAGE: &[u8] = include_bytes!("../../../assets/images/rocket.jpg");

/// Arguments of `dsvl demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Checkpoint (`--model`; the bundled tiny model when absent), `--dtype`, `--device`.
    #[command(flatten)]
    model: ModelArgs,
    /// Decoder tensor-parallel ranks.
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Shared cache (`redis://...`); in-process caches when absent.
    #[arg(long)]
    redis: Option<String>,
    /// Image to ask about (default: the bundled rocket photo).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The question.
    #[arg(long, default_value = "Describe each stage of this image.")]
    prompt: String,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: u32,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> Result<()> {
    let image = match &args.image {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => SAMPLE_IMAGE.to_vec(),
    };
    match &args.model.model {
        Some(m) => eprintln!("model: {}", m.display()),
        None => eprintln!("model: bundled tiny-dsvl: RANDOM weights, so the text below is gibberish; every byte of plumbing is real"),
    }
    let spec = ClusterSpec {
        model: args.model.model.clone(),
        dtype: args.model.dtype,
        device: args.model.device,
        tp: args.tp,
        redis: args.redis.clone(),
        grpc_addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        http_addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        gateway_args: Vec::new(),
        observe: Default::default(),
    };
    let mut cluster = Cluster::start(&spec).await?;
    println!(
        "gateway: gRPC {}  HTTP {}  (vision {}, decoder {} with tp {})",
        cluster.grpc_url, cluster.http_url, cluster.vision_addr, cluster.decoder_addr, args.tp
    );
    let mut client =
        ChatClient::connect(cluster.grpc_url.clone()).await?.max_encoding_message_size(64 << 20);
    for round in 1..=2 {
        println!("\nrequest {round}: [image {} KiB] {}", image.len() / 1024, args.prompt);
        let request = ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: vec![
                    ContentPart { part: Some(Part::Image(image.clone().into())) },
                    ContentPart { part: Some(Part::Text(args.prompt.clone())) },
                ],
            }],
            // Greedy, so the two requests give the same reply.
            sampling: Some(dsvl_proto::v1::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: args.max_new_tokens,
            ..Default::default()
        };
        let mut req = tonic::Request::new(request);
        req.set_timeout(Duration::from_secs(600));
        let started = Instant::now();
        let mut stream = client
            .generate(req)
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut first = None;
        print!("answer: ");
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        {
            match msg.event {
                Some(Event::Delta(d)) => {
                    first.get_or_insert(started.elapsed().as_secs_f64());
                    print!("{}", d.text);
                    std::io::stdout().flush()?;
                }
                Some(Event::Finish(f)) => {
                    let t = f.timing.unwrap_or_default();
                    let total = started.elapsed().as_secs_f64();
                    println!();
                    println!(
                        "  {} prompt tokens (576 per image), {} new tokens, finish: {}",
                        f.prompt_tokens, f.completion_tokens, f.finish_reason
                    );
                    println!(
                        "  gateway   template + tokenize   {:>8.2} ms",
                        t.tokenize_seconds * 1e3
                    );
                    println!(
                        "  vision    encode image          {:>8.2} ms  ({})",
                        t.vision_seconds * 1e3,
                        if t.images_cached > 0 { "from the embedding cache" } else { "encoded" }
                    );
                    println!(
                        "  decoder   prefill → 1st token   {:>8.2} ms",
                        t.decoder_first_token_seconds * 1e3
                    );
                    println!(
                        "  client    time to first token   {:>8.2} ms",
                        first.unwrap_or(total) * 1e3
                    );
                    println!(
                        "  client    total                 {:>8.2} ms  ({:.1} tokens/s after the first)",
                        total * 1e3,
                        f.completion_tokens.saturating_sub(1) as f64 / (total - first.unwrap_or(total)).max(1e-9)
                    );
                }
                None => {}
            }
        }
    }
    println!("\nstopping the cluster…");
    cluster.stop();
    println!("done");
    Ok(())
}
