//! The vision-encoder service as users run it: the real `dsvl-vision` binary, a real
//! `redis-server` on a free loopback port, gRPC clients, and the service's own Prometheus
//! counters as the source of truth for "how many images were encoded".

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsvl_proto::internal::encode_result::Result as R;
use dsvl_proto::internal::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::internal::{EncodeRequest, EncodeResponse, ImageInput};
use dsvl_testkit::{
    free_port, golden_dir, http_get, metric_sum, repo_root, RedisServer, ServiceProcess,
};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Vision {
    proc: ServiceProcess,
    grpc: String,
    metrics: String,
}

impl Vision {
    async fn start(extra: &[&str]) -> Result<Self> {
        Self::launch(extra, false).await
    }

    /// Started with its log captured ([`ServiceProcess::logs`]).
    async fn start_capturing_logs(extra: &[&str]) -> Result<Self> {
        Self::launch(extra, true).await
    }

    async fn launch(extra: &[&str], capture_logs: bool) -> Result<Self> {
        let (gp, mp) = (free_port(), free_port());
        let grpc = format!("127.0.0.1:{gp}");
        let metrics = format!("127.0.0.1:{mp}");
        let mut args =
            vec!["--listen".to_string(), grpc.clone(), "--metrics-listen".into(), metrics.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Plain-text gRPC on loopback, on purpose (tests/e2e/tls.rs covers mutual TLS).
        args.push("--insecure".into());
        // Under a 4 GiB data limit: a regression kills the service, not the machine.
        let (program, args) =
            ServiceProcess::limited(env!("CARGO_BIN_EXE_dsvl-vision"), &args, 4 << 30);
        let proc = if capture_logs {
            ServiceProcess::spawn_capturing_logs(&program, &args)?
        } else {
            ServiceProcess::spawn(&program, &args)?
        };
        let me = Self { proc, grpc, metrics };
        me.wait_serving(Duration::from_secs(60)).await?;
        Ok(me)
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?.connect().await?)
    }

    async fn wait_serving(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(ch) = self.channel().await {
                let r = HealthClient::new(ch)
                    .check(HealthCheckRequest { service: "dsvl.internal.v1.VisionEncoder".into() })
                    .await;
                if r.is_ok_and(|r| r.into_inner().status == 1) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("vision service at {} never became SERVING", self.grpc)
    }

    async fn client(&self) -> Result<VisionEncoderClient<Channel>> {
        Ok(VisionEncoderClient::new(self.channel().await?).max_decoding_message_size(256 << 20))
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&http_get(&self.metrics, "/metrics")?, name, labels))
    }

    fn encoded(&self) -> Result<f64> {
        self.counter("dsvl_vision_images_encoded_total", &[])
    }
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(golden_dir().join(name)).expect("golden image")
}

/// A distinct valid PNG per `i` (a 1x2 image whose pixels encode `i`).
fn tiny_png(i: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let px = [(i & 0xff) as u8, (i >> 8) as u8, 7, 200, 100, (i % 251) as u8];
    let enc = image_png(&px, 2, 1);
    out.extend_from_slice(&enc);
    out
}

fn image_png(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .expect("png");
    buf
}

fn req(images: Vec<Vec<u8>>, salt: &[u8]) -> EncodeRequest {
    EncodeRequest {
        images: images
            .into_iter()
            .map(|data| ImageInput { data: data.into(), client_digest: String::new() })
            .collect(),
        cache_salt: salt.to_vec().into(),
        return_inline: false,
    }
}

fn hits(r: &EncodeResponse) -> Vec<bool> {
    r.results.iter().map(|x| x.cache_hit).collect()
}

