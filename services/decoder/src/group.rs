//! Starting this process's part of the group: the leader (rank 0) binds the rendezvous,
//! starts its node's other ranks as children, loads its shard and the paged KV pool, and waits
//! for every rank; a worker rank joins, loads, and executes plans. Under a LeaderWorkerSet the
//! ranks of a group are split over `nodes` pods: each pod runs `tp / nodes` ranks, pod 0 holds
//! rank 0.

use dsvl_engine::constraint::ConstraintCompiler;
use std::net::TcpListener;
use std::process::Command;

use dsvl_checkpoint::{Fingerprint, ServedFacts};
use dsvl_core::ClusterSecret;
use dsvl_engine::blocks::BlockManager;
use dsvl_engine::group::{
    device_for, die_with_parent, group_tag, kv_from_welcome, lead_group, run_worker, with_kv_pool,
    GroupTimeouts, LocalWorkers, RankLaunch,
};
use dsvl_engine::scheduler::{Scheduler, SchedulerConfig};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{
    kv_bytes_per_token, kv_heads_per_rank, DeepSeekLlm, LlmConfig, PagedKvConfig, SeqChunk, Shard,
    ShardRunner, StepPlan,
};
use dsvl_models::ModelError;
use dsvl_parallel::{GroupKey, GroupSpec};

use crate::config::{Args, DecoderConfig, KvSizing};

/// What the service needs to know about the model it serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Vocabulary rows.
    pub vocab_size: usize,
    /// Position limit.
    pub max_positions: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Image token id and the expected vision fingerprint (DeepSeek-VL); `None` for text-only.
    pub vision: Option<(u32, String)>,
    /// Tokens per image.
    pub image_tokens: usize,
    /// Tensor-parallel degree.
    pub tp: usize,
    /// The model's working dtype: image rows are handed to the ranks in it.
    pub dtype: candle_core::DType,
    /// Tokens per KV block (the granularity of prefix-cache hashes).
    pub block_size: usize,
    /// Compiles requests' grammars (structured outputs) for this tokenizer and vocabulary.
    pub constraints: ConstraintCompiler,
}

fn source(model: &Option<std::path::PathBuf>) -> ModelSource {
    model.clone().map_or(ModelSource::Bundled, ModelSource::Dir)
}

fn spec(
    world: usize,
    rank: usize,
    leader: String,
    tag: String,
    cfg_timeout: std::time::Duration,
    key: Option<GroupKey>,
) -> GroupSpec {
    GroupSpec {
        world_size: world,
        rank,
        leader_addr: leader,
        rendezvous_timeout: std::time::Duration::from_secs(600),
        collective_timeout: cfg_timeout,
        tag,
        key,
    }
}

/// The key of this process's group: from the cluster secret (every node of a multi-node
/// group holds it); for a group on one node without one, a throwaway key the leader hands to
/// the ranks it starts; `None` (unauthenticated) only for a multi-node group under
/// `--insecure`.
fn group_key(secret: Option<&ClusterSecret>, nodes: usize) -> Option<GroupKey> {
    match secret {
        Some(s) => Some(GroupKey::from_secret(s)),
        None if nodes == 1 => Some(GroupKey::random()),
        None => {
            tracing::warn!("--insecure: the tensor-parallel rendezvous accepts any rank that connects, and the NCCL id travels in the clear");
            None
        }
    }
}

/// The KV pool geometry every rank allocates: `--kv-blocks`, or what fits in the byte budget,
/// never more than `max_num_seqs` sequences of the model's full length could use.
pub fn kv_geometry(cfg: &DecoderConfig, llm: &LlmConfig) -> Result<PagedKvConfig, ModelError> {
    let geometry = match cfg.kv {
        KvSizing::Blocks(n) => PagedKvConfig { num_blocks: n, block_size: cfg.block_size },
        KvSizing::Bytes(bytes) => {
            let per_token = kv_bytes_per_token(
                llm.num_layers,
                kv_heads_per_rank(llm, cfg.tp),
                llm.head_dim,
                candle_dtype(cfg.dtype),
            );
            let fit = PagedKvConfig::for_bytes(bytes, per_token, cfg.block_size);
            let useful = PagedKvConfig::for_tokens(
                cfg.max_num_seqs * llm.max_position_embeddings,
                cfg.block_size,
            );
            if fit.num_blocks < useful.num_blocks {
                fit
            } else {
                useful
            }
        }
    };
    if geometry.num_blocks == 0 {
        return Err(ModelError::InvalidInput(format!(
            "a KV budget of {:?} holds no block of {} tokens",
            cfg.kv, cfg.block_size
        )));
    }
    Ok(geometry)
}

