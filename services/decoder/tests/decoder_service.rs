//! The decoder service as deployed: the real `dsvl-decoder` binary (rank 0 plus worker rank
//! processes), a real `redis-server` for embedding references, gRPC streaming clients.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::generate_response::Event;
use dsvl_proto::internal::image_slot::Embedding as Source;
use dsvl_proto::internal::{EmbeddingRef, GenerateRequest, ImageSlot, LoadRequest};
use dsvl_testkit::{
    child_pids, free_port, golden_dir, http_get, metric_sum, pid_alive, RedisServer, ServiceProcess,
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Decoder {
    proc: ServiceProcess,
    grpc: String,
    metrics: String,
}

impl Decoder {
    async fn start(extra: &[&str]) -> Result<Self> {
        let (grpc, metrics) =
            (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let mut args =
            vec!["--listen".to_string(), grpc.clone(), "--metrics-listen".into(), metrics.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Plain-text gRPC on loopback, on purpose (tests/e2e/tls.rs covers mutual TLS).
        args.push("--insecure".into());
        // Under an 8 GiB data limit (the KV pool reserves 4 GiB per rank up front): hostile
        // inputs that grow memory kill the service, not the machine.
        let proc =
            ServiceProcess::spawn_limited(env!("CARGO_BIN_EXE_dsvl-decoder"), &args, 8 << 30)?;
        let me = Self { proc, grpc, metrics };
        wait_serving(&me.grpc, Duration::from_secs(120)).await?;
        Ok(me)
    }

    async fn channel(&self) -> Result<Channel> {
        channel(&self.grpc).await
    }

    async fn client(&self) -> Result<DecoderClient<Channel>> {
        Ok(DecoderClient::new(self.channel().await?))
    }

    fn counter(&self, name: &str) -> Result<f64> {
        Ok(metric_sum(&http_get(&self.metrics, "/metrics")?, name, &[]))
    }
}

async fn channel(grpc: &str) -> Result<Channel> {
    Ok(Channel::from_shared(format!("http://{grpc}"))?.connect().await?)
}

/// Waits until the decoder at `grpc` reports SERVING (every rank joined and warmed up).
async fn wait_serving(grpc: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(ch) = channel(grpc).await {
            if HealthClient::new(ch)
                .check(HealthCheckRequest { service: String::new() })
                .await
                .is_ok_and(|r| r.into_inner().status == 1)
            {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "decoder at {grpc} never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to `limit` for `child` to exit.
async fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        anyhow::ensure!(
            t.elapsed() < limit,
            "process {} still running after {limit:?}",
            child.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn golden() -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let lm = candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?;
    let chat = serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    Ok((lm, chat))
}

fn ids(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
}

fn request(prompt: Vec<u32>, max_new: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: prompt,
        max_new_tokens: max_new,
        stop_token_ids: vec![1001],
        sampling: Some((&dsvl_core::SamplingParams::greedy()).into()),
        ..Default::default()
    }
}

/// Streams to the end; returns the token ids and the finish reason (or the status).
async fn generate(
    client: &mut DecoderClient<Channel>,
    req: GenerateRequest,
) -> Result<(Vec<u32>, i32), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Token(t)) => {
                assert_eq!(t.index as usize, out.len(), "token indexes are dense");
                out.push(t.id);
            }
            Some(Event::Finish(f)) => return Ok((out, f.reason)),
            None => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a finish message"))
}

/// Distinct prompts of varying length from the tiny vocabulary.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| (0..(20 + 7 * i)).map(|j| ((j * 37 + i * 101) % 990) as u32 + 1).collect())
        .collect()
}

/// The golden text prompt streams the golden greedy ids (= `dsvl generate`), at TP 1 and 2;
/// a seeded sampled request streams the same tokens at both degrees (the API's promise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_stream_matches_reference_at_tp_1_and_2() -> Result<()> {
    let (lm, _) = golden()?;
    let seeded = |seed| GenerateRequest {
        sampling: Some(
            (&dsvl_core::SamplingParams { temperature: 1.0, seed, ..Default::default() }).into(),
        ),
        ..request(ids(&lm["text.input_ids"]).expect("ids"), 24)
    };
    let mut sampled = Vec::new();
    for tp in ["1", "2"] {
        let d = Decoder::start(&["--tp", tp]).await?;
        let (out, reason) =
            generate(&mut d.client().await?, request(ids(&lm["text.input_ids"])?, 16)).await?;
        assert_eq!(out, ids(&lm["text.generated_ids"])?, "tp {tp}");
        assert_eq!(reason, dsvl_proto::internal::FinishReason::Length as i32);
        let load = d.client().await?.load(LoadRequest {}).await?.into_inner();
        assert_eq!(load.tensor_parallel.to_string(), tp);
        let (a, _) = generate(&mut d.client().await?, seeded(1234)).await?;
        let (b, _) = generate(&mut d.client().await?, seeded(1235)).await?;
        assert_ne!(a, b, "tp {tp}: another seed, other tokens");
        assert_ne!(a[..16], out[..], "tp {tp}: sampling at temperature 1 is not greedy here");
        sampled.push(a);
    }
    assert_eq!(sampled[0], sampled[1], "seed 1234 gives the same tokens at TP 1 and TP 2");
    Ok(())
}

/// The image prompt with its embedding referenced through a real Redis (encoded by the
/// library, stored in the vision tier's format) streams the golden ids; a missing entry is
/// FAILED_PRECONDITION, a wrong fingerprint too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_stream_through_redis_matches_reference() -> Result<()> {
    let (lm, _) = golden()?;
    let redis = RedisServer::start()?;
    let d = Decoder::start(&["--redis", &redis.url()]).await?;

    use dsvl_models::checkpoint::{Checkpoint, ModelSource};
    let ckpt = Checkpoint::open(&ModelSource::Bundled)?;
    let fingerprint = dsvl_checkpoint::vision_fingerprint(&ckpt)?;
    let enc = dsvl_models::vision::VisionEncoder::load(&ckpt, DType::F32, &Device::Cpu, None)?;
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let u8s = pre["photo_jpeg.pixel_values_u8"].flatten_all()?.to_dtype(DType::U32)?;
    let pixels = pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?;
    let emb = enc.forward(&pixels)?.flatten_all()?.to_vec1::<f32>()?;
    let payload: Vec<u8> = emb.iter().flat_map(|v| v.to_le_bytes()).collect();
    // Sealed with the cluster secret the decoder was started with (the vision tier's job).
    let ours = dsvl_core::EmbeddingSeal::keyed(&dsvl_core::ClusterSecret::from_file(
        dsvl_testkit::cluster_secret_file(),
    )?);
    let store_sealed = |key: &str,
                        fp: &str,
                        seal: &dsvl_core::EmbeddingSeal,
                        sealed_for: &str,
                        payload: &[u8]|
     -> Result<()> {
        let value = dsvl_core::Embedding::new(
            dsvl_core::EmbeddingDType::F32,
            vec![576, 128],
            fp.into(),
            payload.to_vec().into(),
        )?
        .to_value(seal, sealed_for);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port))?;
        use std::io::{Read, Write};
        write!(s, "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n", key.len(), value.len())?;
        s.write_all(&value)?;
        s.write_all(b"\r\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        anyhow::ensure!(buf[..n].starts_with(b"+OK"), "SET failed");
        Ok(())
    };
    let store = |key: &str, fp: &str| store_sealed(key, fp, &ours, key, &payload);
    store("dsvl:emb:v2:golden", &fingerprint)?;
    store("dsvl:emb:v2:foreign", "another-model")?;
    // Poisoned entries: a good value copied under another key, one sealed without the secret,
    // one whose producer put a NaN in it.
    store_sealed("dsvl:emb:v2:moved", &fingerprint, &ours, "dsvl:emb:v2:golden", &payload)?;
    let public = dsvl_core::EmbeddingSeal::public();
    store_sealed("dsvl:emb:v2:forged", &fingerprint, &public, "dsvl:emb:v2:forged", &payload)?;
    let mut nan = payload.clone();
    nan[400..404].copy_from_slice(&f32::NAN.to_le_bytes());
    store_sealed("dsvl:emb:v2:nan", &fingerprint, &ours, "dsvl:emb:v2:nan", &nan)?;
    let slot = |key: &str| ImageSlot {
        position: 54,
        embedding: Some(Source::Ref(EmbeddingRef {
            key: key.into(),
            shape: vec![576, 128],
            dtype: 1,
            model_fingerprint: fingerprint.clone(),
            stored_bytes: 0,
        })),
    };
    let prompt = ids(&lm["image.input_ids"])?;
    let mut c = d.client().await?;
    let (out, _) = generate(
        &mut c,
        GenerateRequest { images: vec![slot("dsvl:emb:v2:golden")], ..request(prompt.clone(), 16) },
    )
    .await?;
    assert_eq!(out, ids(&lm["image.generated_ids"])?);

    let missing = generate(
        &mut c,
        GenerateRequest { images: vec![slot("dsvl:emb:v2:gone")], ..request(prompt.clone(), 4) },
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
    assert!(missing.message().contains("re-encode"), "{}", missing.message());
    // The re-encode signal is typed (status details), not a convention on the code.
    assert!(dsvl_proto::convert::asks_to_reencode(&missing), "{missing:?}");
    let foreign = generate(
        &mut c,
        GenerateRequest { images: vec![slot("dsvl:emb:v2:foreign")], ..request(prompt.clone(), 4) },
    )
    .await
    .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::FailedPrecondition);
    assert!(foreign.message().contains("another model"), "{}", foreign.message());
    assert!(dsvl_proto::convert::asks_to_reencode(&foreign), "{foreign:?}");
    for (key, why) in [
        ("dsvl:emb:v2:moved", "seal mismatch"),
        ("dsvl:emb:v2:forged", "seal mismatch"),
        ("dsvl:emb:v2:nan", "not finite"),
    ] {
        let e = generate(
            &mut c,
            GenerateRequest { images: vec![slot(key)], ..request(prompt.clone(), 4) },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{key}: {e:?}");
        assert!(e.message().contains(why), "{key}: {}", e.message());
        assert!(dsvl_proto::convert::asks_to_reencode(&e), "{key}: repaired by re-encoding");
    }
    let corrupt = dsvl_testkit::metric_sum(
        &dsvl_testkit::http_get(&d.metrics, "/metrics")?,
        "dsvl_decoder_embedding_errors_total",
        &[("reason", "corrupt")],
    );
    assert!(corrupt >= 3.0, "counted: {corrupt}");
    // The same NaN inline is refused too, as a bad argument.
    let inline_nan = ImageSlot {
        position: 54,
        embedding: Some(Source::Inline(dsvl_proto::internal::Embedding {
            dtype: 1,
            shape: vec![576, 128],
            model_fingerprint: fingerprint.clone(),
            data: nan.clone().into(),
        })),
    };
    let e = generate(
        &mut c,
        GenerateRequest { images: vec![inline_nan], ..request(prompt.clone(), 4) },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not finite"), "{}", e.message());
    // A million image slots (a few MB on the wire) are refused from their count, before anything is sized by them.
    let t = std::time::Instant::now();
    let many = vec![ImageSlot { position: 54, embedding: None }; 1_000_000];
    let e = generate(&mut c, GenerateRequest { images: many, ..request(prompt.clone(), 4) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Ten million stop ids (10 MB on the wire, within the message limit) are refused from
    // their count.
    let t = std::time::Instant::now();
    let stops =
        GenerateRequest { stop_token_ids: vec![7; 10_000_000], ..request(prompt.clone(), 4) };
    let e = generate(&mut c, stops).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("stop_token_ids"), "{}", e.message());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let no_image = generate(&mut c, request(prompt, 4)).await.unwrap_err();
    assert_eq!(no_image.code(), tonic::Code::InvalidArgument);
    assert!(!dsvl_proto::convert::asks_to_reencode(&no_image));
    Ok(())
}

/// 16 concurrent streams give the same tokens as each alone; with a KV budget too small for
/// all of them, sequences are preempted (recomputed) and still give the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_and_preemption_keep_outputs() -> Result<()> {
    const NEW: u32 = 40;
    let ps = prompts(16);
    let d = Decoder::start(&["--kv-blocks", "4096"]).await?;
    let mut solo = Vec::new();
    for p in &ps {
        solo.push(generate(&mut d.client().await?, request(p.clone(), NEW)).await?.0);
    }
    let run_all = |d: &Decoder| {
        let grpc = d.grpc.clone();
        let ps = ps.clone();
        async move {
            let mut tasks = Vec::new();
            // Everyone connects first and then starts at once: with the tiny model a stream is
            // over in milliseconds, so staggered arrivals would rarely overlap (or preempt).
            let start = std::sync::Arc::new(tokio::sync::Barrier::new(ps.len()));
            for p in ps {
                let grpc = grpc.clone();
                let start = start.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c =
                        DecoderClient::connect(format!("http://{grpc}")).await.expect("connect");
                    start.wait().await;
                    generate(&mut c, request(p, NEW)).await
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task").map(|r| r.0));
            }
            out
        }
    };
    for (i, r) in run_all(&d).await.into_iter().enumerate() {
        assert_eq!(r?, solo[i], "stream {i} differs when batched");
    }
    drop(d);

    // 24 blocks x 16 = 384 token slots for 16 sequences of 21..126 + 40 tokens arriving
    // together: admission fills the blocks with prompts, and each running sequence then needs
    // two or three more blocks as it grows, so some must be preempted.
    let small = Decoder::start(&["--kv-blocks", "24", "--block-size", "16"]).await?;
    for (i, r) in run_all(&small).await.into_iter().enumerate() {
        assert_eq!(r?, solo[i], "stream {i} differs after preemption");
    }
    assert!(
        small.counter("dsvl_decoder_preemptions_total")? > 0.0,
        "the small cache never preempted"
    );
    Ok(())
}

/// vLLM's priority through the service: with one seat (`--max-num-seqs 1`), a request of a
/// lower priority value arriving while another runs takes its seat at once (the running one is
/// preempted and later recomputed); both stream exactly what they stream alone. Of equal
/// priority, the newcomer waits instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_important_request_takes_the_seat_of_a_running_one() -> Result<()> {
    let ps = prompts(2);
    let d = Decoder::start(&["--max-num-seqs", "1"]).await?;
    let long = |priority| GenerateRequest {
        stop_token_ids: Vec::new(),
        priority,
        ..request(ps[0].clone(), 800)
    };
    let short = |priority| GenerateRequest { priority, ..request(ps[1].clone(), 4) };
    let solo_long = generate(&mut d.client().await?, long(5)).await?.0;
    let solo_short = generate(&mut d.client().await?, short(0)).await?.0;
    assert_eq!(solo_long.len(), 800);
    for (late_priority, preemptions) in [(0, 1.0), (5, 0.0)] {
        let before = d.counter("dsvl_decoder_preemptions_total")?;
        // Connected before the long stream starts: the late request goes out at once.
        let mut late_client = d.client().await?;
        let mut running = d.client().await?.generate(long(5)).await?.into_inner();
        let mut got = Vec::new();
        // Running: its first token is out.
        while got.is_empty() {
            match running.message().await?.map(|m| m.event) {
                Some(Some(Event::Token(t))) => got.push(t.id),
                Some(_) => {}
                None => bail!("the long stream ended before its first token"),
            }
        }
        let late = generate(&mut late_client, short(late_priority)).await?.0;
        assert_eq!(late, solo_short, "priority {late_priority}");
        while let Some(m) = running.message().await? {
            if let Some(Event::Token(t)) = m.event {
                got.push(t.id);
            }
        }
        assert_eq!(got, solo_long, "the long stream, late priority {late_priority}");
        let preempted = d.counter("dsvl_decoder_preemptions_total")? - before;
        assert_eq!(preempted, preemptions, "late priority {late_priority}");
    }
    Ok(())
}

