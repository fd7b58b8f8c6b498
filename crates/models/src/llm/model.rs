//! The DeepSeek LLM decoder (LLaMA architecture) with tensor parallelism.
//!
//! One forward call runs a *batch of chunks*: each chunk is a run of new tokens of one sequence
//! (a whole prompt, part of a prompt, or a single decode token) at known positions. All chunks'
//! tokens go through the linears together as one `[N, hidden]` matrix (that is what continuous
//! batching buys), and so does attention: one paged-attention call per layer for the whole
//! step, over the keys and values in the pool ([`PagedKv`]), with the step's metadata
//! ([`super::step::StepMeta`]) built once and shared by every layer.
//!
//! Per layer: `h += o_proj(attn(rope(q), rope(k), v))`, all-reduced over ranks after
//! `o_proj`; `h += down(silu(gate(n)) * up(n))`, all-reduced after `down_proj`. Logits are f32.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use dsvl_parallel::Communicator;

use super::layers::{
    bf16_on_cpu, residual_add, with_cpu_slice, FusedColumns, Linear, RmsNorm, Rope, Shard,
    VocabEmbedding,
};
use super::paged_kv::PagedKv;
use super::step::StepMeta;
use crate::ModelError;
use dsvl_checkpoint::LlmConfig;

/// Identifies a sequence across steps (and across ranks: every rank keeps its own shard of the
/// same sequence's keys and values under the same id).
pub type SeqId = u64;

/// Which logits rows a chunk returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitRows {
    /// Its last token's (the next token is chosen from it).
    #[default]
    Last,
    /// Every token's (parity checks).
    All,
    /// None (a prefill chunk that does not end the prompt).
    None,
}

impl LogitRows {
    /// Rows returned for a chunk of `tokens` tokens.
    pub fn count(self, tokens: usize) -> usize {
        match self {
            Self::Last => 1,
            Self::All => tokens,
            Self::None => 0,
        }
    }
}

/// New tokens of one sequence in one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqChunk {
    /// Which sequence.
    pub seq: SeqId,
    /// Token ids to append.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` (= tokens already cached for this sequence).
    pub start: usize,
    /// Which logits rows to return.
    #[serde(default)]
    pub logits: LogitRows,
    /// The blocks holding this sequence, in order (enough for `start + tokens.len()`).
    pub blocks: Vec<u32>,
}

struct Attention {
    /// `q`, `k` and `v` as one product.
    qkv: FusedColumns<3>,
    o: Linear,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn new(cfg: &LlmConfig, shard: Shard, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (h, d, hidden) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
        let heads = h / shard.world;
        // GQA rule (vLLM's QKVParallelLinear): with more ranks than KV heads each rank holds one
        // KV head, replicated; rank r takes head r / (world / kv).
        let kv_heads = kv_heads_per_rank(cfg, shard.world);
        let kv_first = if shard.world >= cfg.num_kv_heads {
            shard.rank / (shard.world / cfg.num_kv_heads)
        } else {
            shard.rank * kv_heads
        };
        let kv_rows = (kv_first * d, kv_heads * d);
        Ok(Self {
            qkv: FusedColumns::new(
                vb,
                [
                    ("q_proj.weight", (h * d, hidden), (shard.rank * heads * d, heads * d)),
                    ("k_proj.weight", (cfg.num_kv_heads * d, hidden), kv_rows),
                    ("v_proj.weight", (cfg.num_kv_heads * d, hidden), kv_rows),
                ],
            )?,
            o: Linear::row(
                vb,
                "o_proj.weight",
                (hidden, h * d),
                (shard.rank * heads * d, heads * d),
            )?,
            heads,
            kv_heads,
        })
    }
}

/// KV heads each of `world` ranks holds: an equal share, or one (replicated) when ranks
/// outnumber the model's KV heads.
pub fn kv_heads_per_rank(cfg: &LlmConfig, world: usize) -> usize {
    if world >= cfg.num_kv_heads {
        1
    } else {
        cfg.num_kv_heads / world
    }
}

struct Mlp {
    /// `gate` and `up` as one product.
    gate_up: FusedColumns<2>,
    down: Linear,
}

