//! A strided tensor made contiguous on every rayon worker, for the permutes of the vision
//! towers (SAM's head split and merge, window partition and unpartition).
//!
//! candle's `contiguous` copies on the calling thread. In a SAM layer at 1024 x 1024 those
//! copies move 40-65 MiB per layer while the other workers wait: candle's strided copy was 3.4 % of a
//! vision encode's samples, all on the main thread, on an Intel Xeon with 2 threads. Where the
//! innermost dimension stays innermost (every permute above), each output row is one
//! contiguous run of the source, so rows are copied in parallel with `copy_from_slice`.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Rows per rayon task (rows are 64-1024 values in the towers).
const ROWS_PER_TASK: usize = 256;

/// `t` contiguous: in parallel for a strided f32 CPU tensor whose last dimension has stride 1,
/// through candle otherwise (the same values either way).
pub fn contiguous_par(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() || t.dtype() != DType::F32 || !t.device().is_cpu() || t.rank() < 2 {
        return t.contiguous();
    }
    let dims = t.dims().to_vec();
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*guard else {
        candle_core::bail!("a CPU tensor was expected. This is a bug.")
    };
    let strides = layout.stride();
    if strides[strides.len() - 1] != 1 {
        drop(guard);
        return t.contiguous();
    }
    let src = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    let row = dims[dims.len() - 1];
    let outer = &dims[..dims.len() - 1];
    let rows: usize = outer.iter().product();
    let mut out = super::zeroed(rows * row);
    out.par_chunks_mut(row * ROWS_PER_TASK).enumerate().for_each(|(task, chunk)| {
        for (i, dst) in chunk.chunks_mut(row).enumerate() {
            // The source offset of output row `task * ROWS_PER_TASK + i`.
            let mut r = task * ROWS_PER_TASK + i;
            let mut at = start;
            for (d, &n) in outer.iter().enumerate().rev() {
                at += (r % n) * strides[d];
                r /= n;
            }
            dst.copy_from_slice(&src[at..at + row]);
        }
    });
    drop(guard);
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The towers' permutes, and ones that fall back to candle, against candle's copy.
    #[test]
    fn matches_candles_contiguous() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (2 * 3 * 5 * 4 * 7) as f32, &dev)?.reshape((2, 3, 5, 4, 7))?;
        let cases = [
            x.permute((2, 0, 3, 1, 4))?,
            x.permute((0, 2, 3, 1, 4))?,
            x.permute((1, 0, 2, 3, 4))?.narrow(2, 1, 3)?,
            x.narrow(4, 2, 3)?,
            x.permute((0, 1, 2, 4, 3))?,
            x.clone(),
        ];
        for (i, t) in cases.iter().enumerate() {
            let got = contiguous_par(t)?;
            assert!(got.is_contiguous(), "case {i}");
            assert_eq!(got.dims(), t.dims(), "case {i}");
            let want = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want, "case {i}");
        }
        // More rows than one task takes, so task offsets are exercised.
        let big = Tensor::arange(0f32, 3.0 * 700.0 * 2.0 * 8.0, &dev)?.reshape((3, 700, 2, 8))?;
        let t = big.permute((2, 1, 0, 3))?;
        let want = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(contiguous_par(&t)?.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }
}
