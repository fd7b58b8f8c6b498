//! A long image prompt arriving while other streams decode: with chunked prefill at the default
//! step budget the running streams keep their pace (each step's wall time, which is their
//! inter-token gap, stays within 2x of the decode-only step), while prefilling the prompt in one
//! step stalls them (the counterfactual, so the test can tell the two apart).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_engine::blocks::BlockManager;
use dsvl_engine::scheduler::{
    Event, NewRequest, Scheduler, SchedulerConfig, DEFAULT_MAX_BATCHED_TOKENS_CPU,
    DEFAULT_MAX_STEP_STRETCH_CPU,
};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::llm::{DeepSeekLlm, ImageRows, PagedKvConfig, Shard, ShardRunner};
use dsvl_parallel::LinkSet;
use dsvl_testkit::tiny_model_dir;
use tokio::sync::mpsc::UnboundedReceiver;

const IMAGE_TOKEN: u32 = 100;
const IMAGES: usize = 2;
/// The running streams' prompts: long enough that their own context barely grows (relative)
/// during the image prompt's prefill, so their decode cost stays comparable.
const STREAM_PROMPT: usize = 768;

fn request(
    prompt: Vec<u32>,
    image: Option<ImageRows>,
    max_new: usize,
) -> (NewRequest, UnboundedReceiver<Event>) {
    NewRequest::greedy(prompt, image, max_new)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Step times (seconds): the median of decode-only steps of 4 streams, and the 90th percentile
/// of the steps while a prompt of two images (1,152 image rows) plus text is prefilled.
fn gaps(budget: usize, stretch: Option<f64>) -> Result<(f64, f64, usize)> {
    let ckpt = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let model = DeepSeekLlm::load(&ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let hidden = model.config().hidden_size;
    let kv = PagedKvConfig::for_tokens(8192, PagedKvConfig::DEFAULT_BLOCK_SIZE);
    let pool = model.kv_pool(kv)?;
    let mut runner =
        ShardRunner::new(model, pool, Arc::new(LinkSet::Single), Duration::from_secs(60));
    let cfg = SchedulerConfig {
        max_num_seqs: 16,
        max_batched_tokens: budget,
        max_positions: 16384,
        max_step_stretch: stretch,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(kv.num_blocks, kv.block_size));
    let mut streams = Vec::new();
    for i in 0..4u32 {
        let prompt = (0..STREAM_PROMPT as u32).map(|j| (i * 31 + j * 7) % 90 + 1).collect();
        let (req, rx) = request(prompt, None, 2000);
        sched.add(req);
        streams.push(rx);
    }
    let drain = |streams: &mut Vec<UnboundedReceiver<Event>>| -> Result<Vec<usize>> {
        streams
            .iter_mut()
            .map(|rx| {
                let mut tokens = 0;
                while let Ok(ev) = rx.try_recv() {
                    ensure!(!matches!(ev, Event::Failed(_)), "a running stream failed: {ev:?}");
                    tokens += usize::from(matches!(ev, Event::Token { .. }));
                }
                Ok(tokens)
            })
            .collect()
    };
    // Until every stream decodes, then the decode-only pace.
    let mut started = [false; 4];
    for _ in 0..1000 {
        sched.step(&mut runner)?;
        for (s, n) in started.iter_mut().zip(drain(&mut streams)?) {
            *s |= n > 0;
        }
        if started.iter().all(|&s| s) {
            break;
        }
    }
    ensure!(started.iter().all(|&s| s), "the streams never all started");
    let mut decode_only = Vec::new();
    for _ in 0..40 {
        let t = Instant::now();
        sched.step(&mut runner)?;
        decode_only.push(t.elapsed().as_secs_f64());
    }
    drain(&mut streams)?;
    // The image prompt: text, two images' placeholder runs, text.
    let mut prompt: Vec<u32> = (0..40).map(|j| j % 90 + 1).collect();
    for _ in 0..IMAGES {
        prompt.extend(std::iter::repeat_n(IMAGE_TOKEN, 576));
        prompt.extend((0..20).map(|j| j % 90 + 1));
    }
    let rows = Tensor::randn(0f32, 1.0, (IMAGES * 576, hidden), &Device::Cpu)?;
    let image = ImageRows::for_image_tokens(&prompt, IMAGE_TOKEN, rows)?;
    let (req, mut long) = request(prompt, Some(image), 1);
    sched.add(req);
    let (mut during, mut steps) = (Vec::new(), 0);
    loop {
        let t = Instant::now();
        sched.step(&mut runner)?;
        during.push(t.elapsed().as_secs_f64());
        steps += 1;
        if let Ok(Event::Token { .. }) = long.try_recv() {
            break;
        }
        ensure!(steps < 10_000, "the image prompt never got its first token");
    }
    for tokens in drain(&mut streams)? {
        ensure!(tokens == steps, "a running stream got {tokens} tokens in {steps} steps");
    }
    // The 90th percentile: the pace holds for the prefill as a whole; a lone outlier (the
    // first, probing chunk, or the machine's noise) is reported, not judged.
    let worst = during.iter().copied().fold(0f64, f64::max);
    println!("  worst single step {:.2} ms", worst * 1e3);
    let p90 = {
        let mut d = during.clone();
        d.sort_by(f64::total_cmp);
        d[(d.len() - 1) * 9 / 10]
    };
    Ok((median(decode_only), p90, steps))
}

#[test]
fn a_long_image_prompt_does_not_stall_running_streams() -> Result<()> {
    let (usual, during, steps) =
        gaps(DEFAULT_MAX_BATCHED_TOKENS_CPU, Some(DEFAULT_MAX_STEP_STRETCH_CPU))?;
    println!(
        "CPU defaults: decode-only step {:.2} ms, p90 step during the prefill {:.2} ms \
         ({steps} steps)",
        usual * 1e3,
        during * 1e3
    );
    let (usual_whole, whole, _) = gaps(usize::MAX, None)?;
    println!(
        "one-step prefill: decode-only step {:.2} ms, the prefill step {:.2} ms",
        usual_whole * 1e3,
        whole * 1e3
    );
    assert!(
        whole > 2.0 * usual_whole,
        "the counterfactual does not stall: the test proves nothing"
    );
    assert!(
        during <= 2.0 * usual,
        "running streams stalled: {:.2} ms gap vs {:.2} ms usual",
        during * 1e3,
        usual * 1e3
    );
    Ok(())
}
