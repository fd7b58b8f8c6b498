//! Prefix caching through the real `dsvl-decoder` at TP 2 (rank processes): text, image
//! (inline embedding) and multi-turn requests answered with the cache on give the same greedy
//! tokens, and log-probabilities within the golden logits tolerance, as a group started with
//! `--no-prefix-cache`; the golden prompts give the golden ids from a warm cache; the cached
//! count reaches the client on the first token and in the usage; another tenant's salt never
//! hits; `Load` and the metrics account for queried, hit and cached blocks, and used blocks
//! return to zero when every request has ended.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::generate_response::Event;
use dsvl_proto::internal::image_slot::Embedding as Source;
use dsvl_proto::internal::{Embedding, GenerateRequest, ImageSlot, LoadRequest, LoadResponse};
use dsvl_testkit::{free_port, golden_dir, http_get, metric_sum, ServiceProcess};
use tonic::transport::Channel;

/// The golden logits tolerance (tests/fixtures/golden/README.md); a log-probability is a logit
/// minus a log-sum-exp, so it moves by at most twice that.
const LOGPROB_ATOL: f32 = 2e-3;

struct Decoder {
    _proc: ServiceProcess,
    grpc: String,
    metrics: String,
}

impl Decoder {
    async fn start(extra: &[&str]) -> Result<Self> {
        let (grpc, metrics) =
            (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let mut args = vec![
            "--listen".to_string(),
            grpc.clone(),
            "--metrics-listen".into(),
            metrics.clone(),
            "--tp".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--insecure".into()); // plain-text gRPC on loopback, on purpose
        let proc = ServiceProcess::spawn(env!("CARGO_BIN_EXE_dsvl-decoder"), &args)?;
        let me = Self { _proc: proc, grpc, metrics };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !me.load().await.is_ok_and(|l| l.ready) {
            anyhow::ensure!(Instant::now() < deadline, "decoder never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(me)
    }

    async fn client(&self) -> Result<DecoderClient<Channel>> {
        Ok(DecoderClient::connect(format!("http://{}", self.grpc)).await?)
    }

    async fn load(&self) -> Result<LoadResponse> {
        Ok(self.client().await?.load(LoadRequest {}).await?.into_inner())
    }

    /// Greedy tokens, their log-probabilities, and the cached count (first token, usage).
    async fn answer(&self, req: GenerateRequest) -> Result<Answer> {
        let mut stream = self.client().await?.generate(req).await?.into_inner();
        let mut a = Answer::default();
        while let Some(msg) = stream.message().await? {
            match msg.event {
                Some(Event::Token(t)) => {
                    if t.index == 0 {
                        a.first_cached = t.cached_tokens;
                    }
                    a.tokens.push(t.id);
                    a.logprobs.push(t.logprob);
                }
                Some(Event::Finish(f)) => {
                    let usage = f.usage.unwrap_or_default();
                    assert_eq!(usage.cached_tokens, a.first_cached, "first token and usage");
                    a.cached = usage.cached_tokens;
                    return Ok(a);
                }
                None => {}
            }
        }
        bail!("no finish message")
    }
}

#[derive(Debug, Default)]
struct Answer {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    first_cached: u32,
    cached: u32,
}

fn same_answer(what: &str, a: &Answer, b: &Answer) {
    assert_eq!(a.tokens, b.tokens, "{what}: greedy tokens");
    for (i, (x, y)) in a.logprobs.iter().zip(&b.logprobs).enumerate() {
        assert!((x - y).abs() <= LOGPROB_ATOL, "{what}: token {i} logprob {x} vs {y}");
    }
}

fn golden() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?)
}

fn ids(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
}

fn request(prompt: Vec<u32>, max_new: u32, salt: &[u8]) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: prompt,
        max_new_tokens: max_new,
        stop_token_ids: vec![1001],
        sampling: Some((&dsvl_core::SamplingParams::greedy()).into()),
        logprobs: true,
        cache_salt: salt.to_vec().into(),
        ..Default::default()
    }
}

