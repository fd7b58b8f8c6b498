//! Paged attention from candle ops, for devices without a paged kernel (CUDA builds without the
//! `flash-attn` feature): the step's sequences go through each layer in a few padded batches,
//! not one by one.
//!
//! Why batches: a per-sequence loop costs about a dozen kernel launches and one host-to-device
//! copy per sequence per layer, so on a GPU the step is launch-bound and grows with the batch
//! (measured on an H200 at VL-7B dimensions, bf16: 184 ms per decode step at batch 64, against
//! 17 ms at batch 1). Here every index and mask is built and uploaded once per step
//! ([`GatherPlan`], kept with the step's metadata by the first layer that needs it) and each
//! layer runs the same dozen launches per group whatever the batch size.
//!
//! A group is a set of sequences padded to its longest new-token run `T` and longest context
//! `L`: their queries are gathered into `[B, T]` rows, their history out of the pool into
//! `[B, L]` rows (padding points at slot 0 of the pool, which is allocated zeroed, so it is
//! always finite), and an additive mask (`0` or `-inf`, f32) hides padded keys and keys to the
//! right of each query's position. Decode tokens (`T = 1`) and prefill chunks group apart, each
//! in step order, while a group's gathered history (`B * L` rows) stays under
//! [`MAX_GROUP_KV_ROWS`] and its scores (`B * T * L` per head) under [`MAX_GROUP_SCORES`], so
//! neither padding nor a long context in a large batch inflates memory much beyond what the
//! largest single sequence needs. Scores are softmaxed in f32.

use candle_core::{DType, Device, Result, Tensor};

use super::step::SeqSlice;
use crate::ops::softmax_last_dim;

/// Most `B * T * L` score entries (per head) a group may hold; a single chunk larger than this
/// still forms a group of its own.
const MAX_GROUP_SCORES: usize = 1 << 23;
/// Most `B * L` history rows a group gathers out of each pool (512 MiB per pool at VL-7B's
/// 4,096 bf16 values per row); a single longer context still forms a group of its own.
const MAX_GROUP_KV_ROWS: usize = 1 << 16;

/// One padded batch of sequences.
#[derive(Debug)]
struct Group {
    seqs: usize,
    /// Longest new-token run in the group.
    t: usize,
    /// Longest context in the group.
    l: usize,
    /// `[B * T]` u32: the step row of each padded query (padding: row of the group's first).
    q_index: Tensor,
    /// `[B * L]` u32: the pool slot of each padded key (padding: slot 0).
    kv_index: Tensor,
    /// `[B, 1, 1, T, L]` f32: 0 where the query may see the key, `-inf` elsewhere.
    mask: Tensor,
}

/// Indices and masks of one step for [`attend`], built once per step.
#[derive(Debug)]
pub struct GatherPlan {
    groups: Vec<Group>,
    /// `[N]` u32: for each step row, its row in the groups' concatenated padded outputs.
    out_index: Tensor,
}

impl GatherPlan {
    /// Plans `seqs` (the step's sequences in row order) for a pool of `block_size` slots per
    /// block.
    ///
    /// # Errors
    /// Device uploads.
    pub fn new(seqs: &[SeqSlice], block_size: usize, device: &Device) -> Result<Self> {
        let mut members: Vec<Vec<&SeqSlice>> = Vec::new();
        for decode in [true, false] {
            let mut open: Vec<&SeqSlice> = Vec::new();
            for s in seqs.iter().filter(|s| (s.q_len == 1) == decode) {
                let (t, l) = open
                    .iter()
                    .fold((s.q_len, s.ctx_len), |(t, l), o| (t.max(o.q_len), l.max(o.ctx_len)));
                let b = open.len() + 1;
                if !open.is_empty() && (b * t * l > MAX_GROUP_SCORES || b * l > MAX_GROUP_KV_ROWS) {
                    members.push(std::mem::take(&mut open));
                }
                open.push(s);
            }
            if !open.is_empty() {
                members.push(open);
            }
        }
        let total_rows = seqs.iter().map(|s| s.q_len).sum::<usize>();
        let mut out_index = vec![0u32; total_rows];
        let mut groups = Vec::with_capacity(members.len());
        let mut padded_rows = 0;
        for m in members {
            let t = m.iter().map(|s| s.q_len).max().unwrap_or(1);
            let l = m.iter().map(|s| s.ctx_len).max().unwrap_or(1);
            let mut q_index = vec![m[0].q_start as u32; m.len() * t];
            let mut kv_index = vec![0u32; m.len() * l];
            let mut mask = vec![f32::NEG_INFINITY; m.len() * t * l];
            for (b, s) in m.iter().enumerate() {
                for p in 0..s.ctx_len {
                    kv_index[b * l + p] =
                        (s.blocks[p / block_size] as usize * block_size + p % block_size) as u32;
                }
                for i in 0..s.q_len {
                    let row = b * t + i;
                    q_index[row] = (s.q_start + i) as u32;
                    out_index[s.q_start + i] = (padded_rows + row) as u32;
                    // New token i sits at position ctx_len - q_len + i and sees 0..=that.
                    let visible = s.ctx_len - s.q_len + i + 1;
                    mask[row * l..row * l + visible].fill(0.0);
                }
                // Padded query rows see everything (finite rows, dropped by `out_index`).
                for row in b * t + s.q_len..(b + 1) * t {
                    mask[row * l..(row + 1) * l].fill(0.0);
                }
            }
            padded_rows += m.len() * t;
            groups.push(Group {
                seqs: m.len(),
                t,
                l,
                q_index: Tensor::new(q_index, device)?,
                kv_index: Tensor::new(kv_index, device)?,
                mask: Tensor::from_vec(mask, (m.len(), 1, 1, t, l), device)?,
            });
        }
        Ok(Self { groups, out_index: Tensor::new(out_index, device)? })
    }
}

