//! Every path against scalar references that round with `half`'s own conversion (an
//! independent implementation of round-to-nearest-even) at the reference's rounding points.

use half::bf16;

use super::*;
use crate::kernels::tests::{paths, values};

fn bf16s(n: usize, seed: usize) -> Vec<bf16> {
    values(n, seed).iter().map(|&v| bf16::from_f32(v * 3.0)).collect()
}

/// `half`'s rounding: the reference's `bf16(x)` for these tests.
fn r(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Within one bf16 step of `want` (for results whose f32 part differs from the reference's in
/// the last bits: a mean summed in another order, an `exp` 1-2 ulp off).
fn near(got: bf16, want: f32) -> bool {
    (got.to_f32() - want).abs() <= want.abs() * 2f32.powi(-7) + 1e-30
}

#[test]
fn narrowing_matches_half_including_ties_infinities_and_nan() {
    let mut xs: Vec<f32> = values(10_000, 21).iter().map(|v| v * 1e3).collect();
    // Exact ties (round to even, both ways), the largest finite values, infinities, zeros.
    xs.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::MAX, -f32::MAX]);
    xs.extend([f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MIN_POSITIVE, 1e-40]);
    for x in xs {
        assert_eq!(narrow(x).to_bits(), bf16::from_f32(x).to_bits(), "{x:e}");
    }
    assert!(narrow(f32::NAN).is_nan() && narrow(-f32::NAN).is_nan());
}

#[test]
fn add_matches_the_rounded_sum_on_every_path() {
    let (a, b) = (bf16s(40_003, 1), bf16s(40_003, 2));
    for isa in paths() {
        let mut dst = vec![bf16::ZERO; a.len()];
        add_bf16_with(isa, &mut dst, &a, &b);
        for i in 0..a.len() {
            assert_eq!(dst[i].to_f32(), r(a[i].to_f32() + b[i].to_f32()), "{isa:?} at {i}");
        }
    }
}

#[test]
fn silu_mul_rounds_where_pytorch_does_on_every_path() {
    let (mut gate, up) = (bf16s(40_037, 3), bf16s(40_042, 4));
    gate.extend([-120.0, -88.0, 0.0, 88.0, 120.0].map(bf16::from_f32));
    for isa in paths() {
        let mut dst = vec![bf16::ZERO; gate.len()];
        silu_mul_bf16_with(isa, &mut dst, &gate, &up);
        for ((&got, &g), &u) in dst.iter().zip(&gate).zip(&up) {
            let g = g.to_f32();
            let want = r(r(g / (1.0 + (-g).exp())) * u.to_f32());
            assert!(near(got, want), "{isa:?} silu({g}) * {u}: {got} vs {want}");
        }
    }
}

#[test]
fn rms_norm_rounds_before_the_weight_on_every_path() {
    for dim in [1, 7, 16, 33, 2048] {
        let (src, weight) = (bf16s(5 * dim, dim), bf16s(dim, 7));
        for isa in paths() {
            let mut dst = vec![bf16::ZERO; src.len()];
            rms_norm_bf16_with(isa, &mut dst, &src, &weight, 1e-6);
            for (d, s) in dst.chunks(dim).zip(src.chunks(dim)) {
                let ms = s.iter().map(|v| f64::from(v.to_f32()).powi(2)).sum::<f64>() / dim as f64;
                let inv = (1.0 / (ms + 1e-6).sqrt()) as f32;
                for i in 0..dim {
                    let want = r(weight[i].to_f32() * r(s[i].to_f32() * inv));
                    assert!(near(d[i], want), "{isa:?} dim {dim} at {i}: {} vs {want}", d[i]);
                }
            }
        }
    }
}

#[test]
fn rope_rounds_each_product_and_the_sum_on_every_path() {
    let (rows, heads, d, max_pos) = (6, 3, 64, 40);
    let x = bf16s(rows * heads * d, 13);
    let (cos, sin) = (bf16s(max_pos * d, 14), bf16s(max_pos * d, 15));
    let positions: Vec<u32> = vec![0, 39, 7, 7, 12, 1];
    for isa in paths() {
        let mut dst = vec![bf16::ZERO; x.len()];
        rope_bf16_with(isa, &mut dst, &x, &cos, &sin, &positions, heads);
        for (row, &pos) in positions.iter().enumerate() {
            let p = pos as usize * d;
            for h in 0..heads {
                let o = (row * heads + h) * d;
                for i in 0..d {
                    let rot = if i < d / 2 { -x[o + i + d / 2] } else { x[o + i - d / 2] };
                    let want = r(r(x[o + i].to_f32() * cos[p + i].to_f32())
                        + r(rot.to_f32() * sin[p + i].to_f32()));
                    assert_eq!(dst[o + i].to_f32(), want, "{isa:?} row {row} head {h} dim {i}");
                }
            }
        }
    }
}
