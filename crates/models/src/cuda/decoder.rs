//! The decoder layer's glue on CUDA as kernels of ours (`kernels.cu`) where candle's op chains
//! take a dozen launches and as many passes over the activations:
//! - RoPE of `q` and `k` read straight out of the fused q/k/v projection's rows, `k` rotated and
//!   `v` copied straight into their pool slots (was: strided copies of the three views, two
//!   table gathers, narrow/neg/cat and three element-wise ops per rotation, then the writes);
//! - `silu(gate) * up` from the fused gate/up projection's rows (was: two strided ops);
//! - paged causal attention reading the pools in place through the block tables (was: the
//!   portable path of `llm::gather_attention`, which gathers every sequence's history, pads it
//!   into batches and runs about fifteen launches a layer): decode rows by kernels whose warps
//!   split the keys (16 warps for steps of few rows, 8 for many), prompt chunks by a tiled one
//!   that reads each key once per 16 query rows.
//!
//! Why: a batch-1 VL-7B decode step on an H200 was about 1,000 launches, 12.35 ms against the
//! 2.7 ms its weights take to stream (benches/README.md, "GPU"). The RoPE and SiLU kernels keep
//! the rounding points of the chains they replace (bit-identical in bf16 and f32). Attention
//! computes the softmax and the weighted values in f32 and rounds the output once, as PyTorch's
//! fused attention (SDPA, flash) does, where the chain rounded the scores and probabilities to
//! bf16 on the way: bf16 results differ from the chain's by that rounding, f32 ones by summation
//! order. `DSVL_CUDA_FUSED=0` (or [`crate::set_fused_cuda_kernels`]) switches back to the op
//! chains, to compare the two on one GPU.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor,
};

use crate::llm::cpu_attention::PagedAttention;

/// Largest head dimension the attention kernels take (`32 * ROW_DIMS` in `kernels.cu`).
const MAX_HEAD_DIM: usize = 256;
/// Largest head dimension of the tiled (prompt) attention kernel (`32 * TILE_DIMS`); above it,
/// every row takes the row kernel.
const MAX_TILE_HEAD_DIM: usize = 128;
/// Threads per block of the row kernels (16 warps wide, 8 narrow) and of the tiled one.
const WIDE_ROW_THREADS: u32 = 512;
const ROW_THREADS: u32 = 256;
const TILE_THREADS: u32 = 128;
/// Most (row, head) blocks a step gives the wide row kernel; above, the narrow one (whose
/// smaller register footprint fits twice the blocks on an SM). On an H200 at VL-7B sizes the
/// wide kernel halved batch-1 decode attention (48 to 25 µs a layer, Nsight Compute), was even
/// at batch 8 (256 blocks) and made a batch-64 step (2,048 blocks) 17.7 ms against 12.5 ms
/// (benches/README.md, "GPU").
const WIDE_ROW_BLOCKS: usize = 512;
/// Query rows per tile (`TILE_Q`, the tiles `StepMeta` builds) and keys per shared-memory tile
/// (`TILE_K`) of the tiled kernel.
const TILE_Q: usize = crate::llm::step::ATTENTION_TILE_ROWS;
const TILE_K: usize = 32;

/// Whether the fused kernels are on and take tensors of `dtype`.
pub(crate) fn supports_dtype(dtype: DType) -> bool {
    crate::fused_cuda_kernels() && matches!(dtype, DType::BF16 | DType::F32)
}

/// Whether the attention kernels (and RoPE) serve `dtype` with heads of `head_dim` values.
pub(crate) fn supports(dtype: DType, head_dim: usize) -> bool {
    supports_dtype(dtype) && head_dim % 2 == 0 && (1..=MAX_HEAD_DIM).contains(&head_dim)
}

/// One RoPE launch: `heads` heads of `head_dim` values from column `col0` of the projection's
/// rows, rotated by the tables at each row's position (or copied, `rotate` false), written to
/// the step's rows in order or to the pool rows `slots`.
struct RopeRows<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    positions: &'a Tensor,
    slots: Option<&'a Tensor>,
    col0: usize,
    heads: usize,
    head_dim: usize,
    rotate: bool,
}

