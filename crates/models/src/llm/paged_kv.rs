//! Paged key/value storage: every layer owns one pool of `num_blocks * block_size` token slots
//! per rank; a sequence's tokens live in the blocks its block table lists (allocated by the
//! leader's block manager and sent with each step), in order. Memory is fixed up front, so
//! running out is a scheduling decision (preemption), never an allocation failure in the middle
//! of a step.
//!
//! Per layer and step there is one write of the step's new rows (in place) and one attention
//! call over the whole step, reading the pool in place through the block tables:
//! - CPU: our kernel ([`super::cpu_attention`]), threads over sequences and heads;
//! - CUDA with the `flash-attn` feature: `candle-flash-attn`'s paged varlen kernel (the pool is
//!   already its `[num_blocks, block_size, kv_heads, head_dim]` layout);
//! - CUDA otherwise (bf16, f32, head_dim <= 256): our kernels (`crate::cuda::decoder`), one
//!   for decode rows and a tiled one for prompt chunks;
//! - any other device: a portable fallback built from candle ops that gathers the step's
//!   histories in a few padded batches (logged once so nobody serves with it by accident).

use candle_core::{DType, Device, Result, Tensor};

use super::cpu_attention::{self, PagedAttention, WriteKv};
use super::gather_attention::{self, GatherPlan};
use super::step::StepMeta;
use crate::isa::Isa;

/// Geometry of the pool, identical on every rank of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PagedKvConfig {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
}

impl PagedKvConfig {
    /// Default tokens per block (a multiple of 32, as the paged flash-attention kernel needs).
    pub const DEFAULT_BLOCK_SIZE: usize = 32;

    /// Enough blocks of `block_size` for `tokens` tokens.
    pub fn for_tokens(tokens: usize, block_size: usize) -> Self {
        Self { num_blocks: tokens.div_ceil(block_size).max(1), block_size }
    }

    /// Blocks of `block_size` that fit in `bytes`, at `bytes_per_token` (all layers, K and V).
    pub fn for_bytes(bytes: u64, bytes_per_token: u64, block_size: usize) -> Self {
        let per_block = bytes_per_token.max(1) * block_size as u64;
        Self { num_blocks: (bytes / per_block) as usize, block_size }
    }

