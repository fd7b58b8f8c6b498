//! `dsvl demo`: the main job on embedded defaults. Starts a vision-encoder (bundled tiny model,
//! in-process cache unless `--redis` is given), encodes the bundled sample images over gRPC
//! twice, and shows the second pass served from the cache.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use dsvl_proto::v1::encode_result::Result as R;
use dsvl_proto::v1::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::v1::{EncodeRequest, ImageInput};

use crate::procs::{free_port, sibling_binary, Service};

/// Arguments of `dsvl demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Checkpoint directory; the bundled tiny model when absent.
    #[arg(long, env = "DSVL_MODEL")]
    model: Option<PathBuf>,
    /// Shared cache (`redis://...`); the in-process cache when absent.
    #[arg(long)]
    redis: Option<String>,
    /// Images to encode (default: the bundled samples).
    images: Vec<PathBuf>,
}

fn default_images() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/images");
    vec![root.join("rocket.jpg"), root.join("chelsea.png")]
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> Result<()> {
    let images = if args.images.is_empty() { default_images() } else { args.images.clone() };
    let data: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))).collect::<Result<_>>()?;
    match &args.model {
        Some(m) => eprintln!("model: {}", m.display()),
        None => eprintln!("model: bundled tiny-dsvl (random weights: embeddings are meaningless, the plumbing is real)"),
    }
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = vec!["--listen".to_string(), addr.clone()];
    if let Some(m) = &args.model {
        cmd.extend(["--model".into(), m.display().to_string()]);
    }
    if let Some(r) = &args.redis {
        cmd.extend(["--redis".into(), r.clone()]);
    }
    let t = Instant::now();
    let mut vision = Service::spawn("dsvl-vision", &sibling_binary("dsvl-vision")?, addr.clone(), &cmd)?;
    vision.wait_serving("dsvl.v1.VisionEncoder", Duration::from_secs(600)).await?;
    println!("vision-encoder ready on {addr} in {:.2}s ({} cache)", t.elapsed().as_secs_f64(), if args.redis.is_some() { "Redis" } else { "in-process" });

    let mut client = VisionEncoderClient::connect(format!("http://{addr}")).await?.max_decoding_message_size(512 << 20);
    let mut first = Vec::new();
    for pass in 1..=2 {
        println!("pass {pass}:");
        for (i, (path, bytes)) in images.iter().zip(&data).enumerate() {
            let t = Instant::now();
            let req = EncodeRequest { images: vec![ImageInput { data: bytes.clone().into(), client_digest: String::new() }], ..Default::default() };
            let res = client.encode(req).await?.into_inner();
            let secs = t.elapsed().as_secs_f64();
            let r = &res.results[0];
            let shape = match &r.result {
                Some(R::Inline(e)) => format!("{:?} inline", e.shape),
                Some(R::Ref(e)) => format!("{:?} in Redis", e.shape),
                Some(R::Error(e)) => format!("error {}: {}", e.code, e.message),
                None => "empty".into(),
            };
            println!(
                "  {:<14} {:<5} {:>9.4}s  {shape}  key {}…",
                path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                if r.cache_hit { "hit" } else { "miss" },
                secs,
                &r.key.get(..28).unwrap_or(&r.key)
            );
            if pass == 1 {
                first.push(secs);
            } else if r.cache_hit {
                println!("  {:<14} served from cache, {:.0}x faster than encoding", "", first[i] / secs.max(1e-9));
            }
        }
    }
    vision.stop(Duration::from_secs(10));
    Ok(())
}
