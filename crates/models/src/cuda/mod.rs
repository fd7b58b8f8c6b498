//! Our own CUDA kernels, for the few places where candle's generic kernels cost many times the
//! memory traffic the work needs (measured with `scripts/gpu-profile` on an H200). They are CUDA
//! C compiled once per process with NVRTC (which candle links already), so the build needs no
//! extra nvcc step, and they move 16-bit floats as raw bits (bf16 widened to f32 by a shift,
//! rounded back to nearest-even), so one source serves bf16 and f32 tensors.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{Layout, Result, Storage};

pub(crate) mod decoder;
pub(crate) mod kv_write;
pub(crate) mod relpos_softmax;
pub(crate) mod rms_norm;

const MODULE: &str = "dsvl_kernels";

/// The kernels' CUDA C source (compiled by NVRTC on first use).
const SOURCE: &str = include_str!("kernels.cu");

/// The kernel `name` of our module on `dev` (compiled on first use, loaded once per device), to
/// launch on `dev.cuda_stream()` (candle's stream for `dev`, so it orders with candle's work).
pub(crate) fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = PTX
        .get_or_init(|| compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| format!("{e:?}")))
        .as_deref()
        .map_err(|e| {
            candle_core::Error::Msg(format!("NVRTC could not compile our kernels: {e}"))
        })?;
    Ok(dev.get_or_load_custom_func(name, MODULE, ptx)?.into_cuda_function())
}

/// A contiguous tensor's storage as a typed device view, for a kernel argument (`what` names it
/// in errors): the step metadata and tables the kernels read beside their main operands.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = s else { candle_core::bail!("{what} is not on the GPU") };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous")
    };
    Ok(c.as_cuda_slice::<T>()?.slice(a..b))
}

/// One block of 256 threads (8 warps; `block_reduce` wants a multiple of 32) per row, for the
/// row-wise kernels (softmax, normalisation).
pub(crate) fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}
