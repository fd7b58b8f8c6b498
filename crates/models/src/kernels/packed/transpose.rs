//! A block of rows of `x` turned into the step-major layout the FMA tiles read (`[k][rows]`):
//! the linears' per-call packing of their input.
//!
//! Element by element this was a scalar load and a strided scalar store per value, about 4.5
//! cycles each: 5.7 % of a VL-7B vision encode on an AMD Zen 5, where every product has a few
//! thousand rows and the weight a few hundred to a few thousand columns. Here groups of four
//! rows go through 4 x 4 transposes in SSE registers (the x86-64 baseline, so every path has
//! them), 16 steps at a time so the block's writes stay in L1; the rows left over (a block of
//! fewer than a multiple of four) and other targets copy value by value.

/// Steps per pass: the written part of the block (`16 * rows` values) stays in L1.
const STEPS: usize = 16;

/// `dst[t * rows + i] = src[i * k + t]` for `t < k`, `i < rows`.
pub(super) fn rows_to_steps(src: &[f32], k: usize, rows: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * k && dst.len() >= k * rows, "block is not [rows, k]");
    for t0 in (0..k).step_by(STEPS) {
        let steps = STEPS.min(k - t0);
        let grouped = if cfg!(target_arch = "x86_64") { rows / 4 * 4 } else { 0 };
        #[cfg(target_arch = "x86_64")]
        for g in (0..grouped).step_by(4) {
            // SAFETY: rows `g..g + 4` and steps `t0..t0 + steps` are inside `src` and `dst`
            // (asserted above); the 4 x 4 blocks below stay inside those ranges.
            unsafe { four_rows(src.as_ptr(), k, rows, g, t0, steps, dst.as_mut_ptr()) };
        }
        for i in grouped..rows {
            let row = &src[i * k + t0..][..steps];
            for (t, &v) in row.iter().enumerate() {
                dst[(t0 + t) * rows + i] = v;
            }
        }
    }
}

/// Rows `g..g + 4`, steps `t0..t0 + steps`, four steps at a time through a 4 x 4 transpose
/// (the last `steps % 4` one by one).
///
/// # Safety
/// `src` holds `rows * k` values and `dst` `k * rows`, `g + 4 <= rows`, `t0 + steps <= k`.
#[cfg(target_arch = "x86_64")]
unsafe fn four_rows(
    src: *const f32,
    k: usize,
    rows: usize,
    g: usize,
    t0: usize,
    steps: usize,
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    let row = |i: usize| src.add((g + i) * k + t0);
    let out = |t: usize| dst.add((t0 + t) * rows + g);
    let whole = steps / 4 * 4;
    for t in (0..whole).step_by(4) {
        let (a, b) = (_mm_loadu_ps(row(0).add(t)), _mm_loadu_ps(row(1).add(t)));
        let (c, d) = (_mm_loadu_ps(row(2).add(t)), _mm_loadu_ps(row(3).add(t)));
        let (ab_lo, cd_lo) = (_mm_unpacklo_ps(a, b), _mm_unpacklo_ps(c, d));
        let (ab_hi, cd_hi) = (_mm_unpackhi_ps(a, b), _mm_unpackhi_ps(c, d));
        _mm_storeu_ps(out(t), _mm_movelh_ps(ab_lo, cd_lo));
        _mm_storeu_ps(out(t + 1), _mm_movehl_ps(cd_lo, ab_lo));
        _mm_storeu_ps(out(t + 2), _mm_movelh_ps(ab_hi, cd_hi));
        _mm_storeu_ps(out(t + 3), _mm_movehl_ps(cd_hi, ab_hi));
    }
    for t in whole..steps {
        for i in 0..4 {
            *out(t).add(i) = *row(i).add(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count up to two AVX-512 blocks (groups of four and the rows left over) and
    /// step counts below, at and across the 16-step passes and the 4-step transposes.
    #[test]
    fn rows_to_steps_transposes_every_shape() {
        for rows in 1..=13 {
            for k in [1, 3, 4, 5, 15, 16, 17, 31, 64, 70] {
                let src: Vec<f32> = (0..rows * k).map(|v| v as f32).collect();
                let mut dst = vec![f32::NAN; k * rows];
                rows_to_steps(&src, k, rows, &mut dst);
                for t in 0..k {
                    for i in 0..rows {
                        assert_eq!(
                            dst[t * rows + i],
                            src[i * k + t],
                            "rows {rows} k {k} ({t}, {i})"
                        );
                    }
                }
            }
        }
    }
}
