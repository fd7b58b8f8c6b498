//! `dsvl-bench vision-service`: what the embedding cache buys at the real DeepSeek-VL-7B
//! dimensions (random weights, CPU): latency of an encode vs a local-tier hit vs a Redis hit,
//! through the service's own pipeline (`dsvl_vision::encode::Pipeline::embed`, the path every
//! request takes minus gRPC), and images/s with dynamic batching vs `max_batch 1` under
//! concurrent load. Needs `redis-server` (scripts/setup).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use candle_core::{DType, Device};
use clap::Args;
use dsvl_cache::{MemoryCache, RedisCache, RedisConfig, SingleFlight};
use dsvl_core::codec::EmbeddingDType;
use dsvl_core::ImageLimits;
use dsvl_models::preprocess::Preprocessor;
use dsvl_vision::batcher::{Batcher, BatcherConfig};
use dsvl_vision::encode::{Expected, Pipeline};

use crate::reference::median;
use crate::vision::vl7b_encoder;

/// Arguments of `dsvl-bench vision-service`.
#[derive(Args)]
pub struct ServiceArgs {
    /// Encodes timed for the latency comparison.
    #[arg(long, default_value_t = 2)]
    encodes: usize,
    /// Concurrent distinct images for the throughput comparison.
    #[arg(long, default_value_t = 8)]
    concurrent: usize,
    /// Batch size of the batched run.
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
}

fn png(i: u32) -> Bytes {
    use image::ImageEncoder;
    let px: Vec<u8> = (0..64 * 48 * 3).map(|j| ((j as u32 * 31 + i * 97) % 251) as u8).collect();
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(&px, 64, 48, image::ExtendedColorType::Rgb8)
        .expect("png");
    Bytes::from(buf)
}

fn pipeline(
    batcher: Arc<Batcher>,
    pre: &Preprocessor,
    local_bytes: usize,
    shared: Option<Arc<RedisCache>>,
) -> Arc<Pipeline> {
    Arc::new(Pipeline {
        batcher,
        preprocessor: pre.clone(),
        expected: Expected {
            fingerprint: "bench-7b-random".into(),
            dtype: EmbeddingDType::F32,
            shape: vec![576, 4096],
        },
        seal: dsvl_core::EmbeddingSeal::keyed(&dsvl_core::ClusterSecret::random()),
        local: Arc::new(MemoryCache::new(local_bytes)),
        shared,
        flights: SingleFlight::new(),
        ttl: Duration::from_secs(3600),
        lease: Duration::from_secs(600),
        decode_slots: Arc::new(tokio::sync::Semaphore::new(16)),
    })
}

fn key(i: u32) -> String {
    format!("dsvl:emb:v2:bench{i:08}")
}

/// Runs the benchmark.
pub fn run(args: ServiceArgs, threads: usize) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(async move {
        let redis = dsvl_testkit::RedisServer::start()?;
        let shared = Arc::new(RedisCache::new(RedisConfig::new(redis.url()))?);
        let device = Device::Cpu;
        let encoder = vl7b_encoder(DType::F32, &device)?;
        let pre = Preprocessor::new(encoder.preprocess_config().clone(), ImageLimits::default());
        let batcher = Arc::new(Batcher::start(encoder, BatcherConfig { max_batch: 1, max_wait: Duration::ZERO, capacity: 64 }, dsvl_core::watchdog::Watchdog::new("bench")));
        // A: no local tier (every hit goes to Redis); B: local tier only.
        let a = pipeline(batcher.clone(), &pre, 0, Some(shared.clone()));
        let b = pipeline(batcher.clone(), &pre, 1 << 30, None);

        let (mut encode, mut redis_hit, mut local_hit) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.encodes as u32 {
            let t = Instant::now();
            let out = a.embed(key(i), png(i), None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            encode.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(!out.cache_hit);
            for _ in 0..5 {
                let t = Instant::now();
                let hit = a.embed(key(i), png(i), None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                redis_hit.push(t.elapsed().as_secs_f64());
                anyhow::ensure!(hit.cache_hit, "expected a Redis hit");
            }
            use dsvl_cache::EmbeddingCache;
            b.local.put(&key(i), out.stored.value.clone(), Duration::from_secs(3600)).await?;
            for _ in 0..5 {
                let t = Instant::now();
                let hit = b.embed(key(i), png(i), None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                local_hit.push(t.elapsed().as_secs_f64());
                anyhow::ensure!(hit.cache_hit, "expected a local hit");
            }
            eprintln!("image {i}: encode {:.2}s", encode.last().unwrap());
        }
        drop((a, b, batcher));

        let mut throughput = Vec::new();
        for max_batch in [1, args.max_batch] {
            let encoder = vl7b_encoder(DType::F32, &device)?;
            let batcher = Arc::new(Batcher::start(encoder, BatcherConfig { max_batch, max_wait: Duration::from_millis(50), capacity: 64 }, dsvl_core::watchdog::Watchdog::new("bench")));
            let p = pipeline(batcher, &pre, 0, None);
            let t = Instant::now();
            let tasks: Vec<_> = (0..args.concurrent as u32)
                .map(|i| {
                    let p = p.clone();
                    tokio::spawn(async move { p.embed(key(10_000 * max_batch as u32 + i), png(10_000 * max_batch as u32 + i), None).await })
                })
                .collect();
            for task in tasks {
                task.await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            let ips = args.concurrent as f64 / t.elapsed().as_secs_f64();
            eprintln!("max_batch {max_batch}: {ips:.4} images/s");
            throughput.push((max_batch, ips));
        }

        let (e, r, l) = (median(encode), median(redis_hit), median(local_hit));
        println!("\nVision service pipeline, DeepSeek-VL-7B dims (576 x 4096 f32 = 9.4 MB per embedding), CPU, {threads} threads");
        println!("{:<34} {:>12}", "latency (median)", "seconds");
        println!("{:<34} {e:>12.4}", "encode (cache miss)");
        println!("{:<34} {r:>12.5}   {:.3}% of an encode", "Redis hit (local tier empty)", 100.0 * r / e);
        println!("{:<34} {l:>12.6}   {:.4}% of an encode", "local-tier hit", 100.0 * l / e);
        println!("{:<34} {:>12}", format!("throughput, {} concurrent images", args.concurrent), "images/s");
        for (mb, ips) in &throughput {
            println!("{:<34} {ips:>12.4}", format!("max_batch {mb}"));
        }
        println!("batching gain: {:.2}x", throughput[1].1 / throughput[0].1);
        Ok(())
    })
}