/// Hit after miss, TTL expiry, and a different salt or model fingerprint missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_miss_ttl_salt_and_fingerprint() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let a = Vision::start(&["--redis", &url, "--cache-ttl-secs", "2"]).await?;
    let mut c = a.client().await?;
    let img = image("chelsea.png");
    let r1 = c.encode(req(vec![img.clone()], b"tenant-a")).await?.into_inner();
    assert_eq!(hits(&r1), [false]);
    assert!(
        matches!(r1.results[0].result, Some(R::Ref(_))),
        "shared cache: a reference is returned"
    );
    let r2 = c.encode(req(vec![img.clone()], b"tenant-a")).await?.into_inner();
    assert_eq!(hits(&r2), [true]);
    assert_eq!(a.encoded()?, 1.0);
    assert!(redis.dbsize()? >= 1);
    // Another tenant's salt is another key.
    let r3 = c.encode(req(vec![img.clone()], b"tenant-b")).await?.into_inner();
    assert_eq!(hits(&r3), [false]);
    assert_ne!(r3.results[0].key, r1.results[0].key);
    assert_eq!(a.encoded()?, 2.0);
    // After the TTL both tiers have forgotten it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r4 = c.encode(req(vec![img.clone()], b"tenant-a")).await?.into_inner();
    assert_eq!(hits(&r4), [false]);
    assert_eq!(a.encoded()?, 3.0);

    // A different checkpoint (one aligner weight changed) has another fingerprint: it misses
    // even though it shares Redis and the entry is fresh.
    let dir = tempfile::tempdir()?;
    for f in std::fs::read_dir(repo_root().join("assets/tiny-dsvl"))? {
        let f = f?;
        std::fs::copy(f.path(), dir.path().join(f.file_name()))?;
    }
    let mut tensors = candle_core::safetensors::load(
        dir.path().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let b = tensors.get("aligner.layers.1.bias").context("bias")?.clone();
    tensors.insert("aligner.layers.1.bias".into(), (b + 0.01)?);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;
    let other = Vision::start(&["--redis", &url, "--model", dir.path().to_str().unwrap()]).await?;
    let r5 = other.client().await?.encode(req(vec![img.clone()], b"tenant-a")).await?.into_inner();
    assert_eq!(hits(&r5), [false]);
    assert_ne!(r5.results[0].key, r4.results[0].key);
    assert_eq!(other.encoded()?, 1.0);
    Ok(())
}

/// 32 concurrent requests for one image over two replicas sharing Redis: one encode in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_encode_across_replicas() -> Result<()> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let a = Vision::start(&["--redis", &url]).await?;
    let b = Vision::start(&["--redis", &url]).await?;
    let img = image("astronaut_wide_1600x300.png");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut client = if i % 2 == 0 { a.client().await? } else { b.client().await? };
        let r = req(vec![img.clone()], b"t");
        tasks.push(tokio::spawn(async move { client.encode(r).await.map(|r| r.into_inner()) }));
    }
    let mut keys = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await??;
        keys.insert(r.results[0].key.clone());
        assert!(matches!(r.results[0].result, Some(R::Ref(_))));
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(a.encoded()? + b.encoded()?, 1.0, "exactly one encode across both replicas");
    let waits = a.counter("dsvl_vision_single_flight_waits_total", &[])?
        + b.counter("dsvl_vision_single_flight_waits_total", &[])?;
    assert!(waits > 0.0, "concurrent callers waited instead of encoding");
    Ok(())
}