impl RopeRows<'_> {
    /// Launches the kernel from `src` (`[N, width]`) into `dst` starting at element `dst0`, of
    /// `dst_rows` rows of `heads * head_dim`.
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        kernel: &str,
        src: &CudaStorage,
        sl: &Layout,
        dst: &mut CudaSlice<T>,
        (dst0, dst_rows): (usize, usize),
    ) -> Result<()> {
        let Some((s0, s1)) = sl.contiguous_offsets() else {
            candle_core::bail!("rope: the projection's rows must be contiguous")
        };
        let (n, width) = sl.shape().dims2()?;
        let row = self.heads * self.head_dim;
        if self.col0 + row > width || s1 - s0 != n * width {
            candle_core::bail!("rope: {row} columns from {} of {:?}", self.col0, sl.dims())
        }
        let (pg, pl) = self.positions.storage_and_layout();
        let pos = super::view::<u32>(&pg, pl, "the positions")?;
        let (cg, cl) = self.cos.storage_and_layout();
        let (ng, nl) = self.sin.storage_and_layout();
        let (cos, sin) =
            (super::view::<T>(&cg, cl, "the cos table")?, super::view::<T>(&ng, nl, "sin table")?);
        let slot_guard = self.slots.map(|s| s.storage_and_layout());
        let slots = match &slot_guard {
            Some((g, l)) => {
                let v = super::view::<u32>(g, l, "the KV slots")?;
                if v.len() != n {
                    candle_core::bail!("rope: {} slots for {n} rows", v.len())
                }
                v
            }
            None => super::view::<u32>(&pg, pl, "the positions")?, // not read: use_slots is 0
        };
        if pos.len() != n || (self.slots.is_none() && dst_rows != n) {
            candle_core::bail!("rope: {} positions, {dst_rows} rows out, for {n} rows", pos.len())
        }
        if n == 0 {
            return Ok(());
        }
        let dev = &src.device;
        let func = super::func(dev, kernel)?;
        let src_view = src.as_cuda_slice::<T>()?.slice(s0..s1);
        let mut dst_view = dst.slice_mut(dst0..dst0 + dst_rows * row);
        let use_slots = u32::from(self.slots.is_some());
        let (stride, col0, heads, d, rotate) = (
            width as u32,
            self.col0 as u32,
            self.heads as u32,
            self.head_dim as u32,
            u32::from(self.rotate),
        );
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&src_view);
        b.arg(&mut dst_view);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&pos);
        b.arg(&slots);
        b.arg(&use_slots);
        b.arg(&stride);
        b.arg(&col0);
        b.arg(&heads);
        b.arg(&d);
        b.arg(&rotate);
        // A thread per rotated pair, 128 a block: a decode row spreads over many blocks.
        let pairs = self.heads * self.head_dim / 2;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, pairs.div_ceil(128) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (r, y) reads its pairs of row r of the projection (inside it: checked above), the tables at
        // positions[r] (positions were checked against the tables' length by the model), and
        // writes them to row r of the output or to pool row slots[r] (slots were checked against the pool
        // when the step's metadata was built).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl CustomOp1 for RopeRows<'_> {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("rope-rows is a CUDA kernel; the CPU has its own")
    }

    fn cuda_fwd(&self, src: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = sl.shape().dims2()?.0;
        let row = self.heads * self.head_dim;
        let dev = src.device.clone();
        let shape = Shape::from((n, self.heads, self.head_dim));
        macro_rules! run {
            ($t:ty, $kernel:literal, $wrap:path) => {{
                // SAFETY: the kernel writes every element (n rows of heads * head_dim).
                let mut out = unsafe { dev.alloc::<$t>(n * row) }?;
                self.launch::<$t>($kernel, src, sl, &mut out, (0, n))?;
                Ok((CudaStorage { slice: $wrap(out), device: dev }, shape))
            }};
        }
        match &src.slice {
            CudaStorageSlice::BF16(_) => {
                run!(half::bf16, "dsvl_rope_rows_bf16", CudaStorageSlice::BF16)
            }
            CudaStorageSlice::F32(_) => run!(f32, "dsvl_rope_rows_f32", CudaStorageSlice::F32),
            _ => candle_core::bail!("rope-rows: bf16 or f32 rows"),
        }
    }
}

