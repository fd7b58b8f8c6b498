//! `dsvl rank-worker` (hidden): one tensor-parallel rank started by a leader (`dsvl generate
//! --tp N`, the decoder service) or by an orchestrator. It joins the leader's rendezvous,
//! loads its shard and executes step plans until told to stop.

use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;
use dsvl_engine::group::{contiguous_kv, die_with_parent, run_worker, GroupTimeouts};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{DeepSeekLlm, Shard};
use dsvl_parallel::GroupSpec;

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

/// The command line that starts rank `rank` of a local group.
pub fn worker_command(
    model: &ModelArgs,
    leader: &str,
    rank: usize,
    world: usize,
    tag: &str,
) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the dsvl executable")?;
    let mut c = Command::new(exe);
    c.arg("rank-worker").args([
        "--leader",
        leader,
        "--rank",
        &rank.to_string(),
        "--world-size",
        &world.to_string(),
        "--tag",
        tag,
    ]);
    c.arg("--die-with-parent");
    if let Some(m) = &model.model {
        c.arg("--model").arg(m);
    }
    c.args(["--dtype", model.dtype.as_str()]);
    let device = match model.device {
        dsvl_core::DeviceSpec::Cpu => "cpu".to_string(),
        dsvl_core::DeviceSpec::Cuda(n) => format!("cuda:{}", n + rank),
    };
    c.args(["--device", &device]);
    c.env("DSVL_QUIET_BUNDLED", "1");
    Ok(c)
}

/// Runs one worker rank until the leader shuts the group down.
pub fn run(args: WorkerArgs) -> Result<()> {
    if args.die_with_parent {
        die_with_parent();
    }
    let ckpt = args.model.open()?;
    let spec = GroupSpec {
        world_size: args.world_size,
        rank: args.rank,
        leader_addr: args.leader.clone(),
        rendezvous_timeout: std::time::Duration::from_secs(120),
        collective_timeout: std::time::Duration::from_secs(60),
        tag: args.tag.clone(),
    };
    let device = open_device(args.model.device)?;
    let dtype = candle_dtype(args.model.dtype);
    let shard = Shard { rank: args.rank, world: args.world_size };
    run_worker(&spec, GroupTimeouts::default(), &device, |_| {
        contiguous_kv(DeepSeekLlm::load(&ckpt, dtype, &device, shard, None)?)
    })
    .with_context(|| format!("rank {} of {}", args.rank, args.world_size))?;
    Ok(())
}
