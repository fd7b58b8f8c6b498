//! SAM-B image encoder as DeepSeek-VL builds it (`sam.py`, `sam_b_downsample`): a ViT with
//! windowed and global attention and decomposed relative positions, the LayerNorm2d neck, a
//! bilinear resize to 96x96 and two stride-2 convs, plus the "HD" side path that takes the first
//! global block's output through its own neck (`neck_hd`) and the same downsamples, scaled by the
//! learned `hd_alpha_downsamples`.
//!
//! Traps reproduced here (where a plain port would differ from the reference): window blocks zero-pad the *normed* tokens to a multiple of
//! the window and do not mask the padding; relative positions use the unscaled q; the neck's
//! LayerNorm2d is plain element-wise maths; resizes run in f32.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use super::config::SamConfig;
use super::fused_attention;
use super::layers::{normalize, resize_2d, Conv2d, LayerNorm2d, PatchEmbed, ResampleMatrix};
use super::relpos_softmax::relpos_softmax;
use crate::kernels::contiguous_par;
use crate::linear::Linear;
use crate::ops::gelu_erf;

/// LayerNorm eps of every SAM norm.
const EPS: f64 = 1e-6;
/// Upper bound on one attention-score tile on the CPU, in elements (16 MiB of f32). Attention
/// is tiled over heads and query rows so tiles stay cache-friendly and below the allocator's
/// mmap threshold (a fresh multi-hundred-MB buffer per head costs more in page faults than in
/// maths).
const MAX_TILE_ELEMS_CPU: usize = 4 << 20;
/// The same bound on a GPU (1 GiB of f32 scores): there every tile costs about ten kernel
/// launches, so small tiles make the tower launch-bound (on an H200 at VL-7B dimensions the CPU
/// bound gave 48 tiles per global block per image and 11.7 images/s whatever the batch).
const MAX_TILE_ELEMS_GPU: usize = 1 << 28;