/// The service's log lines as JSON objects (every line must be one).
fn json_log_lines(log: &str) -> Vec<serde_json::Value> {
    assert!(!log.contains('\u{1b}'), "no ANSI escape codes in a log file:\n{log}");
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Redis killed mid-test: every request still succeeds (uncached); after a restart the breaker
/// closes and entries are written again. The outage is in the log (JSON lines, no colour in a
/// file): one WARN with the cause, then one INFO at recovery; and in
/// `dsvl_cache_errors_total{op}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_redis_outage_and_recovers() -> Result<()> {
    let mut redis = RedisServer::start()?;
    let v = Vision::start_capturing_logs(&[
        "--redis",
        &redis.url(),
        "--redis-timeout-ms",
        "200",
        "--log-format",
        "json",
    ])
    .await?;
    let mut c = v.client().await?;
    c.encode(req(vec![tiny_png(1)], b"t")).await?;
    redis.kill();
    for i in 2..8 {
        let r = c
            .encode(req(vec![tiny_png(i)], b"t"))
            .await
            .context("request during the outage")?
            .into_inner();
        assert!(r.results[0].result.is_some());
    }
    assert!(
        v.counter("dsvl_vision_cache_requests_total", &[("tier", "shared"), ("outcome", "error")])?
            > 0.0
    );
    let failed_gets = v.counter("dsvl_cache_errors_total", &[("op", "get")])?;
    assert!(failed_gets > 0.0, "failed calls are counted per operation");
    redis.restart()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 100;
    loop {
        c.encode(req(vec![tiny_png(i)], b"t")).await?;
        i += 1;
        if redis.dbsize()? > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the cache never recovered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(v.counter("dsvl_cache_breaker_state", &[])?, 0.0, "breaker closed again");

    let lines = json_log_lines(&v.proc.logs());
    let about_redis = |level: &str, text: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["level"] == level && l["message"].as_str().is_some_and(|m| m.contains(text))
            })
            .collect()
    };
    let down = about_redis("WARN", "Redis is unavailable");
    let back = about_redis("INFO", "Redis is available again");
    // The outage lasted less than the 10 s repeat interval: one warning at its start, one line
    // at recovery. Under load a call after the recovery may still time out (200 ms here): that
    // is a new outage, reported the same way, so outages alternate with recoveries.
    assert!(!down.is_empty() && !back.is_empty(), "a warning and a recovery: {lines:#?}");
    assert!(
        back.len() <= down.len() && down.len() <= back.len() + 1,
        "each outage is one warning and at most one recovery: {lines:#?}"
    );
    assert!(down[0]["timestamp"].as_str() <= back[0]["timestamp"].as_str(), "in that order");
    assert!(
        down[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "with its cause: {}",
        down[0]
    );
    assert!(down[0]["timestamp"].is_string() && down[0]["target"].is_string());
    // Every failed get belongs to an outage that has ended by now; an outage may have ended
    // early (a call in flight since before the kill, a put say, succeeding after the first
    // failure) and a second begun, so the recoveries' counts are summed, not the first's alone.
    let recovered: u64 = back.iter().filter_map(|b| b["failed_calls"].as_u64()).sum();
    assert!(recovered >= failed_gets as u64, "{recovered} < {failed_gets}: {lines:#?}");
    Ok(())
}

/// Distinct images sent together are encoded in batches larger than one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_images_are_batched() -> Result<()> {
    let v = Vision::start(&["--max-batch", "8", "--max-wait-ms", "200"]).await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = v.client().await?;
        tasks.push(tokio::spawn(async move { c.encode(req(vec![tiny_png(1000 + i)], b"")).await }));
    }
    for t in tasks {
        t.await??;
    }
    let batches = v.counter("dsvl_vision_batch_size_count", &[])?;
    let images = v.counter("dsvl_vision_batch_size_sum", &[])?;
    assert_eq!(images, 8.0);
    assert!(batches < 8.0, "{images} images in {batches} batches: no batching happened");
    Ok(())
}

