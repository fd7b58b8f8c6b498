//! `y = x Wᵀ` for one or a few rows of `x`: the linears of a small-batch decode step, which are
//! bound by reading the weights, not by arithmetic. Each weight row is streamed from memory
//! once, blocks of rows in parallel, and multiplied with every row of `x` while it sits in L1;
//! nothing is repacked. In bf16 the weights stay bf16, so a step reads half the bytes of f32:
//! on processors with AVX512_BF16 the products run as `vdpbf16ps` (pairs of bf16 multiplied and
//! summed into f32 lanes), elsewhere each bf16 is widened to f32 (a 16-bit shift) on the fly.
//! Both accumulate in f32, as PyTorch's bf16 linear does.

use half::bf16;
use rayon::prelude::*;

use crate::isa::{on_isa, Isa};

/// Weight rows per parallel task.
const BLOCK: usize = 64;

/// Runs `block(out, w_rows)` for blocks of `BLOCK` weight rows in parallel and assembles the
/// `[m, n]` result (`out` of a block is `[m, rows]`).
fn by_row_blocks<W: Sync>(
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    block: impl Fn(&mut [f32], &[W]) + Sync,
) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "weight is not [n, k]");
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * BLOCK;
            let rows = BLOCK.min(n - r0);
            let mut out = vec![0f32; m * rows];
            block(&mut out, &w[r0 * k..(r0 + rows) * k]);
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (b, part) in parts.iter().enumerate() {
        let r0 = b * BLOCK;
        let rows = part.len() / m;
        for i in 0..m {
            y[i * n + r0..i * n + r0 + rows].copy_from_slice(&part[i * rows..(i + 1) * rows]);
        }
    }
    y
}

/// A weight element: f32, or bf16 widened to f32 on the fly (a 16-bit shift; exact).
pub(crate) trait Weight: Copy + Send + Sync {
    /// The value as f32.
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// Weight rows streamed together: independent accumulators and four memory streams in
/// flight keep a core's loads busy where one row at a time waits on each cache miss.
const ROWS: usize = 4;

/// Dot products of one `x` row with `ROWS` weight rows.
#[inline(always)]
fn dot_rows<const L: usize, W: Weight>(x: &[f32], w: [&[W]; ROWS]) -> [f32; ROWS] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
    let chunks = x
        .chunks_exact(L)
        .zip(w[0].chunks_exact(L))
        .zip(w[1].chunks_exact(L))
        .zip(w[2].chunks_exact(L))
        .zip(w[3].chunks_exact(L));
    for ((((xs, w0), w1), w2), w3) in chunks {
        for l in 0..L {
            a0[l] += xs[l] * w0[l].widen();
            a1[l] += xs[l] * w1[l].widen();
            a2[l] += xs[l] * w2[l].widen();
            a3[l] += xs[l] * w3[l].widen();
        }
    }
    let whole = x.len() / L * L;
    let mut out = [a0, a1, a2, a3].map(|a| a.iter().sum::<f32>());
    for (o, w) in out.iter_mut().zip(&w) {
        *o += (whole..x.len()).map(|t| x[t] * w[t].widen()).sum::<f32>();
    }
    out
}

/// One dot product.
#[inline(always)]
fn dot_one<const L: usize, W: Weight>(x: &[f32], w: &[W]) -> f32 {
    let mut acc = [0f32; L];
    let mut cx = x.chunks_exact(L);
    let mut cw = w.chunks_exact(L);
    for (a, b) in (&mut cx).zip(&mut cw) {
        for l in 0..L {
            acc[l] += a[l] * b[l].widen();
        }
    }
    let tail: f32 = cx.remainder().iter().zip(cw.remainder()).map(|(a, &b)| a * b.widen()).sum();
    acc.iter().sum::<f32>() + tail
}

/// `out` (`[m, rows]`) = `x` (`[m, k]`) times this block's weight rows (`[rows, k]`).
#[inline(always)]
fn gemv_block_impl<const L: usize, W: Weight>(out: &mut [f32], x: &[f32], w_rows: &[W], k: usize) {
    let rows = w_rows.len() / k;
    let m = x.len() / k;
    let mut j = 0;
    while j + ROWS <= rows {
        let w: [&[W]; ROWS] = std::array::from_fn(|r| &w_rows[(j + r) * k..(j + r + 1) * k]);
        for i in 0..m {
            let y = dot_rows::<L, W>(&x[i * k..][..k], w);
            out[i * rows + j..i * rows + j + ROWS].copy_from_slice(&y);
        }
        j += ROWS;
    }
    for j in j..rows {
        for i in 0..m {
            out[i * rows + j] = dot_one::<L, W>(&x[i * k..][..k], &w_rows[j * k..(j + 1) * k]);
        }
    }
}