/// Commands starting this node's other ranks (`first_rank+1 .. first_rank+local`).
fn local_worker_commands(
    args: &Args,
    leader: &str,
    first_rank: usize,
    local: usize,
    key: Option<GroupKey>,
) -> Result<Vec<Command>, ModelError> {
    let mut extra = vec![
        "--nodes".to_string(),
        args.nodes.to_string(),
        "--node-index".into(),
        args.node_index.to_string(),
        "--dtype".into(),
        args.dtype.as_str().into(),
        "--collective-timeout-secs".into(),
        args.collective_timeout_secs.to_string(),
        "--log-format".into(),
        args.logs.log_format.as_str().into(),
    ];
    if let Some(m) = &args.model {
        extra.extend(["--model".to_string(), m.to_string_lossy().into_owned()]);
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        extra.extend(["--otlp-endpoint".to_string(), endpoint.clone()]);
    }
    let launch = RankLaunch {
        program: std::env::current_exe().map_err(|e| ModelError::io("current executable", e))?,
        mode: vec!["--worker".into()],
        leader: leader.into(),
        world: args.tp,
        base_device: args.device,
        extra,
        key,
    };
    Ok(launch.commands(first_rank, local))
}

/// Leader: everything the engine thread owns. Runs on that thread (the communicator must not
/// leave it). Also runs one warm-up step through every rank.
pub fn build_leader(
    args: &Args,
    cfg: &DecoderConfig,
) -> Result<(ShardRunner, Scheduler, LocalWorkers, ModelInfo), ModelError> {
    let ckpt = Checkpoint::open(&source(&cfg.model))?;
    let dtype = candle_dtype(cfg.dtype);
    let device = open_device(cfg.device)?;
    let listener = TcpListener::bind(&cfg.rendezvous_bind)
        .map_err(|e| ModelError::io(cfg.rendezvous_bind.clone(), e))?;
    let local_addr = listener.local_addr().map_err(|e| ModelError::io("rendezvous", e))?;
    let leader = if cfg.nodes == 1 {
        local_addr.to_string()
    } else {
        format!("{}:{}", args.leader_host, local_addr.port())
    };
    let tag = group_tag(&ckpt, cfg.dtype.as_str());
    let local = cfg.tp / cfg.nodes;
    let key = if cfg.tp > 1 { group_key(cfg.secret.as_ref(), cfg.nodes) } else { None };
    let mut workers =
        LocalWorkers::spawn(local_worker_commands(args, &leader, 0, local, key.clone())?)
            .map_err(|e| ModelError::io("worker ranks", e))?;
    let kv = kv_geometry(cfg, &LlmConfig::from_checkpoint(&ckpt)?)?;
    tracing::info!(
        blocks = kv.num_blocks,
        block_size = kv.block_size,
        tokens = kv.tokens(),
        "KV cache per rank"
    );
    metrics::gauge!("dsvl_decoder_kv_cache_tokens").set(kv.tokens() as f64);
    let timeouts = GroupTimeouts { collective: cfg.collective_timeout, ..GroupTimeouts::default() };
    let spec = spec(cfg.tp, 0, leader, tag, cfg.collective_timeout, key);
    let mut runner =
        lead_group(&listener, &spec, timeouts, serde_json::json!({ "kv": kv }), &device, || {
            let shard = Shard { rank: 0, world: cfg.tp };
            let model = dsvl_telemetry::progress::loading("loading language model", |p| {
                DeepSeekLlm::load(&ckpt, dtype, &device, shard, Some(p))
            })?;
            with_kv_pool(model, kv)
        })?;
    if let Some(dead) = workers.exited() {
        return Err(ModelError::GroupFailed(dead));
    }
    // Warm-up through every rank at the largest step the budget allows (the peak of the
    // activations), then freed.
    let max_positions = runner.model().config().max_position_embeddings;
    let n = cfg.max_batched_tokens.min(kv.tokens()).min(max_positions);
    let warm = StepPlan {
        chunks: vec![SeqChunk {
            seq: u64::MAX,
            tokens: vec![0; n],
            start: 0,
            blocks: (0..n.div_ceil(kv.block_size) as u32).collect(),
            ..SeqChunk::default()
        }],
        ..StepPlan::default()
    };
    runner.lead_step(&warm)?;
    runner.lead_step(&StepPlan { free: vec![u64::MAX], ..StepPlan::default() })?;

    let c = runner.model().config().clone();
    // The served facts, the same reader as the gateway's and the CLI's; the fingerprint is
    // what embeddings are checked against.
    let facts = ServedFacts::read(&ckpt, Fingerprint::Compute)?;
    let vision = facts
        .vision
        .as_ref()
        .map(|v| (v.image_token_id, v.fingerprint.clone().unwrap_or_default()));
    let info = ModelInfo {
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        hidden_size: c.hidden_size,
        vision,
        image_tokens: facts.image_tokens(),
        tp: cfg.tp,
        dtype,
        block_size: kv.block_size,
        constraints: ConstraintCompiler::from_tokenizer_json(
            &ckpt.read_file("tokenizer.json")?.unwrap_or_default(),
            c.vocab_size,
            facts.tokenizer.special().eos,
        )
        .map_err(|e| ModelError::InvalidInput(e.to_string()))?,
    };
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_batched_tokens: cfg.max_batched_tokens,
            max_step_stretch: cfg.max_step_stretch,
            max_positions: c.max_position_embeddings,
        },
        BlockManager::new(kv.num_blocks, kv.block_size).with_prefix_cache(cfg.prefix_cache),
    );
    Ok((runner, sched, workers, info))
}