/// A full queue answers RESOURCE_EXHAUSTED; a request whose deadline passes while queued gets
/// DEADLINE_EXCEEDED and is never encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_and_deadlines() -> Result<()> {
    let v =
        Vision::start(&["--max-batch", "1", "--queue-capacity", "1", "--max-wait-ms", "0"]).await?;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut c = v.client().await?;
        tasks.push(tokio::spawn(async move { c.encode(req(vec![tiny_png(2000 + i)], b"")).await }));
    }
    let mut exhausted = 0;
    for t in tasks {
        match t.await? {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::ResourceExhausted => exhausted += 1,
            Err(s) => bail!("unexpected status {s:?}"),
        }
    }
    assert!(exhausted > 0, "a queue of one never filled up with 12 concurrent images");

    // A deadline that passes while the job waits behind a busy model thread.
    let before = v.encoded()?;
    let mut c = v.client().await?;
    let busy = tokio::spawn({
        let mut c = c.clone();
        async move { c.encode(req(vec![image("rocket.jpg")], b"busy")).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while v.counter("dsvl_vision_model_busy", &[])? < 1.0 {
        anyhow::ensure!(Instant::now() < deadline, "the model thread never got busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The deadline as a grpc-timeout header. tonic's channel also times the call by that header,
    // so on a loaded machine its own timer can fire just before the server's answer arrives
    // (CANCELLED, "Timeout expired"); either way the job must leave the queue unencoded.
    let dropped = |v: &Vision| -> Result<f64> {
        Ok(v.counter("dsvl_vision_jobs_dropped_total", &[("reason", "deadline")])?
            + v.counter("dsvl_vision_jobs_dropped_total", &[("reason", "cancelled")])?)
    };
    let dropped_before = dropped(&v)?;
    let mut r = tonic::Request::new(req(vec![tiny_png(3000)], b""));
    r.metadata_mut().insert("grpc-timeout", "150m".parse()?);
    let status = c.encode(r).await.err().context("expected DEADLINE_EXCEEDED")?;
    let client_timer =
        status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired");
    assert!(
        status.code() == tonic::Code::DeadlineExceeded || client_timer,
        "the server's DEADLINE_EXCEEDED (or the client's own timer on the same deadline): \
         {status:?}"
    );
    busy.await??;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(v.encoded()? - before, 1.0, "only the busy image was encoded");
    assert_eq!(dropped(&v)? - dropped_before, 1.0, "the late job was dropped from the queue");
    Ok(())
}

/// A corrupt image fails alone; the inline embedding equals the library's for the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_image_fails_alone_and_inline_matches_library() -> Result<()> {
    let v = Vision::start(&[]).await?;
    let good = image("chelsea.png");
    let mut bad = image("rocket.jpg");
    bad.truncate(bad.len() / 2);
    let r = v.client().await?.encode(req(vec![good.clone(), bad], b"")).await?.into_inner();
    let Some(R::Inline(emb)) = &r.results[0].result else {
        bail!("no inline embedding: {:?}", r.results[0])
    };
    let Some(R::Error(err)) = &r.results[1].result else { bail!("corrupt image did not fail") };
    assert_eq!(err.code(), dsvl_proto::internal::ImageErrorCode::InvalidImage);
    assert!(err.message.contains("truncated"), "{}", err.message);

    use dsvl_models::checkpoint::{Checkpoint, ModelSource};
    let ckpt = Checkpoint::open(&ModelSource::Bundled)?;
    let enc = dsvl_models::vision::VisionEncoder::load(
        &ckpt,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        None,
    )?;
    let pre = dsvl_models::preprocess::Preprocessor::new(
        enc.preprocess_config().clone(),
        Default::default(),
    );
    let want = enc
        .forward(&enc.batch_pixels(&[&pre.preprocess_bytes(&good)?])?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let got: Vec<f32> =
        emb.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(emb.shape, [576, 128]);
    assert_eq!(got, want, "service embedding differs from the library's");
    Ok(())
}

/// SIGTERM: health turns NOT_SERVING, the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_on_sigterm() -> Result<()> {
    let mut v = Vision::start(&[]).await?;
    let status = v.proc.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "{status:?}");
    Ok(())
}

/// Another replica took the lease and died (the lease is set, no value ever comes): this
/// replica waits, and when the lease expires it takes over and encodes the image itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_when_the_lease_holder_dies() -> Result<()> {
    let redis = RedisServer::start()?;
    let v = Vision::start(&["--redis", &redis.url(), "--lease-ms", "5000"]).await?;
    let mut c = v.client().await?;
    let info = c.info(dsvl_proto::internal::InfoRequest {}).await?.into_inner();
    let img = tiny_png(4242);
    let key = dsvl_core::cache_key::embedding_key(&dsvl_core::cache_key::KeyParts {
        salt: b"dead",
        model_fingerprint: &info.model_fingerprint,
        dtype: "f32",
        preprocess_version: dsvl_models::preprocess::PREPROCESS_VERSION,
        image: &dsvl_core::cache_key::ImageDigest::of(&img),
    });
    let lease = dsvl_core::cache_key::lease_key(&key);
    let planted = redis.command(&format!("SET {lease} dead-replica PX 1200"))?;
    assert!(planted.starts_with("+OK"), "{planted}");
    let t = Instant::now();
    let r = c.encode(req(vec![img], b"dead")).await?.into_inner();
    assert_eq!(r.results[0].key, key, "the test derives the same key as the service");
    assert!(matches!(r.results[0].result, Some(R::Ref(_))));
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "it waited for the planted lease ({:?})",
        t.elapsed()
    );
    assert_eq!(v.encoded()?, 1.0, "after the lease expired it encoded the image itself");
    assert!(v.counter("dsvl_vision_lease_waits_total", &[])? >= 1.0);
    Ok(())
}

