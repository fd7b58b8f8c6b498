//! `dsvl rank-worker` (hidden): one tensor-parallel rank started by a leader (`dsvl generate
//! --tp N`, the decoder service) or by an orchestrator. It joins the leader's rendezvous,
//! loads its shard and executes step plans until told to stop.

use anyhow::{Context, Result};
use clap::Args;
use dsvl_engine::group::{
    device_for, die_with_parent, kv_from_welcome, run_worker, with_kv_pool, GroupTimeouts,
    RankLaunch,
};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{DeepSeekLlm, Shard};
use dsvl_parallel::{GroupKey, GroupSpec};

use crate::model_args::ModelArgs;

/// Arguments of `dsvl rank-worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Leader's rendezvous address (host:port).
    #[arg(long)]
    leader: String,
    /// This rank (1..world-size).
    #[arg(long)]
    rank: usize,
    /// Rank on this node: the device is `--device` + this (`RankLaunch`'s convention).
    #[arg(long, default_value_t = 0)]
    local_rank: usize,
    /// Ranks in the group.
    #[arg(long)]
    world_size: usize,
    /// Group tag; must equal the leader's.
    #[arg(long)]
    tag: String,
    /// Exit when the parent process dies (set when a leader starts its local workers).
    #[arg(long)]
    die_with_parent: bool,
}

/// The launcher of `dsvl generate`'s local ranks (`dsvl rank-worker`).
pub fn rank_launch(
    model: &ModelArgs,
    leader: &str,
    world: usize,
    tag: &str,
    key: &GroupKey,
) -> Result<RankLaunch> {
    let mut extra =
        vec!["--tag".to_string(), tag.into(), "--dtype".into(), model.dtype.as_str().into()];
    if let Some(m) = &model.model {
        extra.extend(["--model".to_string(), m.to_string_lossy().into_owned()]);
    }
    Ok(RankLaunch {
        program: std::env::current_exe().context("cannot find the dsvl executable")?,
        mode: vec!["rank-worker".into()],
        leader: leader.into(),
        world,
        base_device: model.device,
        extra,
        key: Some(key.clone()),
    })
}

/// Runs one worker rank until the leader shuts the group down.
pub fn run(args: WorkerArgs) -> Result<()> {
    if args.die_with_parent {
        die_with_parent();
    }
    let ckpt = args.model.open()?;
    let spec =
        GroupSpec {
            world_size: args.world_size,
            rank: args.rank,
            leader_addr: args.leader.clone(),
            rendezvous_timeout: std::time::Duration::from_secs(120),
            collective_timeout: std::time::Duration::from_secs(60),
            tag: args.tag.clone(),
            key: Some(GroupKey::from_env()?.context(
                "rank-worker is started by `dsvl generate`, which hands it the group key",
            )?),
        };
    let device = open_device(device_for(args.model.device, args.local_rank))?;
    let dtype = candle_dtype(args.model.dtype);
    let shard = Shard { rank: args.rank, world: args.world_size };
    run_worker(&spec, GroupTimeouts::default(), &device, |extra| {
        let kv = kv_from_welcome(extra)?;
        with_kv_pool(DeepSeekLlm::load(&ckpt, dtype, &device, shard, None)?, kv)
    })
    .with_context(|| format!("rank {} of {}", args.rank, args.world_size))?;
    Ok(())
}