    /// Token slots in the pool.
    pub fn tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// Per-rank paged store.
pub struct PagedKv {
    cfg: PagedKvConfig,
    kv_heads: usize,
    /// The flash-attention kernel's pool view needs it; other paths read it off the tensors.
    #[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
    head_dim: usize,
    /// Per layer: keys and values, `[num_blocks * block_size, kv_heads, head_dim]`.
    pools: Vec<(Tensor, Tensor)>,
}

/// Bytes of KV cache one token takes on one rank (`layers` layers, keys and values).
pub fn kv_bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> u64 {
    (2 * layers * kv_heads * head_dim * dtype.size_in_bytes()) as u64
}

impl PagedKv {
    /// Allocates the pools (zeros) for `layers` layers of `kv_heads x head_dim` per token.
    pub fn new(
        cfg: PagedKvConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.num_blocks == 0 || cfg.block_size == 0 {
            candle_core::bail!("a KV pool needs at least one block of at least one slot");
        }
        let slots = cfg.tokens();
        let pools = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?,
                    Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, kv_heads, head_dim, pools })
    }

    /// Pool geometry.
    pub fn config(&self) -> PagedKvConfig {
        self.cfg
    }

    /// Step metadata for this pool (see [`StepMeta::new`]).
    ///
    /// # Errors
    /// Block tables that do not cover the chunks or leave the pool.
    pub fn step_meta(
        &self,
        chunks: &[super::SeqChunk],
        device: &Device,
    ) -> std::result::Result<StepMeta, crate::ModelError> {
        StepMeta::new(chunks, self.cfg.block_size, self.cfg.num_blocks, device)
    }

    /// Writes the step's new keys and values (`[N, kv_heads, head_dim]`, rotated) of `layer`
    /// into their slots: one in-place write per pool (on the CPU a copy per row, on CUDA one
    /// kernel over all rows, `super::cuda_kv`).
    pub fn write(&self, layer: usize, meta: &StepMeta, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kp, vp) = &self.pools[layer];
        let op = WriteKv { meta };
        kp.inplace_op2(&k.contiguous()?, &op)?;
        vp.inplace_op2(&v.contiguous()?, &op)
    }

    /// The fused CUDA path of a layer's attention inputs: from the q/k/v projection's rows
    /// `qkv`, writes `k` rotated by `rope` and `v` into `layer`'s pools at the step's slots and
    /// returns `q` rotated, `[N, heads, head_dim]` (`crate::cuda::decoder`).
    #[cfg(feature = "cuda")]
    pub(crate) fn rope_and_store(
        &self,
        layer: usize,
        meta: &StepMeta,
        qkv: &Tensor,
        rope: &super::layers::Rope,
        dims: (usize, usize, usize),
    ) -> Result<Tensor> {
        let (kp, vp) = &self.pools[layer];
        let slots = &meta.on_device()?.slots;
        crate::cuda::decoder::rope_and_store(
            qkv,
            dims,
            rope.tables(),
            &meta.positions,
            slots,
            kp,
            vp,
        )
    }

    /// Causal attention of the step's queries `q` (`[N, heads, head_dim]`) over `layer`'s pool,
    /// scaled by `scale`. Returns `[N, heads * head_dim]`.
    pub fn attend(&self, layer: usize, meta: &StepMeta, q: &Tensor, scale: f32) -> Result<Tensor> {
        self.attend_on(Isa::current(), layer, meta, q, scale)
    }

    /// [`Self::attend`] with the CPU kernel on the path `isa`.
    pub(crate) fn attend_on(
        &self,
        isa: Isa,
        layer: usize,
        meta: &StepMeta,
        q: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let (n, heads, d) = q.dims3()?;
        let (kp, vp) = &self.pools[layer];
        if kp.device().is_cpu() && cpu_attention::supports(q.dtype()) {
            let op =
                PagedAttention { meta, heads, kv_heads: self.kv_heads, head_dim: d, scale, isa };
            return q.contiguous()?.apply_op3_no_bwd(kp, vp, &op)?.reshape((n, heads * d));
        }
        #[cfg(feature = "flash-attn")]
        if kp.device().is_cuda() && self.cfg.block_size % 32 == 0 {
            return self.flash(kp, vp, meta, q, scale)?.reshape((n, heads * d));
        }
        #[cfg(feature = "cuda")]
        if kp.device().is_cuda() && crate::cuda::decoder::supports(q.dtype(), d) {
            let op =
                PagedAttention { meta, heads, kv_heads: self.kv_heads, head_dim: d, scale, isa };
            return q.contiguous()?.apply_op3_no_bwd(kp, vp, &op)?.reshape((n, heads * d));
        }
        self.gathered(kp, vp, meta, q, scale)
    }

    #[cfg(feature = "flash-attn")]
    fn flash(
        &self,
        kp: &Tensor,
        vp: &Tensor,
        meta: &StepMeta,
        q: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let dm = meta.on_device()?;
        let paged = (self.cfg.num_blocks, self.cfg.block_size, self.kv_heads, self.head_dim);
        candle_flash_attn::flash_attn_varlen_paged_windowed(
            &q.contiguous()?,
            &kp.reshape(paged)?,
            &vp.reshape(paged)?,
            &dm.cu_seqlens_q,
            &dm.cu_seqlens_k,
            &dm.block_table,
            None,
            dm.max_seqlen_q,
            dm.max_seqlen_k,
            scale,
            None,
            Some(0), // causal: no key to the right of the query's position
            self.cfg.block_size,
            None,
        )
    }

    /// Portable fallback for devices without a paged kernel: the step's sequences in a few
    /// padded batches from candle ops ([`super::gather_attention`]).
    fn gathered(
        &self,
        kp: &Tensor,
        vp: &Tensor,
        meta: &StepMeta,
        q: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                device = ?kp.device().location(),
                "no paged attention kernel for this device in this build: using the portable \
                 gathering fallback (build CUDA with the flash-attn feature)"
            )
        });
        let plan = match meta.gather.get() {
            Some(plan) => plan,
            None => {
                // Once per step: later layers find it built.
                let plan = GatherPlan::new(&meta.seqs, meta.block_size, kp.device())?;
                meta.gather.get_or_init(|| plan)
            }
        };
        gather_attention::attend(plan, kp, vp, q, scale)
    }
}

#[cfg(test)]
#[path = "paged_kv_tests.rs"]
mod tests;