fn inline(image: Vec<u8>, salt: &[u8]) -> EncodeRequest {
    EncodeRequest { return_inline: true, ..req(vec![image], salt) }
}

/// A corrupt value in Redis (garbage, truncated, one byte flipped) is a miss plus a
/// `corrupt` count, never a wrong embedding: the image is encoded again, the result equals
/// the first encode, and the re-encode repairs the entry (the next request hits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_redis_value_is_a_miss_and_is_repaired() -> Result<()> {
    let redis = RedisServer::start()?;
    // No local tier: every lookup reads Redis.
    let v = Vision::start(&["--redis", &redis.url(), "--local-cache-mib", "0"]).await?;
    let mut c = v.client().await?;
    let img = tiny_png(5150);
    let first = c.encode(inline(img.clone(), b"t")).await?.into_inner();
    let key = first.results[0].key.clone();
    let Some(R::Inline(want)) = first.results[0].result.clone() else {
        bail!("no inline embedding: {:?}", first.results[0])
    };
    assert!(!first.results[0].cache_hit);
    let again = c.encode(inline(img.clone(), b"t")).await?.into_inner();
    assert!(again.results[0].cache_hit, "a Redis hit before any corruption");
    let corrupt = || {
        v.counter("dsvl_vision_cache_requests_total", &[("tier", "shared"), ("outcome", "corrupt")])
    };
    assert_eq!(corrupt()?, 0.0);

    let len: usize =
        redis.command(&format!("STRLEN {key}"))?.trim().trim_start_matches(':').parse()?;
    assert!(len > want.data.len(), "stored value = header + payload ({len} bytes)");
    let corruptions = [
        ("garbage", format!("SET {key} not-an-embedding")),
        ("truncated", format!("EVAL \"local v = redis.call('GET', KEYS[1]) redis.call('SET', KEYS[1], string.sub(v, 1, #v - 100)) return #v\" 1 {key}")),
        ("payload byte flipped", format!("SETRANGE {key} {} Z", len - 10)),
    ];
    for (n, (what, cmd)) in corruptions.iter().enumerate() {
        let reply = redis.command(cmd)?;
        assert!(!reply.starts_with('-'), "{what}: {reply}");
        let r = c.encode(inline(img.clone(), b"t")).await?.into_inner();
        assert!(!r.results[0].cache_hit, "{what}: a corrupt value is not a hit");
        let Some(R::Inline(got)) = &r.results[0].result else {
            bail!("{what}: no inline embedding: {:?}", r.results[0])
        };
        assert_eq!(got.shape, want.shape);
        assert!(
            got.data == want.data,
            "{what}: the re-encoded embedding differs from the first encode"
        );
        assert_eq!(corrupt()?, (n + 1) as f64, "{what}: counted as corrupt");
        assert_eq!(v.encoded()?, (n + 2) as f64, "{what}: encoded again");
        let fixed: usize =
            redis.command(&format!("STRLEN {key}"))?.trim().trim_start_matches(':').parse()?;
        assert_eq!(fixed, len, "{what}: the re-encode overwrote the corrupt value");
        let hit = c.encode(inline(img.clone(), b"t")).await?.into_inner();
        assert!(hit.results[0].cache_hit, "{what}: hit after the repair");
        let Some(R::Inline(h)) = &hit.results[0].result else { bail!("no inline embedding") };
        assert!(h.data == want.data);
    }
    assert_eq!(v.encoded()?, (corruptions.len() + 1) as f64);
    Ok(())
}