/// Causal attention of `q` (`[N, heads, head_dim]`, the step's rows) over the pools `kp`, `vp`
/// (`[slots, kv_heads, head_dim]`), scaled by `scale`. Returns `[N, heads * head_dim]`.
///
/// # Errors
/// Shapes that disagree with the plan, device errors.
pub fn attend(
    plan: &GatherPlan,
    kp: &Tensor,
    vp: &Tensor,
    q: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (_, heads, d) = q.dims3()?;
    let kvh = kp.dim(1)?;
    let g = heads / kvh;
    let mut outs = Vec::with_capacity(plan.groups.len());
    for gr in &plan.groups {
        let (b, t, l) = (gr.seqs, gr.t, gr.l);
        // [B*T, heads, d] -> [B, kvh, g*T, d]: query heads of one KV head share its keys.
        let qg = q
            .index_select(&gr.q_index, 0)?
            .reshape((b, t, kvh, g, d))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, kvh, g * t, d))?;
        let history = |pool: &Tensor| -> Result<Tensor> {
            pool.index_select(&gr.kv_index, 0)?
                .reshape((b, l, kvh, d))?
                .permute((0, 2, 1, 3))?
                .contiguous()
        };
        let (k, v) = (history(kp)?, history(vp)?);
        let scores = (qg.matmul(&k.t()?)?.to_dtype(DType::F32)? * f64::from(scale))?
            .reshape((b, kvh, g, t, l))?
            .broadcast_add(&gr.mask)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(q.dtype())?.reshape((b, kvh, g * t, l))?;
        outs.push(
            probs
                .matmul(&v)?
                .reshape((b, kvh, g, t, d))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * t, heads * d))?,
        );
    }
    let padded =
        if outs.len() == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 0)? };
    padded.index_select(&plan.out_index, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(q_start: usize, q_len: usize, ctx_len: usize, blocks: Vec<u32>) -> SeqSlice {
        SeqSlice { q_start, q_len, ctx_len, blocks }
    }

    /// Decodes share one group; prefill chunks group in order under the size bound, and every
    /// step row maps back to its padded row.
    #[test]
    fn decodes_share_a_group_and_rows_map_back() -> Result<()> {
        let seqs = [
            seq(0, 3, 5, vec![1, 0]),
            seq(3, 1, 9, vec![2, 3, 4]),
            seq(4, 2, 2, vec![5]),
            seq(6, 1, 4, vec![6]),
        ];
        let plan = GatherPlan::new(&seqs, 4, &Device::Cpu)?;
        assert_eq!(plan.groups.len(), 2);
        let (dec, pre) = (&plan.groups[0], &plan.groups[1]);
        assert_eq!((dec.seqs, dec.t, dec.l), (2, 1, 9));
        assert_eq!((pre.seqs, pre.t, pre.l), (2, 3, 5));
        assert_eq!(dec.q_index.to_vec1::<u32>()?, vec![3, 6]);
        // Prefill rows: seq 0 rows 0..3, seq 2 rows 4, 5 and a padded row (its group's first).
        assert_eq!(pre.q_index.to_vec1::<u32>()?, vec![0, 1, 2, 4, 5, 0]);
        // Decode group first (rows 0, 1), then the prefill group (rows 2..8).
        assert_eq!(plan.out_index.to_vec1::<u32>()?, vec![2, 3, 4, 0, 5, 6, 1]);
        // Seq 3 (decode, context 4 in block 6) pads to 9 keys with slot 0.
        let kv = dec.kv_index.to_vec1::<u32>()?;
        assert_eq!(&kv[9..], &[24, 25, 26, 27, 0, 0, 0, 0, 0]);
        // Seq 0's first new token sits at position 2 and sees keys 0..=2.
        let mask = pre.mask.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&mask[..5], &[0.0, 0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        Ok(())
    }

    /// Long contexts in a large decode batch split so no group gathers more than the bound.
    #[test]
    fn long_decodes_split_into_groups() -> Result<()> {
        let ctx = 16_384;
        let blocks: Vec<u32> = (0..(ctx / 32) as u32).collect();
        let seqs: Vec<SeqSlice> = (0..9).map(|i| seq(i, 1, ctx, blocks.clone())).collect();
        let plan = GatherPlan::new(&seqs, 32, &Device::Cpu)?;
        // 4 x 16,384 = 2^16 rows fit one group.
        assert_eq!(plan.groups.iter().map(|g| g.seqs).collect::<Vec<_>>(), vec![4, 4, 1]);
        assert_eq!(plan.out_index.to_vec1::<u32>()?, (0..9).collect::<Vec<u32>>());
        Ok(())
    }

    #[test]
    fn large_prefills_split_into_groups() -> Result<()> {
        let n = 2048;
        let blocks: Vec<u32> = (0..(n / 32) as u32).collect();
        let seqs: Vec<SeqSlice> = (0..3).map(|i| seq(i * n, n, n, blocks.clone())).collect();
        let plan = GatherPlan::new(&seqs, 32, &Device::Cpu)?;
        // 2 x 2048 x 2048 = 2^23 fits one group; a third chunk would not.
        assert_eq!(plan.groups.iter().map(|g| g.seqs).collect::<Vec<_>>(), vec![2, 1]);
        Ok(())
    }
}
