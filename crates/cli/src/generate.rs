//! `dsvl generate`: a conversation in the reference's `CHAT.json` format to generated tokens,
//! through the same crates the services use (chat template, vision encoder, tensor-parallel
//! decoder). `--tp N` runs N rank processes on loopback.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use clap::Args;
use dsvl_chat::{render_prompt, IncrementalDecoder, Message, DEFAULT_SYSTEM_PROMPT};
use dsvl_checkpoint::{Fingerprint, ServedFacts, DEFAULT_IMAGE_TOKENS};
use dsvl_core::sampling::{SamplingParams, SamplingRequest};
use dsvl_core::ImageLimits;
use dsvl_engine::group::{group_tag, lead_group, with_kv_pool, GroupTimeouts, LocalWorkers};
use dsvl_engine::{generate, GenerationRequest};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{DeepSeekLlm, ImageRows, PagedKvConfig, Shard};
use dsvl_models::preprocess::{Preprocessed, Preprocessor};
use dsvl_models::vision::VisionEncoder;
use dsvl_parallel::{GroupKey, GroupSpec};

use crate::model_args::ModelArgs;
use crate::progress;
use crate::worker::rank_launch;

/// Token selection flags, shared with `dsvl chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Greedy decoding (the default unless --temperature > 0 is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k", "repetition_penalty", "seed"])]
    pub greedy: bool,
    /// Sampling temperature; > 0 switches to sampling.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (default 0: no limit).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Penalty on tokens already generated (1.0 = none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The flags as a request: like every API's (`dsvl_core::sampling`), except that the CLI
    /// is greedy unless `--temperature` is given, so its output is reproducible by default.
    pub fn request(&self) -> SamplingRequest {
        let temperature =
            if self.greedy { Some(0.0) } else { Some(self.temperature.unwrap_or(0.0)) };
        SamplingRequest {
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }

    /// The resolved parameters.
    ///
    /// # Errors
    /// A value out of range, naming its flag.
    pub fn params(&self) -> Result<SamplingParams> {
        self.request()
            .resolve()
            .map_err(|e| anyhow::anyhow!("invalid --{}: {e}", e.field.replace('_', "-")))
    }
}

/// Arguments of `dsvl generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Conversation: a JSON list of {"role": "User"|"Assistant", "content": "...", "images": [..]};
    /// image paths are relative to this file.
    #[arg(long)]
    chat: PathBuf,
    /// System prompt (default: the reference's; "" for none).
    #[arg(long)]
    system_prompt: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Tensor-parallel ranks (processes on this machine).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Prefill the prompt in chunks of at most this many tokens (default: in one step); the
    /// output is the same either way, as the decoder service's chunked prefill is.
    #[arg(long)]
    max_batched_tokens: Option<usize>,
    /// Print one JSON object {prompt_token_ids, generated_token_ids, text} instead of streaming.
    #[arg(long)]
    json: bool,
    /// Also write the prompt logits and every step's logits (f32) to this safetensors file;
    /// a debugging and parity aid.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