/// A stalled Redis (SIGSTOP: it accepts and never answers) costs a request at most one
/// `--redis-timeout-ms` on top of the encode: the image is encoded without further Redis calls
/// and returned inline (it is not in the shared cache). After a few such requests the breaker
/// opens and requests stop waiting at all; after SIGCONT the cache serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_costs_at_most_one_timeout() -> Result<()> {
    // Long enough that encode-time noise on a loaded CPU (other tests, other builds) stays well
    // inside one timeout of slack.
    const TIMEOUT: Duration = Duration::from_millis(2500);
    let redis = RedisServer::start()?;
    let v = Vision::start(&[
        "--redis",
        &redis.url(),
        "--redis-timeout-ms",
        &TIMEOUT.as_millis().to_string(),
        "--local-cache-mib",
        "0",
    ])
    .await?;
    let mut c = v.client().await?;
    c.encode(req(vec![tiny_png(6000)], b"t")).await?; // connected and warm
                                                      // An uncached encode with a healthy Redis (lookup, lease, write-back) for reference.
    let t = Instant::now();
    let r = c.encode(req(vec![tiny_png(6001)], b"t")).await?.into_inner();
    let baseline = t.elapsed();
    assert!(matches!(r.results[0].result, Some(R::Ref(_))));
    // One timeout, plus the baseline, plus scheduling slack on a shared CPU. Paying a timeout
    // for each Redis call of the request (lookup, lease, release) would take 3 x TIMEOUT.
    let bound = baseline + TIMEOUT * 2;

    let frozen = redis.freeze()?;
    for i in 0..3 {
        let t = Instant::now();
        let r = c
            .encode(req(vec![tiny_png(6100 + i)], b"t"))
            .await
            .context("request while Redis is stalled")?
            .into_inner();
        let took = t.elapsed();
        assert!(
            took < bound,
            "request {i} took {took:?} with Redis stalled (bound {bound:?}, baseline {baseline:?})"
        );
        assert!(!r.results[0].cache_hit);
        assert!(
            matches!(r.results[0].result, Some(R::Inline(_))),
            "not stored in Redis, so returned inline: {:?}",
            r.results[0].result.as_ref().map(|_| ())
        );
    }
    assert!(
        v.counter("dsvl_vision_cache_requests_total", &[("tier", "shared"), ("outcome", "error")])?
            >= 3.0
    );
    assert_eq!(
        v.counter("dsvl_cache_breaker_state", &[])?,
        2.0,
        "three failed lookups opened the breaker"
    );
    let t = Instant::now();
    c.encode(req(vec![tiny_png(6200)], b"t")).await?;
    assert!(
        t.elapsed() < TIMEOUT,
        "the open breaker answers without waiting for Redis ({:?})",
        t.elapsed()
    );
    assert_eq!(v.encoded()?, 6.0);

    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 6300;
    loop {
        let img = tiny_png(i);
        i += 1;
        let r = c.encode(req(vec![img.clone()], b"t")).await?.into_inner();
        if matches!(r.results[0].result, Some(R::Ref(_))) {
            let hit = c.encode(req(vec![img], b"t")).await?.into_inner();
            assert!(hit.results[0].cache_hit, "served from Redis again");
            assert!(matches!(hit.results[0].result, Some(R::Ref(_))));
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the cache never recovered after SIGCONT");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(v.counter("dsvl_cache_breaker_state", &[])?, 0.0, "breaker closed again");
    Ok(())
}

/// Deadline headers of absurd size are capped, garbage is INVALID_ARGUMENT; neither panics the
/// handler, and the same connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_deadline_headers_never_panic() -> Result<()> {
    let v = Vision::start(&[]).await?;
    let mut c = v.client().await?;
    for (i, &(value, accepted)) in dsvl_testkit::HOSTILE_GRPC_TIMEOUTS.iter().enumerate() {
        let mut r = tonic::Request::new(req(vec![tiny_png(5000 + i as u32)], b""));
        r.metadata_mut().insert("grpc-timeout", value.parse()?);
        match c.encode(r).await {
            Ok(resp) if accepted => assert_eq!(resp.into_inner().results.len(), 1),
            Err(s) if !accepted && s.code() == tonic::Code::InvalidArgument => {
                assert!(s.message().contains("grpc-timeout"), "{s:?}")
            }
            other => bail!("grpc-timeout {value:?}: unexpected {other:?}"),
        }
        // The connection still serves a plain request.
        let ok = c.encode(req(vec![tiny_png(5100 + i as u32)], b"")).await?;
        assert_eq!(ok.into_inner().results.len(), 1);
    }
    Ok(())
}