/// A client that goes away frees its KV blocks within a step; a too-long prompt is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_client_frees_blocks_and_long_prompt_is_refused() -> Result<()> {
    let d = Decoder::start(&[]).await?;
    let mut c = d.client().await?;
    let mut stream = c.generate(request(prompts(1)[0].clone(), 10_000)).await?.into_inner();
    for _ in 0..3 {
        stream.message().await?;
    }
    let used = c.load(LoadRequest {}).await?.into_inner().kv_blocks_used;
    assert!(used > 0);
    drop(stream);
    let t = Instant::now();
    loop {
        let l = c.load(LoadRequest {}).await?.into_inner();
        if l.kv_blocks_used == 0 && l.running == 0 {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(2), "blocks still held: {l:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let long = generate(&mut c, request(vec![5; 16_384], 1)).await.unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(long.message().contains("positions"), "{}", long.message());
    let bad_id = generate(&mut c, request(vec![5, 99_999], 1)).await.unwrap_err();
    assert_eq!(bad_id.code(), tonic::Code::InvalidArgument);
    Ok(())
}

/// Killing a worker rank mid-stream: every stream ends with UNAVAILABLE within 5 s, the leader
/// exits non-zero, and no rank process is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_worker_fails_the_group_fast() -> Result<()> {
    let mut d = Decoder::start(&["--tp", "2"]).await?;
    let workers = child_pids(d.proc.pid());
    assert_eq!(workers.len(), 1, "one worker rank process");
    // Health is watched from before the failure: the group must say NOT_SERVING before it goes.
    let mut health = HealthClient::new(d.channel().await?)
        .watch(HealthCheckRequest { service: "dsvl.internal.v1.Decoder".into() })
        .await?
        .into_inner();
    assert_eq!(health.message().await?.map(|m| m.status), Some(ServingStatus::Serving as i32));
    let mut streams = Vec::new();
    for p in prompts(3) {
        let mut s = d.client().await?.generate(request(p, 100_000)).await?.into_inner();
        s.message().await?;
        streams.push(s);
    }
    let t = Instant::now();
    std::process::Command::new("kill").args(["-9", &workers[0].to_string()]).status()?;
    for mut s in streams {
        let status = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => bail!("stream ended without an error"),
                Err(st) => break st,
            }
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "streams ended after {:?}", t.elapsed());
    let update = tokio::time::timeout(Duration::from_secs(5), health.message()).await?;
    assert_eq!(
        update?.map(|m| m.status),
        Some(ServingStatus::NotServing as i32),
        "health turned NOT_SERVING"
    );
    let exit = loop {
        if let Some(s) = d.proc.try_wait()? {
            break s;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "leader still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!exit.success(), "the leader must exit non-zero");
    assert!(workers.iter().all(|&w| !pid_alive(w)));
    Ok(())
}

/// SIGTERM while a stream runs: it completes, then the group exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_in_flight_streams_on_sigterm() -> Result<()> {
    let mut d = Decoder::start(&["--tp", "2"]).await?;
    let workers = child_pids(d.proc.pid());
    let mut c = d.client().await?;
    let mut s = c.generate(request(prompts(1)[0].clone(), 40)).await?.into_inner();
    s.message().await?;
    std::process::Command::new("kill").args(["-TERM", &d.proc.pid().to_string()]).status()?;
    let mut tokens = 1;
    let mut finished = false;
    while let Some(m) = s.message().await? {
        match m.event {
            Some(Event::Token(_)) => tokens += 1,
            Some(Event::Finish(_)) => finished = true,
            None => {}
        }
    }
    assert!(finished && tokens == 40, "the in-flight stream completed ({tokens} tokens)");
    let t = Instant::now();
    let exit = loop {
        if let Some(s) = d.proc.try_wait()? {
            break s;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "did not exit after draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(workers.iter().all(|&w| !pid_alive(w)), "worker ranks exited");
    Ok(())
}

/// One pod of a group started by an orchestrator: a `dsvl-decoder` process with its own flags
/// and environment (none inherited from the test's LeaderWorkerSet-like variables), killed when
/// dropped.
struct Pod {
    child: std::process::Child,
}

const GROUP_ENV: [&str; 5] =
    ["LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX", "DSVL_TP", "DSVL_RENDEZVOUS_PORT"];

impl Pod {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> Result<Self> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dsvl-decoder"));
        cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::inherit());
        for v in GROUP_ENV {
            cmd.env_remove(v);
        }
        cmd.env("DSVL_CLUSTER_SECRET_FILE", dsvl_testkit::cluster_secret_file());
        // Plain-text gRPC on loopback; the group itself is still authenticated by the secret.
        cmd.env("DSVL_INSECURE", "true");
        cmd.envs(env.iter().map(|(k, v)| (*k, v)));
        Ok(Self { child: cmd.spawn()? })
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Golden greedy ids from a group, and its reported TP degree.
async fn golden_from(grpc: &str) -> Result<()> {
    let (lm, _) = golden()?;
    let mut c = DecoderClient::new(channel(grpc).await?);
    let (out, _) = generate(&mut c, request(ids(&lm["text.input_ids"])?, 16)).await?;
    assert_eq!(out, ids(&lm["text.generated_ids"])?, "orchestrated TP 2 = dsvl generate");
    assert_eq!(c.load(LoadRequest {}).await?.into_inner().tensor_parallel, 2);
    Ok(())
}

/// TP 2 as a LeaderWorkerSet runs it, with flags: two pods started independently (the worker
/// pod first: it waits for the leader), `--nodes 2 --node-index 0|1 --leader-host
/// --rendezvous-port`. The leader pod starts no rank of its own, the group streams the golden
/// ids, and when the worker pod dies the leader pod exits non-zero (the group fails as a unit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_tp2_group_with_flags() -> Result<()> {
    let port = free_port().to_string();
    let grpc = format!("127.0.0.1:{}", free_port());
    let group =
        ["--tp", "2", "--nodes", "2", "--leader-host", "127.0.0.1", "--rendezvous-port", &port];
    let mut worker = Pod::spawn(&[&group[..], &["--node-index", "1"]].concat(), &[])?;
    let mut leader =
        Pod::spawn(&[&group[..], &["--node-index", "0", "--listen", &grpc]].concat(), &[])?;
    wait_serving(&grpc, Duration::from_secs(60)).await?;
    assert!(
        child_pids(leader.child.id()).is_empty(),
        "tp 2 over 2 nodes: the leader pod runs rank 0 only"
    );
    assert!(child_pids(worker.child.id()).is_empty(), "the worker pod runs rank 1 only");
    golden_from(&grpc).await?;

    worker.sigkill();
    let exit = exit_within(&mut leader.child, Duration::from_secs(10)).await?;
    assert!(!exit.success(), "the leader pod exits non-zero when its worker pod dies: {exit:?}");
    Ok(())
}

/// The same group configured only through the LeaderWorkerSet variables (`LWS_LEADER_ADDRESS`
/// as a host name, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`) plus `DSVL_TP` and
/// `DSVL_RENDEZVOUS_PORT`: it streams the golden ids, and when the leader pod dies the worker
/// pod exits non-zero instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_tp2_group_from_lws_env() -> Result<()> {
    let port = free_port().to_string();
    let grpc = format!("127.0.0.1:{}", free_port());
    let env = |index: &str| {
        vec![
            ("LWS_LEADER_ADDRESS", "localhost".to_string()),
            ("LWS_GROUP_SIZE", "2".to_string()),
            ("LWS_WORKER_INDEX", index.to_string()),
            ("DSVL_TP", "2".to_string()),
            ("DSVL_RENDEZVOUS_PORT", port.clone()),
        ]
    };
    let mut leader = Pod::spawn(&["--listen", &grpc], &env("0"))?;
    let mut worker = Pod::spawn(&[], &env("1"))?;
    wait_serving(&grpc, Duration::from_secs(60)).await?;
    assert!(
        child_pids(leader.child.id()).is_empty() && child_pids(worker.child.id()).is_empty(),
        "one rank per pod"
    );
    golden_from(&grpc).await?;

    leader.sigkill();
    let exit = exit_within(&mut worker.child, Duration::from_secs(10)).await?;
    assert!(!exit.success(), "the worker pod exits non-zero when its leader dies: {exit:?}");
    Ok(())
}

