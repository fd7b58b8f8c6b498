//! Our own CUDA kernels, for the few places where candle's generic kernels cost many times the
//! memory traffic the work needs (measured with `scripts/gpu-profile` on an H200). They are CUDA
//! C compiled once per process with NVRTC (which candle links already), so the build needs no
//! extra nvcc step, and they move 16-bit floats as raw bits (bf16 widened to f32 by a shift,
//! rounded back to nearest-even), so one source serves bf16 and f32 tensors.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;

pub(crate) mod kv_write;
pub(crate) mod relpos_softmax;
pub(crate) mod rms_norm;

const MODULE: &str = "dsvl_kernels";

const SOURCE: &str = r#"
__device__ __forceinline__ float ld(const unsigned short* p, unsigned long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ float ld(const float* p, unsigned long long i) { return p[i]; }
__device__ __forceinline__ void st(unsigned short* p, unsigned long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                   // round to nearest even
    p[i] = (unsigned short)(u >> 16);
}
__device__ __forceinline__ void st(float* p, unsigned long long i, float v) { p[i] = v; }

// Paged KV write: rows[i / width] goes to pool row slots[i / width]; one thread per element.
template <typename T>
__device__ void write_rows(T* pool, const T* rows, const unsigned int* slots,
                           unsigned int width, unsigned int total) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        unsigned int row = i / width;
        pool[(unsigned long long)slots[row] * width + (i - row * width)] = rows[i];
    }
}
extern "C" __global__ void dsvl_write_rows_16(unsigned short* pool, const unsigned short* rows,
        const unsigned int* slots, unsigned int width, unsigned int total) {
    write_rows(pool, rows, slots, width, total);
}
extern "C" __global__ void dsvl_write_rows_32(unsigned int* pool, const unsigned int* rows,
        const unsigned int* slots, unsigned int width, unsigned int total) {
    write_rows(pool, rows, slots, width, total);
}

// Block-wide max or sum of one float per thread (blockDim a multiple of 32, at most 1024).
__device__ float block_reduce(float v, float* red, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // an earlier reduction may still be reading red
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = lane < warps ? red[lane] : (is_max ? __int_as_float(0xff800000) : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, r, o);
        r = is_max ? fmaxf(r, w) : r + w;
    }
    return r;
}

// SAM attention epilogue, one block per score row (query (h, w) of a head): softmax over the
// s*s keys (kh, kw) of score + rel_h[kh] + rel_w[kw], in f32, in the reference's order.
template <typename T>
__device__ void relpos_softmax(const T* scores, const T* rel_h, const T* rel_w, T* out,
                               unsigned int s) {
    __shared__ float red[32];
    const unsigned int n = s * s;
    const unsigned long long row = blockIdx.x;
    const unsigned long long base = row * n, rbase = row * s;
    float m = __int_as_float(0xff800000);
    for (unsigned int k = threadIdx.x; k < n; k += blockDim.x) {
        m = fmaxf(m, (ld(scores, base + k) + ld(rel_h, rbase + k / s)) + ld(rel_w, rbase + k % s));
    }
    m = block_reduce(m, red, true);
    float sum = 0.0f;
    for (unsigned int k = threadIdx.x; k < n; k += blockDim.x) {
        sum += expf((ld(scores, base + k) + ld(rel_h, rbase + k / s)) + ld(rel_w, rbase + k % s) - m);
    }
    const float inv = 1.0f / block_reduce(sum, red, false);
    for (unsigned int k = threadIdx.x; k < n; k += blockDim.x) {
        float v = (ld(scores, base + k) + ld(rel_h, rbase + k / s)) + ld(rel_w, rbase + k % s);
        st(out, base + k, expf(v - m) * inv);
    }
}
// RMSNorm of bf16 rows with transformers' rounding points: the row is normalised in f32 and
// rounded to bf16, then multiplied by the bf16 weight and rounded again. One block per row.
__device__ __forceinline__ float round_bf16(float v) {
    unsigned short t;
    st(&t, 0, v);
    return ld(&t, 0);
}
extern "C" __global__ void dsvl_rms_norm_bf16(const unsigned short* x, const unsigned short* w,
        unsigned short* out, unsigned int d, float eps) {
    __shared__ float red[32];
    const unsigned long long base = (unsigned long long)blockIdx.x * d;
    float ss = 0.0f;
    for (unsigned int k = threadIdx.x; k < d; k += blockDim.x) {
        float v = ld(x, base + k);
        ss += v * v;
    }
    const float inv = rsqrtf(block_reduce(ss, red, false) / (float)d + eps);
    for (unsigned int k = threadIdx.x; k < d; k += blockDim.x) {
        st(out, base + k, round_bf16(ld(x, base + k) * inv) * ld(w, k));
    }
}

extern "C" __global__ void dsvl_relpos_softmax_bf16(const unsigned short* scores,
        const unsigned short* rel_h, const unsigned short* rel_w, unsigned short* out,
        unsigned int s) {
    relpos_softmax(scores, rel_h, rel_w, out, s);
}
extern "C" __global__ void dsvl_relpos_softmax_f32(const float* scores, const float* rel_h,
        const float* rel_w, float* out, unsigned int s) {
    relpos_softmax(scores, rel_h, rel_w, out, s);
}
"#;

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

/// One block of 256 threads (8 warps; `block_reduce` wants a multiple of 32) per row, for the
/// row-wise kernels (softmax, normalisation).
pub(crate) fn block_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}