/// Fail closed: a shared cache without the cluster secret (which seals what this tier writes)
/// is refused at start-up unless `--insecure`.
#[test]
fn a_shared_cache_needs_the_cluster_secret() -> Result<()> {
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dsvl-vision"))
            .args(["--redis", "rediss://127.0.0.1:1", "--listen", "127.0.0.1:1"])
            .args(extra)
            .env_remove("DSVL_CLUSTER_SECRET_FILE")
            .env_remove("DSVL_INSECURE")
            .output()
    };
    let out = run(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cluster secret") && err.contains("--insecure"), "{err}");
    let short = tempfile::NamedTempFile::new()?;
    std::fs::write(short.path(), "too short")?;
    let out = run(&["--cluster-secret-file", short.path().to_str().unwrap_or_default()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");
    Ok(())
}

/// Health stays NOT_SERVING (while the port answers) until the model is loaded; the load
/// reports its start and end in the log. A log format other than text or json stops the
/// service at start, naming the accepted values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_loaded_and_the_load_is_logged() -> Result<()> {
    let failpoints = tempfile::tempdir()?;
    let hold = failpoints.path().join(dsvl_core::failpoint::VISION_LOAD_HOLD);
    std::fs::write(&hold, b"")?;
    let grpc = format!("127.0.0.1:{}", free_port());
    // SAFETY: nextest runs each test in its own process; the variable is read only by the
    // service started below.
    unsafe { std::env::set_var("DSVL_FAILPOINTS_DIR", failpoints.path()) };
    let proc = ServiceProcess::spawn_capturing_logs(
        env!("CARGO_BIN_EXE_dsvl-vision"),
        &["--listen".to_string(), grpc.clone(), "--insecure".into()],
    )?;
    let status = || async {
        let ch = Channel::from_shared(format!("http://{grpc}"))?.connect().await?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest { service: "dsvl.internal.v1.VisionEncoder".into() })
            .await?;
        anyhow::Ok(r.into_inner().status)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut not_serving = 0;
    while not_serving < 10 {
        match status().await {
            Ok(s) => {
                assert_eq!(s, 2, "NOT_SERVING while the model is not loaded");
                not_serving += 1;
            }
            Err(_) => anyhow::ensure!(Instant::now() < deadline, "the port never answered"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!proc.logs().contains("loading vision tower: done"), "{}", proc.logs());
    std::fs::remove_file(&hold)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status().await? != 1 {
        anyhow::ensure!(Instant::now() < deadline, "never SERVING after the load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = proc.logs();
    assert!(log.contains("loading vision tower: starting"), "{log}");
    assert!(log.contains("loading vision tower: done"), "{log}");
    assert!(!log.contains('\u{1b}'), "no colour in a log file: {log}");

    for (flag, env) in [(Some("yaml"), None), (None, Some("xml"))] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dsvl-vision"));
        if let Some(f) = flag {
            cmd.args(["--log-format", f]);
        }
        if let Some(e) = env {
            cmd.env("DSVL_LOG_FORMAT", e);
        }
        let out = cmd.output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("text") && stderr.contains("json"), "{stderr}");
    }
    Ok(())
}
