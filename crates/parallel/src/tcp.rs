//! Collectives over the control links: a star through the leader.
//!
//! Workers send their tensor to rank 0, which reduces (in f32, in rank order, so the result is
//! the same on every run) or concatenates, and sends the result back. For the group sizes a CPU
//! host runs (2-8 ranks) on loopback this costs two copies per collective and keeps the
//! protocol trivially ordered; GPUs use NCCL instead.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Tensor, D};
use serde_json::json;

use crate::frame::{Message, WireTensor};
use crate::rendezvous::LinkSet;
use crate::{CommError, Communicator};

/// [`Communicator`] over a [`LinkSet`].
pub struct TcpCommunicator {
    links: Arc<LinkSet>,
    timeout: Duration,
}

impl TcpCommunicator {
    /// Collectives over `links`; each wait is bounded by `timeout`.
    pub fn new(links: Arc<LinkSet>, timeout: Duration) -> Self {
        Self { links, timeout }
    }

    fn exchange(
        &self,
        x: &Tensor,
        op: &'static str,
        combine: impl Fn(Vec<Tensor>) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor, CommError> {
        let device = x.device().clone();
        match &*self.links {
            LinkSet::Single => Ok(x.clone()),
            LinkSet::Worker { leader, .. } => {
                leader.send(
                    &Message {
                        header: json!({"kind": op}),
                        tensors: vec![WireTensor::from_tensor(x)?],
                    },
                    op,
                )?;
                let reply = leader.expect(op, op, Some(self.timeout))?;
                let t = reply
                    .tensors
                    .first()
                    .ok_or_else(|| CommError::Protocol(format!("{op} reply without a tensor")))?;
                Ok(t.to_tensor(&device)?)
            }
            LinkSet::Leader { workers } => {
                let mut parts = vec![x.clone()];
                for w in workers {
                    let msg = w.expect(op, op, Some(self.timeout))?;
                    let t = msg.tensors.first().ok_or_else(|| {
                        CommError::Protocol(format!("{op} from rank {} without a tensor", w.peer()))
                    })?;
                    if t.dims() != x.dims() {
                        return Err(CommError::Protocol(format!(
                            "{op}: rank {} sent {:?}, leader has {:?}",
                            w.peer(),
                            t.dims(),
                            x.dims()
                        )));
                    }
                    parts.push(t.to_tensor(&device)?);
                }
                let out = combine(parts)?;
                let reply = Message {
                    header: json!({"kind": op}),
                    tensors: vec![WireTensor::from_tensor(&out)?],
                };
                for w in workers {
                    w.send(&reply, op)?;
                }
                Ok(out)
            }
        }
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.links.rank()
    }

    fn world_size(&self) -> usize {
        self.links.world_size()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError> {
        let dtype = x.dtype();
        self.exchange(x, "all_reduce", |parts| {
            let mut acc = parts[0].to_dtype(DType::F32)?;
            for p in &parts[1..] {
                acc = (acc + p.to_dtype(DType::F32)?)?;
            }
            acc.to_dtype(dtype)
        })
    }

    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor, CommError> {
        self.exchange(x, "all_gather", |parts| Tensor::cat(&parts, D::Minus1))
    }
}
