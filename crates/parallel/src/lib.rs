//! Tensor-parallel process groups.
//!
//! A group is `world_size` ranks, one process each. Rank 0 (the leader) listens on a
//! rendezvous address; workers connect, say who they are ([`rendezvous`]), and keep that TCP
//! connection as the group's control channel: the leader sends each step's plan down it and
//! workers execute. Collectives go through a [`Communicator`]:
//!
//! * [`TcpCommunicator`] reuses the control connections (a star through the leader, which sums
//!   in rank order, so results are deterministic run to run); it is what CPU deployments and
//!   every test use.
//! * `NcclCommunicator` (feature `nccl`) runs the collectives on GPUs through cudarc; the NCCL
//!   unique id travels in the rendezvous reply, and the control channel is the same TCP one.
//!
//! Ranks prove membership with a shared key before they are told anything ([`auth`]); frames
//! from the wire are bounded before anything is allocated for them ([`FrameLimits`]).
//!
//! Every blocking read has a deadline: a dead peer is an immediate error (EOF), a hung one a
//! [`CommError::Timeout`], so a group fails fast instead of hanging.
#![deny(missing_docs)]

pub mod auth;
mod comm;
mod frame;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;
mod tcp;
pub mod tensor_bytes;

pub use auth::GroupKey;
pub use comm::{CommError, Communicator, SingleRank};
pub use frame::{FrameLimits, Message, WireTensor};
#[cfg(feature = "nccl")]
pub use nccl::{new_unique_id, NcclCommunicator, NCCL_ID_BYTES};
pub use rendezvous::{GroupSpec, Link, LinkSet};
pub use tcp::TcpCommunicator;