/// Deadline headers of absurd size are capped, garbage is INVALID_ARGUMENT; neither panics the
/// handler, and the same connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_deadline_headers_never_panic() -> Result<()> {
    let d = Decoder::start(&["--tp", "1"]).await?;
    let mut c = d.client().await?;
    let prompt = prompts(1).remove(0);
    for &(value, accepted) in dsvl_testkit::HOSTILE_GRPC_TIMEOUTS {
        let mut r = tonic::Request::new(request(prompt.clone(), 2));
        r.metadata_mut().insert("grpc-timeout", value.parse()?);
        match c.generate(r).await {
            Ok(stream) if accepted => {
                let mut stream = stream.into_inner();
                while stream.message().await?.is_some() {}
            }
            Err(s) if !accepted && s.code() == tonic::Code::InvalidArgument => {
                assert!(s.message().contains("grpc-timeout"), "{s:?}")
            }
            other => bail!("grpc-timeout {value:?}: unexpected {:?}", other.map(|_| "a stream")),
        }
        let (out, _) = generate(&mut c, request(prompt.clone(), 2)).await?;
        assert_eq!(out.len(), 2, "grpc-timeout {value:?}: the next request");
    }
    // Internal requests carry resolved values: a zero budget is refused, not defaulted.
    let zero = generate(&mut c, request(prompt, 0)).await.unwrap_err();
    assert_eq!(zero.code(), tonic::Code::InvalidArgument, "{zero:?}");
    assert!(zero.message().contains("max_new_tokens"), "{zero:?}");
    Ok(())
}