/// A worker process: `--worker` (one rank started by its node's first process) or a
/// non-leader node (its first rank, which starts the node's other ranks).
pub fn run_worker_process(args: &Args) -> Result<(), ModelError> {
    if args.die_with_parent {
        die_with_parent();
    }
    let local = args.tp / args.nodes.max(1);
    let (rank, leader) = if args.worker {
        (
            args.rank,
            args.leader
                .clone()
                .ok_or_else(|| ModelError::InvalidInput("--worker needs --leader".into()))?,
        )
    } else {
        (args.node_index * local, format!("{}:{}", args.leader_host, args.rendezvous_port))
    };
    // A rank started by its node's first process has the key in its environment; a node's
    // first process derives it from the cluster secret.
    let key = match GroupKey::from_env().map_err(|e| ModelError::InvalidInput(e.to_string()))? {
        Some(k) => Some(k),
        None => {
            let secret = dsvl_core::secret::cluster_secret(
                args.cluster_secret_file.as_deref(),
                args.insecure,
                Some("a rank of a group spanning nodes"),
            )
            .map_err(|e| ModelError::InvalidInput(e.to_string()))?;
            group_key(secret.as_ref(), args.nodes)
        }
    };
    let _children = if args.worker {
        LocalWorkers::default()
    } else {
        LocalWorkers::spawn(local_worker_commands(args, &leader, rank, local, key.clone())?)
            .map_err(|e| ModelError::io("worker ranks", e))?
    };
    let ckpt = Checkpoint::open(&source(&args.model))?;
    // The one device convention (`RankLaunch`): base device + local rank.
    let local_rank = if args.worker { args.local_rank } else { 0 };
    let device = open_device(device_for(args.device, local_rank))?;
    let dtype = candle_dtype(args.dtype);
    let timeout = std::time::Duration::from_secs(args.collective_timeout_secs.max(1));
    let spec = spec(args.tp, rank, leader, group_tag(&ckpt, args.dtype.as_str()), timeout, key);
    let timeouts = GroupTimeouts { collective: timeout, ..GroupTimeouts::default() };
    run_worker(&spec, timeouts, &device, |extra| {
        let kv = kv_from_welcome(extra)?;
        let what = format!("rank {rank}: loading language model");
        let model = dsvl_telemetry::progress::loading_logged(&what, |p| {
            DeepSeekLlm::load(&ckpt, dtype, &device, Shard { rank, world: args.tp }, Some(p))
        })?;
        with_kv_pool(model, kv)
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Rank r of a node uses the node's base device + its local rank, counted once: the
    /// commands carry the base device and the local rank, and the worker adds them.
    #[test]
    fn local_ranks_get_consecutive_devices() {
        let args = Args::parse_from([
            "dsvl-decoder",
            "--tp",
            "8",
            "--nodes",
            "2",
            "--node-index",
            "1",
            "--device",
            "cuda:0",
        ]);
        let cmds = local_worker_commands(&args, "leader:29500", 4, 4, None).expect("commands");
        assert_eq!(cmds.len(), 3);
        for (i, cmd) in cmds.iter().enumerate() {
            // The worker parses its own command line with the service's flags.
            let argv: Vec<String> = std::iter::once("dsvl-decoder".to_string())
                .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
                .collect();
            let worker = Args::parse_from(argv);
            assert!(worker.worker && worker.die_with_parent);
            assert_eq!((worker.rank, worker.tp), (5 + i, 8));
            assert_eq!(
                device_for(worker.device, worker.local_rank),
                dsvl_core::DeviceSpec::Cuda(1 + i),
                "rank {}",
                worker.rank
            );
        }
    }
}