/// The golden image prompt's embedding (golden pixels through the vision encoder), inline.
fn image_slot() -> Result<ImageSlot> {
    use dsvl_models::checkpoint::{Checkpoint, ModelSource};
    let ckpt = Checkpoint::open(&ModelSource::Bundled)?;
    let fingerprint = dsvl_checkpoint::vision_fingerprint(&ckpt)?;
    let enc = dsvl_models::vision::VisionEncoder::load(&ckpt, DType::F32, &Device::Cpu, None)?;
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let u8s = pre["photo_jpeg.pixel_values_u8"].flatten_all()?.to_dtype(DType::U32)?;
    let pixels = pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?;
    let emb = enc.forward(&pixels)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(ImageSlot {
        position: 54,
        embedding: Some(Source::Inline(Embedding {
            shape: vec![576, 128],
            dtype: 1,
            data: emb.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
            model_fingerprint: fingerprint,
        })),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp2_answers_the_same_with_and_without_the_prefix_cache() -> Result<()> {
    let lm = golden()?;
    let text = ids(&lm["text.input_ids"])?;
    let image_prompt = ids(&lm["image.input_ids"])?;
    let slot = image_slot()?;
    let image = |salt: &[u8]| GenerateRequest {
        images: vec![slot.clone()],
        ..request(image_prompt.clone(), 16, salt)
    };

    let on = Decoder::start(&[]).await?;
    let off = Decoder::start(&["--no-prefix-cache"]).await?;
    // Cold, then warm: golden ids, the warm one from whole cached blocks (32 tokens each).
    // Each case under its own tenant (both prompts start with the same system prompt).
    for (what, req, golden, len) in [
        ("text", request(text.clone(), 16, b"a"), "text.generated_ids", text.len()),
        ("image", image(b"i"), "image.generated_ids", image_prompt.len()),
    ] {
        let cold = on.answer(req.clone()).await?;
        let warm = on.answer(req.clone()).await?;
        let reference = off.answer(req).await?;
        assert_eq!(cold.tokens, ids(&lm[golden])?, "{what}: golden ids, cold");
        assert_eq!(warm.tokens, ids(&lm[golden])?, "{what}: golden ids from a warm cache");
        assert_eq!((cold.cached, warm.cached), (0, ((len - 1) / 32 * 32) as u32), "{what}");
        assert_eq!(reference.cached, 0, "{what}: --no-prefix-cache");
        same_answer(&format!("{what}: warm cache vs no cache"), &warm, &reference);
    }
    // Another tenant asking the same never hits the first tenant's blocks.
    assert_eq!(on.answer(image(b"b")).await?.cached, 0, "another tenant's salt");

    // A second turn: the first prompt, its answer, a new message.
    let first = on.answer(request(text.clone(), 24, b"a")).await?;
    let mut turn2 = text.clone();
    turn2.extend(&first.tokens);
    turn2.extend([400, 401, 402, 403, 404, 405, 406]);
    let warm = on.answer(request(turn2.clone(), 12, b"a")).await?;
    let reference = off.answer(request(turn2, 12, b"a")).await?;
    let computed = (text.len() + first.tokens.len() - 1) as u32;
    assert_eq!(warm.cached, computed / 32 * 32, "turn 2 reuses turn 1's whole blocks");
    same_answer("turn 2: cache vs no cache", &warm, &reference);

    // Accounting: nothing held, the finished blocks cached, the lookups counted.
    let load = on.load().await?;
    assert_eq!(load.kv_blocks_used, 0, "{load:?}");
    assert!(load.kv_blocks_cached > 0, "{load:?}");
    assert_eq!(load.kv_block_size, 32);
    assert!(load.prefix_cache_hit_tokens > 0);
    assert!(load.prefix_cache_queried_tokens > load.prefix_cache_hit_tokens);
    let metrics = http_get(&on.metrics, "/metrics")?;
    assert_eq!(
        metric_sum(&metrics, "dsvl_decoder_prefix_cache_hits_total", &[]),
        load.prefix_cache_hit_tokens as f64
    );
    assert_eq!(
        metric_sum(&metrics, "dsvl_decoder_prefix_cache_queries_total", &[]),
        load.prefix_cache_queried_tokens as f64
    );
    assert!(metric_sum(&metrics, "dsvl_decoder_prefix_cache_blocks", &[]) > 0.0);
    let off_load = off.load().await?;
    assert_eq!((off_load.kv_blocks_used, off_load.kv_blocks_cached), (0, 0));
    Ok(())
}