/// `[m, k] x [n, k]ᵀ -> [m, n]` in f32.
pub fn gemv(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    gemv_with(Isa::current(), x, w, m, n, k)
}

/// [`gemv`] on the path `isa`.
pub fn gemv_with(isa: Isa, x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    by_row_blocks(w, m, n, k, |out, w_rows| {
        on_isa!(isa, <L> |out: &mut [f32], x: &[f32], w_rows: &[f32], k: usize| -> () {
            gemv_block_impl::<L, f32>(out, x, w_rows, k)
        })
    })
}

/// How a bf16 GEMV multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// Widen each weight to f32 and use f32 FMAs of this width.
    Widen(Isa),
    /// AVX512_BF16 `vdpbf16ps`: 32 bf16 products per instruction.
    Avx512Bf16,
}

impl Bf16Path {
    /// The fastest path for `isa` (lowered to the processor) on this processor.
    pub fn for_isa(isa: Isa) -> Self {
        if isa.usable() == Isa::Avx512 && has_avx512_bf16() {
            Self::Avx512Bf16
        } else {
            Self::Widen(isa.usable())
        }
    }

    /// Every path this processor can run: what the tests go through.
    pub fn supported() -> Vec<Self> {
        let mut paths: Vec<Self> = Isa::supported().into_iter().map(Self::Widen).collect();
        if has_avx512_bf16() && Isa::best() == Isa::Avx512 {
            paths.push(Self::Avx512Bf16);
        }
        paths
    }

    /// A short name for logs and benchmark output.
    pub fn name(self) -> String {
        match self {
            Self::Widen(isa) => format!("{}-widen", isa.name()),
            Self::Avx512Bf16 => "avx512-bf16".into(),
        }
    }
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `[m, k] x [n, k]ᵀ -> [m, n]` with bf16 weights and f32 accumulation. `x` holds bf16 values
/// widened to f32 (the activations of a bf16 model); the `vdpbf16ps` path rounds `x` to bf16,
/// which is exact for such values.
pub fn gemv_bf16(x: &[f32], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    gemv_bf16_with(Bf16Path::for_isa(Isa::current()), x, w, m, n, k)
}

/// [`gemv_bf16`] on the path `path`.
pub fn gemv_bf16_with(
    path: Bf16Path,
    x: &[f32],
    w: &[bf16],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    match path {
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Avx512Bf16 if has_avx512_bf16() && Isa::best() == Isa::Avx512 => {
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            by_row_blocks(w, m, n, k, |out, w_rows| {
                // SAFETY: the processor has AVX-512 F/VL and BF16 (checked just above).
                unsafe { dpbf16::gemv_block(out, &xb, w_rows, k) }
            })
        }
        Bf16Path::Widen(isa) => by_row_blocks(w, m, n, k, |out, w_rows| {
            on_isa!(isa, <L> |out: &mut [f32], x: &[f32], w_rows: &[bf16], k: usize| -> () {
                gemv_block_impl::<L, bf16>(out, x, w_rows, k)
            })
        }),
        // `Avx512Bf16` asked for on a processor without it.
        _ => gemv_bf16_with(Bf16Path::for_isa(Isa::Avx2), x, w, m, n, k),
    }
}

#[cfg(target_arch = "x86_64")]
mod dpbf16 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::Weight;

    /// 32 bf16 from `p` as a `vdpbf16ps` operand.
    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m512bh {
        // SAFETY (caller): 64 readable bytes at `p`; __m512bh and __m512i are both 64 bytes.
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
    }