struct Attention {
    qkv: Linear,
    proj: Linear,
    /// `[S*S]` gather indices into the rel-pos tables (`i - j + S - 1`), and the tables.
    rel_index: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, heads: usize, side: usize, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / heads;
        let table = 2 * side - 1;
        let idx: Vec<u32> =
            (0..side).flat_map(|i| (0..side).map(move |j| (i + side - 1 - j) as u32)).collect();
        Ok(Self {
            qkv: crate::linear::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: crate::linear::linear(dim, dim, vb.pp("proj"))?,
            rel_index: Tensor::new(idx, vb.device())?,
            rel_pos_h: vb.get((table, head_dim), "rel_pos_h")?,
            rel_pos_w: vb.get((table, head_dim), "rel_pos_w")?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x`: `[B, S, S, C]` (a batch of windows, or whole images for global blocks).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, s2, c) = x.dims4()?;
        assert_eq!(s, s2, "SAM attention runs on square token grids");
        let n = s * s;
        let hd = c / self.heads;
        let bh = b * self.heads;
        // [B, N, 3, heads, hd] -> [3, B*heads, N, hd]
        let qkv = self.qkv.forward(&x.reshape((b, n, c))?)?;
        let qkv =
            contiguous_par(&qkv.reshape((b, n, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?)?
                .reshape((3, bh, n, hd))?;
        // Rh[i, j, :] = rel_pos_h[i - j + S - 1]: [S, S, hd].
        let rh = self.rel_pos_h.index_select(&self.rel_index, 0)?.reshape((s, s, hd))?;
        let rw = self.rel_pos_w.index_select(&self.rel_index, 0)?.reshape((s, s, hd))?;
        let out = if fused_attention::is_supported(&qkv) {
            fused_attention::fused_attention(&qkv, Some((&rh, &rw)), self.scale)?
        } else {
            let (rel_h, rel_w) = decomposed_rel_pos(&qkv.get(0)?, &rh, &rw, s)?;
            self.attention_tiled(&qkv, &rel_h, &rel_w, s)?
        };
        let out =
            contiguous_par(&out.reshape((b, self.heads, s, s, hd))?.permute((0, 2, 3, 1, 4))?)?
                .reshape((b, s, s, c))?;
        self.proj.forward(&out)
    }

    /// Portable attention from candle ops (any device and dtype), tiled over heads and query
    /// rows so no `[heads, N, N]` tensor is materialised at once.
    fn attention_tiled(
        &self,
        qkv: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        s: usize,
    ) -> Result<Tensor> {
        let (_, bh, n, _) = qkv.dims4()?;
        let q = (qkv.get(0)? * self.scale)?;
        let kt = qkv.get(1)?.t()?;
        let v = qkv.get(2)?;
        let max_tile = if qkv.device().is_cpu() { MAX_TILE_ELEMS_CPU } else { MAX_TILE_ELEMS_GPU };
        let heads_per_tile = (max_tile / (n * n)).clamp(1, bh);
        let rows_per_tile = if heads_per_tile > 1 { s } else { (max_tile / (n * s)).clamp(1, s) };
        let mut outs = Vec::with_capacity(bh.div_ceil(heads_per_tile));
        for b0 in (0..bh).step_by(heads_per_tile) {
            let nb = heads_per_tile.min(bh - b0);
            let (q, kt, v) = (q.narrow(0, b0, nb)?, kt.narrow(0, b0, nb)?, v.narrow(0, b0, nb)?);
            let (rel_h, rel_w) = (rel_h.narrow(0, b0, nb)?, rel_w.narrow(0, b0, nb)?);
            let mut rows = Vec::with_capacity(s.div_ceil(rows_per_tile));
            for h0 in (0..s).step_by(rows_per_tile) {
                let nh = rows_per_tile.min(s - h0);
                let scores = q.narrow(1, h0 * s, nh * s)?.matmul(&kt)?;
                let probs = relpos_softmax(
                    &scores,
                    &rel_h.narrow(1, h0, nh)?,
                    &rel_w.narrow(1, h0, nh)?,
                    s,
                )?;
                rows.push(probs.matmul(&v)?);
            }
            outs.push(if rows.len() == 1 {
                rows.pop().expect("one tile")
            } else {
                Tensor::cat(&rows, 1)?
            });
        }
        Tensor::cat(&outs, 0)
    }
}

/// MViTv2 decomposed relative positions on the unscaled `q`:
/// `rel_h = einsum("bhwc,hkc->bhwk", q, Rh)` and `rel_w = einsum("bhwc,wkc->bhwk", q, Rw)`,
/// both `[BH, S, S, S]`, to be added as `scores[b, (h,w), (kh,kw)] += rel_h[.., kh] + rel_w[.., kw]`.
pub(super) fn decomposed_rel_pos(
    q: &Tensor,
    rh: &Tensor,
    rw: &Tensor,
    s: usize,
) -> Result<(Tensor, Tensor)> {
    let (bh, _, hd) = q.dims3()?;
    let rq = q.reshape((bh, s, s, hd))?;
    // rel_h: batch over the query row h: [S_h, BH*S_w, hd] x [S_h, hd, S_k].
    let rel_h = rq
        .permute((1, 0, 2, 3))?
        .contiguous()?
        .reshape((s, bh * s, hd))?
        .matmul(&rh.transpose(1, 2)?)?
        .reshape((s, bh, s, s))?
        .permute((1, 0, 2, 3))?; // [BH, h, w, kh]
                                 // rel_w: batch over the query column w.
    let rel_w = rq
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((s, bh * s, hd))?
        .matmul(&rw.transpose(1, 2)?)?
        .reshape((s, bh, s, s))?
        .permute((1, 2, 0, 3))?; // [BH, h, w, kw]
    Ok((rel_h, rel_w))
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    /// 0 for global attention.
    window: usize,
}

impl Block {
    fn new(cfg: &SamConfig, window: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.width;
        let side = if window == 0 { cfg.image_size / cfg.patch_size } else { window };
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, EPS, vb.pp("norm1"))?,
            attn: Attention::new(dim, cfg.heads, side, vb.pp("attn"))?,
            norm2: candle_nn::layer_norm(dim, EPS, vb.pp("norm2"))?,
            lin1: crate::linear::linear(dim, 4 * dim, vb.pp("mlp.lin1"))?,
            lin2: crate::linear::linear(4 * dim, dim, vb.pp("mlp.lin2"))?,
            window,
        })
    }

    /// `x`: `[B, H, W, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let h = if self.window > 0 {
            let (_, hh, ww, _) = h.dims4()?;
            let (windows, padded) = window_partition(&h, self.window)?;
            window_unpartition(&self.attn.forward(&windows)?, self.window, padded, (hh, ww))?
        } else {
            self.attn.forward(&h)?
        };
        let x = (x + h)?;
        let m = self.lin2.forward(&gelu_erf(&self.lin1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + m
    }
}

/// Zero-pads `[B, H, W, C]` at the bottom/right to multiples of `ws` and cuts it into
/// `[B * nh * nw, ws, ws, C]` windows. The padding is not masked later (reference behaviour).
fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let x = if ph > 0 || pw > 0 {
        x.pad_with_zeros(1, 0, ph)?.pad_with_zeros(2, 0, pw)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + ph, w + pw);
    let windows =
        contiguous_par(&x.reshape((b, hp / ws, ws, wp / ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?)?
            .reshape(((), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let c = windows.dim(D::Minus1)?;
    let b = windows.dim(0)? / (hp / ws * (wp / ws));
    let x = contiguous_par(
        &windows.reshape((b, hp / ws, wp / ws, ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?,
    )?
    .reshape((b, hp, wp, c))?;
    if hp > h || wp > w {
        contiguous_par(&x.narrow(1, 0, h)?.narrow(2, 0, w)?)
    } else {
        Ok(x)
    }
}

/// `Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d`, no conv biases.
struct Neck {
    conv1: Conv2d,
    ln1: LayerNorm2d,
    conv2: Conv2d,
    ln2: LayerNorm2d,
}

impl Neck {
    fn new(width: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: Conv2d::no_bias(width, out, 1, Default::default(), vb.pp("0"))?,
            ln1: LayerNorm2d::new(out, EPS, vb.pp("1"))?,
            conv2: Conv2d::no_bias(out, out, 3, pad1, vb.pp("2"))?,
            ln2: LayerNorm2d::new(out, EPS, vb.pp("3"))?,
        })
    }

    /// NHWC tokens in, NCHW features out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let x = self.ln1.forward(&self.conv1.forward(&x)?)?;
        self.ln2.forward(&self.conv2.forward(&x)?)
    }
}

/// Intermediates of one SAM forward, kept for parity tests.
#[derive(Debug, Clone)]
pub struct SamOutput {
    /// Neck output, `[B, prompt_embed_dim, 64, 64]`.
    pub neck: Tensor,
    /// `downsamples(resize96(neck(blocks)))`, `[B, C_out, 24, 24]`.
    pub main_path: Tensor,
    /// `downsamples(resize96(neck_hd(first global block)))`, same shape.
    pub hd_path: Tensor,
    /// `main_path + hd_alpha * hd_path` flattened to tokens, `[B, 576, C_out]`.
    pub tokens: Tensor,
}

/// The SAM-B tower with its DeepSeek-VL neck.
pub struct SamEncoder {
    cfg: SamConfig,
    patch_embed: PatchEmbed,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck: Neck,
    neck_hd: Neck,
    downsamples: Vec<Conv2d>,
    hd_alpha: Tensor,
    resize: ResampleMatrix,
}

impl SamEncoder {
    /// Loads the tower from `vb` (prefix `...vision_tower_high.vision_tower`).
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let grid = cfg.image_size / cfg.patch_size;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let window = if cfg.global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                Block::new(cfg, window, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let stride2 = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
        let mut downsamples = Vec::new();
        let mut in_ch = cfg.prompt_embed_dim;
        for (i, &out_ch) in cfg.downsample_channels.iter().enumerate() {
            downsamples.push(Conv2d::no_bias(
                in_ch,
                out_ch,
                3,
                stride2,
                vb.pp(format!("downsamples.{i}")),
            )?);
            in_ch = out_ch;
        }
        Ok(Self {
            patch_embed: PatchEmbed::new(cfg.width, cfg.patch_size, vb.pp("patch_embed"))?,
            pos_embed: vb.get((1, grid, grid, cfg.width), "pos_embed")?,
            blocks,
            neck: Neck::new(cfg.width, cfg.prompt_embed_dim, vb.pp("neck"))?,
            neck_hd: Neck::new(cfg.width, cfg.prompt_embed_dim, vb.pp("neck_hd"))?,
            downsamples,
            hd_alpha: vb.get(1, "hd_alpha_downsamples")?,
            resize: ResampleMatrix::bilinear(grid, SamConfig::NECK_RESIZE, vb.device())?,
            cfg: cfg.clone(),
        })
    }

    fn resize_and_downsample(&self, neck: &Tensor) -> Result<Tensor> {
        let mut x = resize_2d(neck, &self.resize, &self.resize)?;
        for conv in &self.downsamples {
            x = conv.forward(&x)?;
        }
        Ok(x)
    }

    /// `[B, 3, S, S]` pixels in `[0, 1]` to SAM tokens and intermediates.
    pub fn forward(&self, pixels: &Tensor) -> Result<SamOutput> {
        let x = match &self.cfg.normalize {
            Some(n) => normalize(pixels, n)?,
            None => pixels.clone(),
        };
        let mut x = self.patch_embed.forward(&x)?.broadcast_add(&self.pos_embed)?;
        let mut first_global = None;
        for block in &self.blocks {
            x = block.forward(&x)?;
            if block.window == 0 && first_global.is_none() {
                first_global = Some(x.clone());
            }
        }
        let first_global = first_global.expect("config validation guarantees a global block");
        let neck = self.neck.forward(&x)?;
        let main_path = self.resize_and_downsample(&neck)?;
        let hd_path = self.resize_and_downsample(&self.neck_hd.forward(&first_global)?)?;
        let merged = main_path.broadcast_add(&hd_path.broadcast_mul(&self.hd_alpha)?)?;
        let tokens = merged.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        Ok(SamOutput { neck, main_path, hd_path, tokens })
    }
}