impl InplaceOp2 for RopeRows<'_> {
    fn name(&self) -> &'static str {
        "rope-rows-into-pool"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("rope-rows-into-pool is a CUDA kernel; the CPU writes its own")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let Some((p0, p1)) = pl.contiguous_offsets() else {
            candle_core::bail!("rope-rows-into-pool: the pool must be contiguous")
        };
        let row = self.heads * self.head_dim;
        if (p1 - p0) % row != 0 {
            candle_core::bail!("rope-rows-into-pool: pool {:?} for rows of {row}", pl.dims())
        }
        let rows = (p1 - p0) / row;
        match (&mut pool.slice, &src.slice) {
            (CudaStorageSlice::BF16(p), CudaStorageSlice::BF16(_)) => {
                self.launch::<half::bf16>("dsvl_rope_rows_bf16", src, sl, p, (p0, rows))
            }
            (CudaStorageSlice::F32(p), CudaStorageSlice::F32(_)) => {
                self.launch::<f32>("dsvl_rope_rows_f32", src, sl, p, (p0, rows))
            }
            _ => candle_core::bail!("rope-rows-into-pool: pool and rows of one dtype, bf16 or f32"),
        }
    }
}

/// The attention inputs of one layer from the fused projection's rows `qkv` (`[N, (heads + 2 *
/// kv_heads) * head_dim]`): writes `k` rotated and `v` into the pools `kp`, `vp` at `slots` and
/// returns `q` rotated, `[N, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_and_store(
    qkv: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    positions: &Tensor,
    slots: &Tensor,
    kp: &Tensor,
    vp: &Tensor,
) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let op = |col0, heads, slots, rotate| RopeRows {
        cos,
        sin,
        positions,
        slots,
        col0,
        heads,
        head_dim,
        rotate,
    };
    kp.inplace_op2(&qkv, &op(heads * head_dim, kv_heads, Some(slots), true))?;
    vp.inplace_op2(&qkv, &op((heads + kv_heads) * head_dim, kv_heads, Some(slots), false))?;
    qkv.apply_op1_no_bwd(&op(0, heads, None, true))
}

/// `silu(gate) * up` of the fused gate/up projection's rows `[N, 2 * width]`.
struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("silu-mul is a CUDA kernel; the CPU has its own")
    }

    fn cuda_fwd(&self, src: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((s0, s1)) = sl.contiguous_offsets() else {
            candle_core::bail!("silu-mul: the rows must be contiguous")
        };
        let (n, two) = sl.shape().dims2()?;
        if two % 2 != 0 {
            candle_core::bail!("silu-mul: rows of {two} are not [gate | up]")
        }
        let width = two / 2;
        let total = (n * width) as u64;
        let dev = src.device.clone();
        let shape = Shape::from((n, width));
        macro_rules! run {
            ($t:ty, $kernel:literal, $s:expr, $wrap:path) => {{
                let func = super::func(&dev, $kernel)?;
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$t>(n * width) }?;
                if total > 0 {
                    let sv = $s.slice(s0..s1);
                    let w = width as u32;
                    let stream = dev.cuda_stream();
                    let mut b = stream.launch_builder(&func);
                    b.arg(&sv);
                    b.arg(&mut out);
                    b.arg(&w);
                    b.arg(&total);
                    let blocks = total.div_ceil(256).min(65_535 * 8) as u32;
                    let cfg = LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: a grid-stride loop over `total` outputs, reading inside the rows.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage { slice: $wrap(out), device: dev }, shape))
            }};
        }
        match &src.slice {
            CudaStorageSlice::BF16(s) => {
                run!(half::bf16, "dsvl_silu_mul_bf16", s, CudaStorageSlice::BF16)
            }
            CudaStorageSlice::F32(s) => run!(f32, "dsvl_silu_mul_f32", s, CudaStorageSlice::F32),
            _ => candle_core::bail!("silu-mul: bf16 or f32 rows"),
        }
    }
}