    #[target_feature(enable = "avx512bf16,avx512f,avx512vl,avx2,fma")]
    unsafe fn dot(x: &[bf16], w: &[bf16]) -> f32 {
        let k = x.len().min(w.len());
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // Two independent accumulators hide the instruction's latency.
        while i + 64 <= k {
            a0 = _mm512_dpbf16_ps(a0, load(x.as_ptr().add(i)), load(w.as_ptr().add(i)));
            a1 = _mm512_dpbf16_ps(a1, load(x.as_ptr().add(i + 32)), load(w.as_ptr().add(i + 32)));
            i += 64;
        }
        if i + 32 <= k {
            a0 = _mm512_dpbf16_ps(a0, load(x.as_ptr().add(i)), load(w.as_ptr().add(i)));
            i += 32;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        for t in i..k {
            sum += x[t].widen() * w[t].widen();
        }
        sum
    }

    /// One block of weight rows against every row of `x` (`[m, k]`, bf16).
    #[target_feature(enable = "avx512bf16,avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn gemv_block(out: &mut [f32], x: &[bf16], w_rows: &[bf16], k: usize) {
        let rows = w_rows.len() / k;
        let m = x.len() / k;
        for (j, w) in w_rows.chunks_exact(k).enumerate() {
            for i in 0..m {
                out[i * rows + j] = dot(&x[i * k..][..k], w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{paths, values};

    const SHAPES: [(usize, usize, usize); 5] =
        [(1, 130, 37), (3, 65, 16), (2, 200, 4099), (1, 7, 1), (8, 70, 2048)];

    fn naive(x: &[f32], w: impl Fn(usize) -> f64, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| f64::from(x[i * k + t]) * w(j * k + t)).sum();
            }
        }
        y
    }

    #[test]
    fn gemv_matches_naive_product_on_every_path() {
        // Lengths with tails of every lane count (8 and 16) and several row blocks.
        for (m, n, k) in SHAPES {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let want = naive(&x, |i| f64::from(w[i]), (m, n, k));
            for isa in paths() {
                let y = gemv_with(isa, &x, &w, m, n, k);
                for (idx, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() < 1e-5 * k as f64,
                        "{isa:?} {m}x{n}x{k} at {idx}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_gemv_matches_naive_product_on_every_path() {
        let paths = Bf16Path::supported();
        eprintln!("bf16 paths run here: {paths:?}");
        for (m, n, k) in SHAPES {
            // Activations of a bf16 model: bf16 values carried as f32.
            let x: Vec<f32> =
                values(m * k, 3).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let w: Vec<bf16> = values(n * k, 4).iter().map(|&v| bf16::from_f32(v)).collect();
            let want = naive(&x, |i| f64::from(w[i].to_f32()), (m, n, k));
            for &path in &paths {
                let y = gemv_bf16_with(path, &x, &w, m, n, k);
                for (idx, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() < 1e-5 * k as f64,
                        "{path:?} {m}x{n}x{k} at {idx}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Bandwidth of each path on a decoder-sized weight (FFN 5632 x 2048 and back, 92 MB in
    /// f32): `cargo nextest run -p dsvl-models --run-ignored only gemv_bandwidth --no-capture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn gemv_bandwidth() {
        let (n, k) = (131_072, 2048);
        let x = values(k, 1);
        let w = values(n * k, 2);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let time = |f: &dyn Fn() -> Vec<f32>, bytes: usize| {
            f();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                std::hint::black_box(f());
            }
            bytes as f64 * 10.0 / t.elapsed().as_secs_f64() / 1e9
        };
        for isa in paths() {
            let gbs = time(&|| gemv_with(isa, &x, &w, 1, n, k), n * k * 4);
            eprintln!("f32 {isa:?}: {gbs:.1} GB/s");
            let one_row = || {
                by_row_blocks(&w, 1, n, k, |out, w_rows| {
                    let xs: &[f32] = &x;
                    on_isa!(isa, <L> |out: &mut [f32], xs: &[f32], w_rows: &[f32], k: usize| -> () {
                        for (o, r) in out.iter_mut().zip(w_rows.chunks_exact(k)) {
                            *o = dot_one::<L, f32>(xs, r);
                        }
                    })
                })
            };
            eprintln!("f32 {isa:?} one row at a time: {:.1} GB/s", time(&one_row, n * k * 4));
        }
        for path in Bf16Path::supported() {
            let gbs = time(&|| gemv_bf16_with(path, &x, &wb, 1, n, k), n * k * 2);
            eprintln!("bf16 {}: {gbs:.1} GB/s", path.name());
        }
    }

    #[test]
    fn the_bf16_path_follows_the_processor() {
        assert_eq!(Bf16Path::for_isa(Isa::Scalar), Bf16Path::Widen(Isa::Scalar));
        let best = Bf16Path::for_isa(Isa::best());
        assert!(Bf16Path::supported().contains(&best));
        assert_eq!(best == Bf16Path::Avx512Bf16, has_avx512_bf16() && Isa::best() == Isa::Avx512);
        eprintln!("best bf16 path here: {}", best.name());
    }
}
