//! Choosing a group's collective backend.
//!
//! Every group forms over the same TCP rendezvous and runs the same step protocol on its control
//! links; only the collectives differ:
//!
//! * one rank: [`SingleRank`] (no communication at all);
//! * ranks on CPUs, or on GPUs in a build without the `nccl` feature: [`TcpCommunicator`] over
//!   the control links (CUDA tensors travel through host memory, correct but slow, so a warning
//!   says so);
//! * ranks on GPUs in a build with `nccl`: an NCCL communicator. The leader draws the NCCL
//!   unique id before the rendezvous and sends it in the welcome's `extra` under
//!   [`NCCL_ID_KEY`]; every rank joins the clique after its shard has loaded and it has said (or,
//!   for the leader, heard) `ready`, so no rank waits in `ncclCommInitRank` for one still loading
//!   weights. NCCL communicators are not thread-safe: [`communicator`] is called on, and the
//!   result stays on, the rank's model thread.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use dsvl_models::ModelError;
use dsvl_parallel::{Communicator, LinkSet, SingleRank, TcpCommunicator};

/// Key of the NCCL unique id (an array of bytes) in the rendezvous welcome's `extra`.
pub const NCCL_ID_KEY: &str = "nccl_id";

/// Leader: adds what the workers need for the collective backend to the welcome's `extra`
/// (the NCCL unique id when the group runs NCCL). `extra` must be a JSON object.
///
/// # Errors
/// The NCCL library could not produce an id.
pub fn prepare_welcome(
    device: &Device,
    world_size: usize,
    extra: &mut serde_json::Value,
) -> Result<(), ModelError> {
    if uses_nccl(device, world_size) {
        #[cfg(feature = "nccl")]
        {
            let id = dsvl_parallel::new_unique_id()?;
            if let Some(map) = extra.as_object_mut() {
                map.insert(NCCL_ID_KEY.into(), serde_json::json!(id));
            }
        }
    }
    let _ = extra;
    Ok(())
}

/// Whether a group of `world_size` ranks on `device` runs its collectives over NCCL.
pub fn uses_nccl(device: &Device, world_size: usize) -> bool {
    world_size > 1 && device.is_cuda() && cfg!(feature = "nccl")
}

/// Builds this rank's communicator (on the rank's model thread). `extra` is the welcome the
/// leader sent (the leader passes its own).
///
/// # Errors
/// NCCL initialisation failed, or the welcome lacks the NCCL id the group needs.
pub fn communicator(
    device: &Device,
    links: &Arc<LinkSet>,
    timeout: Duration,
    extra: &serde_json::Value,
) -> Result<Box<dyn Communicator>, ModelError> {
    let world = links.world_size();
    if world == 1 {
        return Ok(Box::new(SingleRank));
    }
    if uses_nccl(device, world) {
        return nccl(device, links.rank(), world, extra);
    }
    if device.is_cuda() {
        tracing::warn!(
            world,
            "tensor-parallel ranks on CUDA without NCCL: collectives go through host memory over TCP \
             (rebuild with `--features nccl` for GPU collectives)"
        );
    }
    let _ = extra;
    Ok(Box::new(TcpCommunicator::new(links.clone(), timeout)))
}

#[cfg(feature = "nccl")]
fn nccl(
    device: &Device,
    rank: usize,
    world: usize,
    extra: &serde_json::Value,
) -> Result<Box<dyn Communicator>, ModelError> {
    let id: Vec<u8> = serde_json::from_value(extra.get(NCCL_ID_KEY).cloned().unwrap_or_default()).map_err(|_| {
        ModelError::Comm(dsvl_parallel::CommError::Rendezvous(format!(
            "the leader's welcome has no `{NCCL_ID_KEY}`: every rank of a GPU group must be built with the same features"
        )))
    })?;
    tracing::info!(rank, world, "joining the NCCL clique");
    Ok(Box::new(dsvl_parallel::NcclCommunicator::new(device, rank, world, &id)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl(
    _: &Device,
    _: usize,
    _: usize,
    _: &serde_json::Value,
) -> Result<Box<dyn Communicator>, ModelError> {
    unreachable!("uses_nccl is false without the `nccl` feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_groups_use_tcp_and_a_group_of_one_needs_nothing() {
        let mut extra = serde_json::json!({"kv": 1});
        prepare_welcome(&Device::Cpu, 4, &mut extra).unwrap();
        assert_eq!(extra, serde_json::json!({"kv": 1}), "no NCCL id for CPU ranks");
        assert!(!uses_nccl(&Device::Cpu, 4));
        let single =
            communicator(&Device::Cpu, &Arc::new(LinkSet::Single), Duration::from_secs(1), &extra)
                .unwrap();
        assert_eq!((single.rank(), single.world_size()), (0, 1));
    }
}