/// Fail closed: a shared cache or a group spanning nodes without the cluster secret is refused
/// at start-up (unless `--insecure`), and a worker pod holding another secret cannot join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_secret_is_required_and_checked() -> Result<()> {
    for flags in [&["--redis", "rediss://127.0.0.1:1"][..], &["--tp", "2", "--nodes", "2"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dsvl-decoder"))
            .args(flags)
            .env_remove("DSVL_CLUSTER_SECRET_FILE")
            .env_remove("DSVL_INSECURE")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} started without a secret");
        assert!(err.contains("cluster secret") && err.contains("--insecure"), "{flags:?}: {err}");
    }

    // A worker pod with another cluster secret proves nothing; it gives up with the reason.
    let other = tempfile::NamedTempFile::new()?;
    std::fs::write(other.path(), dsvl_core::ClusterSecret::random().to_file_contents())?;
    let port = free_port().to_string();
    let grpc = format!("127.0.0.1:{}", free_port());
    let group =
        ["--tp", "2", "--nodes", "2", "--leader-host", "127.0.0.1", "--rendezvous-port", &port];
    let _leader =
        Pod::spawn(&[&group[..], &["--node-index", "0", "--listen", &grpc]].concat(), &[])?;
    let mut stranger = std::process::Command::new(env!("CARGO_BIN_EXE_dsvl-decoder"))
        .args([&group[..], &["--node-index", "1"]].concat())
        .env("DSVL_CLUSTER_SECRET_FILE", other.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let exit = exit_within(&mut stranger, Duration::from_secs(30)).await?;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stranger.stderr.take().expect("piped"), &mut err)?;
    assert!(!exit.success());
    assert!(err.contains("same group key"), "{err}");
    // The leader is still waiting for its rank 1 (not serving, not dead).
    assert!(wait_serving(&grpc, Duration::from_millis(500)).await.is_err());
    Ok(())
}
