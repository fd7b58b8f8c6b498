//! Running the decoder as one tensor-parallel group: the leader turns each step into a plan,
//! broadcasts it down the control links, and runs its own shard; workers receive plans and run
//! theirs. All ranks then meet in the same collectives in the same order.
//!
//! Plans are validated on the leader before they are sent, so an invalid request never reaches
//! a collective; a worker that fails anyway tells the leader (an `error` message on its link),
//! and a dead or hung rank turns the leader's next collective into an error within the timeout.

use std::sync::Arc;

use candle_core::Tensor;
use dsvl_parallel::{Communicator, LinkSet, Message, SingleRank, TcpCommunicator, WireTensor};
use serde_json::json;

use super::model::{DeepSeekLlm, ImageRows, SeqChunk, SeqId};
use super::paged_kv::{PagedKv, PagedKvConfig};
use crate::ModelError;

/// One step for the whole group.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    /// New tokens per sequence.
    pub chunks: Vec<SeqChunk>,
    /// Sequences to forget before running (finished or cancelled).
    pub free: Vec<SeqId>,
    /// Image embedding rows and the positions (in the concatenated chunk tokens) they take.
    pub image: Option<ImageRows>,
}

impl StepPlan {
    fn to_message(&self) -> Result<Message, ModelError> {
        let mut msg = Message::new(json!({
            "kind": "step",
            "chunks": self.chunks,
            "free": self.free,
            "image_positions": self.image.as_ref().map(|i| &i.positions),
        }));
        if let Some(image) = &self.image {
            msg.tensors.push(WireTensor::from_tensor(&image.rows)?);
        }
        Ok(msg)
    }

    fn from_message(msg: &Message, device: &candle_core::Device) -> Result<Self, ModelError> {
        let bad = |e: String| ModelError::InvalidInput(format!("malformed step plan: {e}"));
        let chunks =
            serde_json::from_value(msg.header["chunks"].clone()).map_err(|e| bad(e.to_string()))?;
        let free =
            serde_json::from_value(msg.header["free"].clone()).map_err(|e| bad(e.to_string()))?;
        let image = match msg.header.get("image_positions").filter(|v| !v.is_null()) {
            None => None,
            Some(p) => {
                let positions =
                    serde_json::from_value(p.clone()).map_err(|e| bad(e.to_string()))?;
                let rows = msg
                    .tensors
                    .first()
                    .ok_or_else(|| bad("image positions without rows".into()))?;
                Some(ImageRows { positions, rows: rows.to_tensor(device)? })
            }
        };
        Ok(Self { chunks, free, image })
    }
}

/// This rank's model, key/value store and group links.
pub struct ShardRunner {
    model: DeepSeekLlm,
    kv: PagedKv,
    links: Arc<LinkSet>,
    comm: Box<dyn Communicator>,
}

impl ShardRunner {
    /// Wraps a loaded shard; collectives go over `links` (TCP) with `timeout`.
    pub fn new(
        model: DeepSeekLlm,
        kv: PagedKv,
        links: Arc<LinkSet>,
        timeout: std::time::Duration,
    ) -> Self {
        let comm: Box<dyn Communicator> = match &*links {
            LinkSet::Single => Box::new(SingleRank),
            _ => Box::new(TcpCommunicator::new(links.clone(), timeout)),
        };
        Self { model, kv, links, comm }
    }

    /// The same, with a caller-provided communicator (NCCL, which must stay on the thread that
    /// created it: a runner is built and used on its rank's model thread).
    pub fn with_communicator(
        model: DeepSeekLlm,
        kv: PagedKv,
        links: Arc<LinkSet>,
        comm: Box<dyn Communicator>,
    ) -> Self {
        Self { model, kv, links, comm }
    }

    /// The local model shard.
    pub fn model(&self) -> &DeepSeekLlm {
        &self.model
    }

    /// The group's links.
    pub fn links(&self) -> &Arc<LinkSet> {
        &self.links
    }

    /// The KV pool's geometry.
    pub fn kv_config(&self) -> PagedKvConfig {
        self.kv.config()
    }

    fn run(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        // Blocks belong to the leader's block manager: freeing a sequence needs nothing here
        // yet (`free` is where per-sequence state on the ranks will be dropped).
        let _ = &plan.free;
        if plan.chunks.is_empty() {
            return Ok(None);
        }
        self.model
            .forward(&plan.chunks, plan.image.as_ref(), &self.kv, self.comm.as_ref())
            .map(Some)
    }

    /// Leader: validates the plan, sends it to every worker and runs it locally. Returns the
    /// logits (`None` for a plan that only frees sequences).
    ///
    /// # Errors
    /// Invalid plans (nothing is sent), or a group failure (a rank died, timed out or reported
    /// an error): the group is then unusable.
    pub fn lead_step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        self.model.validate(&plan.chunks)?;
        let kv = self.kv.config();
        super::step::check_block_tables(&plan.chunks, kv.block_size, kv.num_blocks)?;
        if let LinkSet::Leader { workers } = &*self.links {
            let msg = plan.to_message()?;
            for w in workers {
                w.send(&msg, "step plan")?;
            }
        }
        self.run(plan)
    }

    /// Worker: executes plans until the leader says `shutdown` (returns `Ok`) or disappears
    /// (returns the error).
    pub fn serve(&mut self) -> Result<(), ModelError> {
        // A second handle on the links, so the loop can borrow the link while `run` borrows self.
        let links = self.links.clone();
        let LinkSet::Worker { leader: link, .. } = &*links else {
            return Err(ModelError::InvalidInput("serve() runs on worker ranks only".into()));
        };
        loop {
            let msg = link.recv("waiting for a step plan", None)?;
            match msg.kind() {
                "shutdown" => return Ok(()),
                "step" => {
                    let plan = StepPlan::from_message(&msg, self.model.device())?;
                    if let Err(e) = self.run(&plan) {
                        let _ = link.send(
                            &Message::new(json!({"kind": "error", "reason": e.to_string()})),
                            "report",
                        );
                        return Err(e);
                    }
                }
                other => {
                    return Err(ModelError::InvalidInput(format!(
                        "unexpected `{other}` from the leader"
                    )))
                }
            }
        }
    }

    /// Leader: tells every worker to exit cleanly.
    pub fn shutdown(&self) {
        if let LinkSet::Leader { workers } = &*self.links {
            for w in workers {
                let _ = w.send(&Message::new(json!({"kind": "shutdown"})), "shutdown");
            }
        }
    }
}
