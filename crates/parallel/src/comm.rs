//! The collective operations a tensor-parallel model needs.

use candle_core::Tensor;

/// Why a collective or control message failed. Any of these means the group is broken.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer did not answer within the deadline.
    #[error("rank {rank}: no answer within {seconds:.1}s during {op}")]
    Timeout {
        /// The peer.
        rank: usize,
        /// Deadline that passed.
        seconds: f64,
        /// What we were waiting for.
        op: &'static str,
    },
    /// A peer closed its connection (its process died or exited).
    #[error("rank {rank} disconnected during {op}")]
    Disconnected {
        /// The peer.
        rank: usize,
        /// What we were doing.
        op: &'static str,
    },
    /// Socket error.
    #[error("rank {rank}: {op}: {source}")]
    Io {
        /// The peer.
        rank: usize,
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A peer sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The rendezvous could not assemble the group.
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    /// A tensor could not be converted.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The NCCL backend failed.
    #[error("nccl: {0}")]
    Nccl(String),
}

/// Collectives over the ranks of one group. Calls must be made by every rank in the same
/// order; tensors must have the same shape and dtype on every rank.
pub trait Communicator {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks; every rank gets the result.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError>;
    /// Concatenation of every rank's tensor along the last axis, in rank order; every rank
    /// gets the result.
    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor, CommError>;
}

/// The trivial group of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError> {
        Ok(x.clone())
    }
    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor, CommError> {
        Ok(x.clone())
    }
}