/// `silu(gate) * up` of `gate_up` (`[N, 2 * width]`, gate columns first).
pub(crate) fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// The paged attention op on CUDA: `q` `[N, heads, head_dim]` over the pools through the step's
/// block tables; returns `[N, heads, head_dim]`.
pub(crate) fn paged_attention(
    op: &PagedAttention<'_>,
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (n, heads, d) = (op.meta.num_tokens, op.heads, op.head_dim);
    let shape = Shape::from((n, heads, d));
    if ql.dims() != [n, heads, d]
        || d > MAX_HEAD_DIM
        || op.kv_heads == 0
        || heads % op.kv_heads != 0
    {
        candle_core::bail!(
            "paged attention: q {:?} for {n} rows of {heads} heads ({} KV heads) of {d}",
            ql.dims(),
            op.kv_heads
        )
    }
    let dm = op.meta.on_device()?;
    let (pg, pl) = op.meta.positions.storage_and_layout();
    let pos = super::view::<u32>(&pg, pl, "the positions")?;
    let (cg, cl) = dm.cu_seqlens_q.storage_and_layout();
    let cu_q = super::view::<u32>(&cg, cl, "the cumulative query lengths")?;
    let (tg, tl) = dm.block_table.storage_and_layout();
    let table = super::view::<u32>(&tg, tl, "the block tables")?;
    // Prompt chunks share their keys through shared memory a tile of rows at a time; decode
    // rows (one per sequence: no tiles) take the row kernel, whose warps split the keys instead.
    let tile_guard =
        dm.tiles.as_ref().filter(|_| d <= MAX_TILE_HEAD_DIM).map(|t| t.storage_and_layout());
    let tiles = match &tile_guard {
        Some((g, l)) => Some(super::view::<u32>(g, l, "the query tiles")?),
        None => None,
    };
    let seqs = op.meta.seqs.len() as u32;
    let max_blocks = dm.block_table.dim(1)? as u32;
    let block_size = op.meta.block_size as u32;
    let (heads32, kv32, d32, scale) = (heads as u32, op.kv_heads as u32, d as u32, op.scale);
    let tiled = tiles.is_some();
    let wide = n * heads <= WIDE_ROW_BLOCKS;
    let dev = q.device.clone();
    let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) =
        (ql.contiguous_offsets(), kl.contiguous_offsets(), vl.contiguous_offsets())
    else {
        candle_core::bail!("paged attention: q and the pools must be contiguous")
    };
    macro_rules! run {
        ($t:ty, $wide:expr, $rows:expr, $tiles:expr, $q:expr, $k:expr, $v:expr, $wrap:path) => {{
            // SAFETY: every element of every row's heads is written (by block (r, h) of the row
            // kernel, or by the block of the tile holding r).
            let mut out = unsafe { dev.alloc::<$t>(n * heads * d) }?;
            if n > 0 {
                let (qv, kv, vv) = ($q.slice(q0..q1), $k.slice(k0..k1), $v.slice(v0..v1));
                let stream = dev.cuda_stream();
                let name = match (tiled, wide) {
                    (true, _) => $tiles,
                    (false, true) => $wide,
                    (false, false) => $rows,
                };
                let func = super::func(&dev, name)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&qv);
                b.arg(&kv);
                b.arg(&vv);
                b.arg(&mut out);
                b.arg(&pos);
                if let Some(tiles) = &tiles {
                    b.arg(tiles);
                } else {
                    b.arg(&cu_q);
                    b.arg(&seqs);
                }
                b.arg(&table);
                b.arg(&max_blocks);
                b.arg(&block_size);
                b.arg(&heads32);
                b.arg(&kv32);
                b.arg(&d32);
                b.arg(&scale);
                let cfg = if let Some(tiles) = &tiles {
                    LaunchConfig {
                        grid_dim: ((tiles.len() / 3) as u32, heads32, 1),
                        block_dim: (TILE_THREADS, 1, 1),
                        shared_mem_bytes: ((TILE_Q * d + 2 * TILE_K * (d + 1)) * 4) as u32,
                    }
                } else {
                    LaunchConfig {
                        grid_dim: (n as u32, heads32, 1),
                        block_dim: (if wide { WIDE_ROW_THREADS } else { ROW_THREADS }, 1, 1),
                        shared_mem_bytes: 0,
                    }
                };
                // SAFETY: row r reads keys 0..=positions[r] of its sequence through its block
                // table, which `check_block_tables` found inside the pool and long enough; the
                // tiles cover the step's rows, each inside one sequence (`StepMeta`).
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((CudaStorage { slice: $wrap(out), device: dev }, shape))
        }};
    }
    match (&q.slice, &k.slice, &v.slice) {
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            let wide = "dsvl_attention_rows_wide_bf16";
            let (rows, tiles) = ("dsvl_attention_rows_bf16", "dsvl_attention_tiles_bf16");
            run!(half::bf16, wide, rows, tiles, q, k, v, CudaStorageSlice::BF16)
        }
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            let wide = "dsvl_attention_rows_wide_f32";
            let (rows, tiles) = ("dsvl_attention_rows_f32", "dsvl_attention_tiles_f32");
            run!(f32, wide, rows, tiles, q, k, v, CudaStorageSlice::F32)
        }
        _ => candle_core::bail!("paged attention: q and the pools in one dtype, bf16 or f32"),
    }
}