impl Mlp {
    fn new(cfg: &LlmConfig, shard: Shard, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (i, h) = (cfg.intermediate_size, cfg.hidden_size);
        let part = shard.range(i);
        Ok(Self {
            gate_up: FusedColumns::new(
                vb,
                [("gate_proj.weight", (i, h), part), ("up_proj.weight", (i, h), part)],
            )?,
            down: Linear::row(vb, "down_proj.weight", (h, i), part)?,
        })
    }

    /// Partial `down(silu(gate(x)) * up(x))` of this rank (to be all-reduced).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up.joint(x)?;
        #[cfg(feature = "cuda")]
        if gate_up.device().is_cuda() && crate::cuda::decoder::supports_dtype(gate_up.dtype()) {
            return self.down.forward(&crate::cuda::decoder::silu_mul(&gate_up)?);
        }
        let [gate, up] = self.gate_up.split(&gate_up)?;
        let act = if x.device().is_cpu() && x.dtype() == DType::F32 {
            // One fused, vectorised pass instead of candle's scalar SiLU and a multiply.
            let mut out = vec![0f32; gate.elem_count()];
            with_cpu_slice(&gate.contiguous()?, |g: &[f32]| {
                with_cpu_slice(&up.contiguous()?, |u: &[f32]| {
                    crate::kernels::silu_mul(&mut out, g, u)
                })
            })??;
            Tensor::from_vec(out, gate.shape(), gate.device())?
        } else if bf16_on_cpu(&[&gate, &up]) {
            // bf16: SiLU in f32 rounded once, then the product (PyTorch's rounding points).
            let mut out = vec![half::bf16::ZERO; gate.elem_count()];
            with_cpu_slice(&gate.contiguous()?, |g: &[half::bf16]| {
                with_cpu_slice(&up.contiguous()?, |u: &[half::bf16]| {
                    crate::kernels::silu_mul_bf16(&mut out, g, u)
                })
            })??;
            Tensor::from_vec(out, gate.shape(), gate.device())?
        } else {
            (candle_nn::ops::silu(&gate)? * up)?
        };
        self.down.forward(&act)
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// The decoder: this rank's shard of every weight.
pub struct DeepSeekLlm {
    cfg: LlmConfig,
    shard: Shard,
    embed: VocabEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl DeepSeekLlm {
    /// Builds this rank's shard from a `VarBuilder` rooted at the checkpoint.
    pub fn new(cfg: &LlmConfig, shard: Shard, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = if cfg.prefix.is_empty() { vb } else { vb.pp(cfg.prefix.trim_end_matches('.')) };
        let m = vb.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = VocabEmbedding::new(&m, "embed_tokens.weight", (v, h), shard)?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_norm: RmsNorm::new(&l, "input_layernorm.weight", h, cfg.rms_norm_eps)?,
                    attn: Attention::new(cfg, shard, &l.pp("self_attn"))?,
                    post_norm: RmsNorm::new(
                        &l,
                        "post_attention_layernorm.weight",
                        h,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::new(cfg, shard, &l.pp("mlp"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::column(&m, "embed_tokens.weight", (v, h), shard.range(v))?
        } else {
            Linear::column(&vb, "lm_head.weight", (v, h), shard.range(v))?
        };
        Ok(Self {
            norm: RmsNorm::new(&m, "norm.weight", h, cfg.rms_norm_eps)?,
            rope: Rope::new(
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                vb.dtype(),
                vb.device(),
            )?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
            shard,
            embed,
            layers,
            lm_head,
        })
    }

    /// The resolved config.
    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// This rank's shard.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// Working dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// KV heads this rank holds (one, replicated, when ranks outnumber the model's KV heads).
    pub fn local_kv_heads(&self) -> usize {
        self.layers.first().map_or(0, |l| l.attn.kv_heads)
    }

    /// Bytes of KV cache one token takes on this rank.
    pub fn kv_bytes_per_token(&self) -> u64 {
        super::paged_kv::kv_bytes_per_token(
            self.cfg.num_layers,
            self.local_kv_heads(),
            self.cfg.head_dim,
            self.dtype,
        )
    }

    /// A KV pool of geometry `cfg` for this shard, on its device and in its dtype.
    ///
    /// # Errors
    /// An empty geometry, or the device is out of memory.
    pub fn kv_pool(&self, cfg: super::PagedKvConfig) -> Result<PagedKv, ModelError> {
        Ok(PagedKv::new(
            cfg,
            self.cfg.num_layers,
            self.local_kv_heads(),
            self.cfg.head_dim,
            self.dtype,
            &self.device,
        )?)
    }

    /// Token embeddings `[N, hidden]` (all-reduced over the vocabulary shards).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for an id outside the vocabulary.
    pub fn embed(&self, ids: &[u32], comm: &dyn Communicator) -> Result<Tensor, ModelError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let local = self.embed.forward(ids)?;
        Ok(comm.all_reduce_sum(&local)?)
    }

    /// Checks a step before any collective runs, so every rank fails (or not) identically.
    pub fn validate(&self, chunks: &[SeqChunk]) -> Result<(), ModelError> {
        for c in chunks {
            if c.tokens.is_empty() {
                return Err(ModelError::InvalidInput(format!("sequence {}: empty chunk", c.seq)));
            }
            let end = c.start + c.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return Err(ModelError::InvalidInput(format!(
                    "sequence {} would reach position {end}, beyond the model's {} positions",
                    c.seq, self.cfg.max_position_embeddings
                )));
            }
            if let Some(bad) = c.tokens.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
                return Err(ModelError::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Runs the layers on `embeds` (`[N, hidden]`, the chunks' tokens in order) and returns f32
    /// logits: per chunk in order, the rows its [`LogitRows`] asks for.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        chunks: &[SeqChunk],
        kv: &PagedKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        self.validate(chunks)?;
        let n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if embeds.dims() != [n, self.cfg.hidden_size] {
            return Err(ModelError::InvalidInput(format!(
                "embeddings {:?}, expected [{n}, {}]",
                embeds.dims(),
                self.cfg.hidden_size
            )));
        }
        // Built once for the step; every layer shares it.
        let meta = kv.step_meta(chunks, &self.device)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        let d = self.cfg.head_dim;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let q = self.rope_and_store(&layer.attn, &h, &meta, kv, li)?;
            let attn = kv.attend(li, &meta, &q, scale)?;
            x = residual_add(&x, &comm.all_reduce_sum(&layer.attn.o.forward(&attn)?)?)?;
            let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
            x = residual_add(&x, &comm.all_reduce_sum(&m)?)?;
        }
        let mut rows = Vec::new();
        let mut off = 0u32;
        for c in chunks {
            let t = c.tokens.len() as u32;
            let r = c.logits.count(c.tokens.len()) as u32;
            rows.extend(off + t - r..off + t);
            off += t;
        }
        if rows.is_empty() {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        let x = x.index_select(&Tensor::new(rows, &self.device)?, 0)?;
        let local = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(comm.all_gather_last_dim(&local)?.to_dtype(DType::F32)?)
    }

    /// One layer's attention inputs from its normalised rows `h`: `q` rotated (`[N, heads,
    /// head_dim]`, returned), `k` rotated and `v` written into the layer's pool. On CUDA (bf16,
    /// f32) three launches of one kernel of ours straight from the fused projection's rows;
    /// elsewhere op by op.
    fn rope_and_store(
        &self,
        attn: &Attention,
        h: &Tensor,
        meta: &StepMeta,
        kv: &PagedKv,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (n, hl, kvl, d) = (h.dim(0)?, attn.heads, attn.kv_heads, self.cfg.head_dim);
        #[cfg(feature = "cuda")]
        if h.device().is_cuda() && crate::cuda::decoder::supports(h.dtype(), d) {
            return kv.rope_and_store(layer, meta, &attn.qkv.joint(h)?, &self.rope, (hl, kvl, d));
        }
        let pos = &meta.positions;
        let [q, k, v] = attn.qkv.forward(h)?;
        let q = self.rope.apply(&q.reshape((n, hl, d))?, pos)?;
        let k = self.rope.apply(&k.reshape((n, kvl, d))?, pos)?;
        kv.write(layer, meta, &k, &v.reshape((n, kvl, d))?)?;
        Ok(q)
    }

    /// Embeds the chunks' tokens, puts `image` rows at their positions, and runs
    /// [`Self::forward_embeds`].
    pub fn forward(
        &self,
        chunks: &[SeqChunk],
        image: Option<&ImageRows>,
        kv: &PagedKv,
        comm: &dyn Communicator,
    ) -> Result<Tensor, ModelError> {
        self.validate(chunks)?;
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let mut embeds = self.embed(&ids, comm)?;
        if let Some(image) = image {
            embeds = splice_rows_at(&embeds, &image.positions, &image.rows)?;
        }
        self.forward_embeds(&embeds, chunks, kv, comm)
    }
}

/// Image embedding rows and the token positions (in the step's concatenated tokens, ascending)
/// they replace.
#[derive(Debug, Clone)]
pub struct ImageRows {
    /// Where each row goes.
    pub positions: Vec<u32>,
    /// `[positions.len(), hidden]`.
    pub rows: Tensor,
}

impl ImageRows {
    /// Rows for every position of `ids` that holds `image_token`, in order (what the
    /// reference's `inputs_embeds[images_seq_mask] = images_embeds` does).
    ///
    /// # Errors
    /// When the number of image-token positions differs from the number of rows.
    pub fn for_image_tokens(
        ids: &[u32],
        image_token: u32,
        rows: Tensor,
    ) -> Result<Self, ModelError> {
        let positions: Vec<u32> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == image_token)
            .map(|(i, _)| i as u32)
            .collect();
        let m = rows.dim(0)?;
        if positions.len() != m {
            return Err(ModelError::InvalidInput(format!(
                "the prompt has {} image-token positions but {m} image embedding rows were given",
                positions.len()
            )));
        }
        Ok(Self { positions, rows })
    }
}

/// Replaces, in order, the rows of `embeds` whose id is `image_token` by the rows of `images`
/// (`[M, hidden]`). The counts must match exactly.
///
/// # Errors
/// [`ModelError::InvalidInput`] on a count or width mismatch.
pub fn splice_image_rows(
    embeds: &Tensor,
    ids: &[u32],
    image_token: u32,
    images: &Tensor,
) -> Result<Tensor, ModelError> {
    let rows = ImageRows::for_image_tokens(ids, image_token, images.clone())?;
    splice_rows_at(embeds, &rows.positions, &rows.rows)
}

/// Replaces row `positions[i]` of `embeds` by row `i` of `rows` (positions ascending).
///
/// # Errors
/// [`ModelError::InvalidInput`] for a count, width or position mismatch.
pub fn splice_rows_at(
    embeds: &Tensor,
    positions: &[u32],
    rows: &Tensor,
) -> Result<Tensor, ModelError> {
    let (m, hidden) = rows.dims2()?;
    let n = embeds.dim(0)?;
    if positions.len() != m {
        return Err(ModelError::InvalidInput(format!(
            "{} image positions but {m} image embedding rows",
            positions.len()
        )));
    }
    if hidden != embeds.dim(D::Minus1)? {
        return Err(ModelError::InvalidInput(format!(
            "image embeddings are {hidden} wide, the model is {}",
            embeds.dim(D::Minus1)?
        )));
    }
    if positions.windows(2).any(|w| w[0] >= w[1])
        || positions.last().is_some_and(|&p| p as usize >= n)
    {
        return Err(ModelError::InvalidInput(
            "image positions must be ascending and inside the step".into(),
        ));
    }
    if m == 0 {
        return Ok(embeds.clone());
    }
    let rows = rows.to_dtype(embeds.dtype())?.to_device(embeds.device())?;
    // Rebuild as alternating runs of text rows and image rows.
    let mut parts = Vec::new();
    let (mut next, mut i) = (0usize, 0usize);
    while i < m {
        let p = positions[i] as usize;
        if p > next {
            parts.push(embeds.narrow(0, next, p - next)?);
        }
        let run =
            positions[i..].iter().enumerate().take_while(|(j, &q)| q as usize == p + j).count();
        parts.push(rows.narrow(0, i, run)?);
        next = p + run;
        i += run;
    }
    if next < n {
        parts.push(embeds.narrow(0, next, n - next)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