/// Reads `CHAT.json` and resolves image paths against its directory.
pub fn read_chat(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut messages: Vec<Message> = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a conversation", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for m in &mut messages {
        for img in &mut m.images {
            let p = base.join(&*img);
            *img = p.to_string_lossy().into_owned();
        }
    }
    Ok(messages)
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> Result<()> {
    ensure!(args.tp >= 1, "--tp must be at least 1");
    let params = args.sampling.params()?;
    let ckpt = args.model.open()?;
    let facts = ServedFacts::read(&ckpt, Fingerprint::Skip)?;
    // A text-only model gets no image tokens; images are refused when its tower is loaded.
    let n_image_tokens = facts.vision.as_ref().map_or(DEFAULT_IMAGE_TOKENS, |v| v.image_tokens);
    let (tok, llm_cfg) = (facts.tokenizer, facts.llm);
    llm_cfg.check_tensor_parallel(args.tp)?;

    let messages = read_chat(&args.chat)?;
    let system = args.system_prompt.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT);
    let prompt = tok.encode_prompt(&render_prompt(system, &messages)?, n_image_tokens)?;
    if prompt.ids.len() + 1 > llm_cfg.max_position_embeddings {
        bail!(
            "the prompt has {} tokens; the model takes at most {} positions",
            prompt.ids.len(),
            llm_cfg.max_position_embeddings
        );
    }

    let device = open_device(args.model.device)?;
    let dtype = candle_dtype(args.model.dtype);
    let images: Vec<&String> = messages.iter().flat_map(|m| &m.images).collect();
    let t_vision = Instant::now();
    let image = if images.is_empty() {
        None
    } else {
        let enc = progress::loading("vision tower", ckpt.weight_bytes(), |p| {
            VisionEncoder::load(&ckpt, dtype, &device, p)
        })?;
        ensure!(
            enc.hidden_size() == llm_cfg.hidden_size && enc.num_tokens() == n_image_tokens,
            "vision tower gives {}x{} embeddings but the language model takes {} wide, {} per image",
            enc.num_tokens(),
            enc.hidden_size(),
            llm_cfg.hidden_size,
            n_image_tokens
        );
        let pre = Preprocessor::new(enc.preprocess_config().clone(), ImageLimits::default());
        let pixels: Vec<Preprocessed> = images
            .iter()
            .map(|p| pre.preprocess_file(Path::new(p)).with_context(|| format!("image {p}")))
            .collect::<Result<_>>()?;
        let refs: Vec<&Preprocessed> = pixels.iter().collect();
        let emb = enc.forward(&enc.batch_pixels(&refs)?)?;
        let rows = emb.dims()[0] * emb.dims()[1];
        Some(ImageRows::for_image_tokens(
            &prompt.ids,
            tok.special().image,
            emb.reshape((rows, llm_cfg.hidden_size))?,
        )?)
    };
    let vision_s = t_vision.elapsed().as_secs_f64();

    // The group: rank 0 here, ranks 1.. as child processes on loopback.
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the rendezvous port")?;
    let addr = listener.local_addr()?.to_string();
    let tag = group_tag(&ckpt, args.model.dtype.as_str());
    let spec = GroupSpec {
        world_size: args.tp,
        rank: 0,
        leader_addr: addr.clone(),
        rendezvous_timeout: std::time::Duration::from_secs(120),
        collective_timeout: std::time::Duration::from_secs(60),
        tag: tag.clone(),
        key: Some(GroupKey::random()),
    };
    let key = spec.key.as_ref().expect("set above");
    let mut commands = rank_launch(&args.model, &addr, args.tp, &tag, key)?.commands(0, args.tp);
    for c in &mut commands {
        // The leader already said that the bundled model is used.
        c.env("DSVL_QUIET_BUNDLED", "1");
    }
    let mut workers =
        LocalWorkers::spawn(commands).context("cannot start the tensor-parallel workers")?;
    let t_load = Instant::now();
    let shard = Shard { rank: 0, world: args.tp };
    // A pool for this one sequence: the prompt, the new tokens and the slot of the last one.
    let kv = PagedKvConfig::for_tokens(
        prompt.ids.len() + args.max_new_tokens + 2,
        PagedKvConfig::DEFAULT_BLOCK_SIZE,
    );
    let mut runner = lead_group(
        &listener,
        &spec,
        GroupTimeouts::default(),
        serde_json::json!({ "kv": kv }),
        &device,
        || {
            let model = progress::loading("language model", ckpt.weight_bytes(), |p| {
                DeepSeekLlm::load(&ckpt, dtype, &device, shard, p)
            })?;
            with_kv_pool(model, kv)
        },
    )
    .context("cannot start the language model group")?;
    let load_s = t_load.elapsed().as_secs_f64();

    let req = GenerationRequest {
        prompt: prompt.ids.clone(),
        image,
        params,
        max_new_tokens: args.max_new_tokens,
        stop_ids: vec![tok.special().eos],
        keep_logits: args.logits_out.is_some(),
        max_batched_tokens: args.max_batched_tokens,
    };
    let mut decoder = IncrementalDecoder::new(true);
    let mut stdout = std::io::stdout().lock();
    let streaming = !args.json;
    let t_gen = Instant::now();
    let mut first_token_s = None;
    let result = generate(&mut runner, &req, &mut |id| {
        first_token_s.get_or_insert(t_gen.elapsed().as_secs_f64());
        if streaming {
            if let Ok(Some(piece)) = decoder.push(&tok, id) {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        }
        true
    });
    runner.shutdown();
    workers.wait_or_kill(std::time::Duration::from_secs(5));
    let out = result?;
    let gen_s = t_gen.elapsed().as_secs_f64();

    if let Some(path) = &args.logits_out {
        let mut tensors = std::collections::HashMap::new();
        if let Some(p) = &out.prompt_logits {
            tensors.insert("prompt_logits".to_string(), p.clone());
        }
        if !out.step_logits.is_empty() {
            tensors.insert(
                "step_logits".to_string(),
                Tensor::new(out.step_logits.clone(), &candle_core::Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let text = tok.decode(&out.tokens, true)?;
    if args.json {
        let obj = serde_json::json!({"prompt_token_ids": prompt.ids, "generated_token_ids": out.tokens, "text": text});
        writeln!(stdout, "{obj}")?;
    } else {
        if let Some(rest) = decoder.finish(&tok)? {
            stdout.write_all(rest.as_bytes())?;
        }
        writeln!(stdout)?;
        eprintln!(
            "{} prompt tokens ({} images), {} new tokens ({:?}); vision {vision_s:.2}s, load {load_s:.2}s, first token {:.3}s, {:.1} tokens/s",
            prompt.ids.len(),
            images.len(),
            out.tokens.len(),
            out.finish,
            first_token_s.unwrap_or(0.0),
            out.tokens.len() as f64 / gen_s.max(1e-9)
        );
    }
    Ok(())
}
