// dsvl's CUDA kernels (see mod.rs): compiled at run time by NVRTC, checked by nvcc in
// `scripts/build-cuda --check`. No includes: NVRTC has no host headers.
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

// ---- Decoder layer glue (cuda/decoder.rs) ----

// The working dtype's rounding of a float: bf16's for 16-bit tensors, none for f32.
__device__ __forceinline__ float rnd(const unsigned short*, float v) { return round_bf16(v); }
__device__ __forceinline__ float rnd(const float*, float v) { return v; }

// Rotate-half RoPE of `heads` heads of `d` values per row, read from columns [col0, col0 +
// heads * d) of `src` (row stride `stride`: the fused q/k/v projection's output) and written to
// row `slots[r]` (or `r` when `use_slots` is 0) of `dst` (rows of heads * d). With `rotate` 0
// the values are copied as they are (the values' pool). Block (r, y) takes the pairs
// y * blockDim .. of row r, one pair a thread: no thread loops, so a decode step's single row
// is spread over many blocks and a prompt's rows over few enough. Rounding as
// `x * cos + rotate_half(x) * sin` in the working dtype: each product, then the sum; no fused
// multiply-add, so f32 gives what the op-by-op chain gives.
template <typename T>
__device__ void rope_rows(const T* src, T* dst, const T* cos, const T* sin,
                          const unsigned int* pos, const unsigned int* slots, unsigned int use_slots,
                          unsigned int stride, unsigned int col0, unsigned int heads,
                          unsigned int d, unsigned int rotate) {
    const unsigned long long r = blockIdx.x;
    const unsigned long long s = r * stride + col0;
    const unsigned long long o = (use_slots ? (unsigned long long)slots[r] : r) * heads * d;
    const unsigned long long t = (unsigned long long)pos[r] * d;
    const unsigned int half = d / 2;
    const unsigned int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i < heads * half) {
        const unsigned int h = i / half, k = i - h * half;
        const unsigned long long a = (unsigned long long)h * d + k, b = a + half;
        const float x1 = ld(src, s + a), x2 = ld(src, s + b);
        if (rotate) {
            const float c1 = ld(cos, t + k), s1 = ld(sin, t + k);
            const float c2 = ld(cos, t + k + half), s2 = ld(sin, t + k + half);
            st(dst, o + a, __fsub_rn(rnd(dst, __fmul_rn(x1, c1)), rnd(dst, __fmul_rn(x2, s1))));
            st(dst, o + b, __fadd_rn(rnd(dst, __fmul_rn(x2, c2)), rnd(dst, __fmul_rn(x1, s2))));
        } else {
            st(dst, o + a, x1);
            st(dst, o + b, x2);
        }
    }
}
extern "C" __global__ void dsvl_rope_rows_bf16(const unsigned short* src, unsigned short* dst,
        const unsigned short* cos, const unsigned short* sin, const unsigned int* pos,
        const unsigned int* slots, unsigned int use_slots, unsigned int stride, unsigned int col0,
        unsigned int heads, unsigned int d, unsigned int rotate) {
    rope_rows(src, dst, cos, sin, pos, slots, use_slots, stride, col0, heads, d, rotate);
}
extern "C" __global__ void dsvl_rope_rows_f32(const float* src, float* dst, const float* cos,
        const float* sin, const unsigned int* pos, const unsigned int* slots,
        unsigned int use_slots, unsigned int stride, unsigned int col0, unsigned int heads,
        unsigned int d, unsigned int rotate) {
    rope_rows(src, dst, cos, sin, pos, slots, use_slots, stride, col0, heads, d, rotate);
}

// silu(gate) * up from the fused gate/up projection's rows ([gate | up], `width` each): SiLU in
// f32 rounded once to the working dtype, then the product (PyTorch's rounding points).
template <typename T>
__device__ void silu_mul(const T* gu, T* out, unsigned int width, unsigned long long total) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        const unsigned long long row = i / width, c = i - row * width;
        const float g = ld(gu, row * 2 * width + c), u = ld(gu, row * 2 * width + width + c);
        st(out, i, __fmul_rn(rnd(out, __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))), u));
    }
}
extern "C" __global__ void dsvl_silu_mul_bf16(const unsigned short* gu, unsigned short* out,
        unsigned int width, unsigned long long total) {
    silu_mul(gu, out, width, total);
}
extern "C" __global__ void dsvl_silu_mul_f32(const float* gu, float* out, unsigned int width,
        unsigned long long total) {
    silu_mul(gu, out, width, total);
}

// Paged causal attention over the key and value pools ([slots, kv_heads, d]) read in place
// through the block tables; query row r sees positions 0..=pos[r] of its sequence. Softmax as
// PyTorch's fused attention (SDPA, flash) computes it: scores, running max and sum, and the
// weighted values in f32 (one pass, online), the output rounded once to the working dtype.
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ unsigned long long kv_row(const unsigned int* bt, unsigned int j,
        unsigned int block_size, unsigned int kv_heads, unsigned int kvh, unsigned int d) {
    const unsigned long long slot = (unsigned long long)bt[j / block_size] * block_size + j % block_size;
    return (slot * kv_heads + kvh) * d;
}

// Decode steps (and heads over 128 values): one block of WARPS warps per (query row, head).
// Warps take runs of ROW_UNROLL consecutive keys; lanes split the head dimension (d <= 32 *
// ROW_DIMS); the warps' partial softmaxes merge at the end. Row r's sequence: the b with
// cu_q[b] <= r < cu_q[b + 1]. Two shapes, measured on an H200 at VL-7B sizes (benches/README.md):
// - `wide` (16 warps, a run's keys and values loaded together: one memory latency a run) for
//   steps of few rows, where a few dozen blocks must each finish fast (batch-1 decode: 48 ->
//   25 us a layer);
// - narrow (8 warps, values loaded after the scores: fewer registers) for many rows, where
//   blocks queue for the SMs and the wide shape's registers halve how many fit (batch-64
//   decode: 12.5 ms a step narrow, 17.7 ms wide).
#define ROW_UNROLL 4
#define ROW_DIMS 8
template <typename T, int WARPS, bool WIDE>
__device__ void attention_rows(const T* q, const T* kp, const T* vp, T* out,
        const unsigned int* pos, const unsigned int* cu_q, unsigned int seqs,
        const unsigned int* table, unsigned int max_blocks, unsigned int block_size,
        unsigned int heads, unsigned int kv_heads, unsigned int d, float scale) {
    __shared__ float wm[WARPS], wl[WARPS];
    __shared__ float wacc[WARPS][32 * ROW_DIMS];
    const unsigned int r = blockIdx.x, h = blockIdx.y;
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned int lo = 0, hi = seqs;  // cu_q has seqs + 1 entries
    while (hi - lo > 1) {
        const unsigned int mid = (lo + hi) / 2;
        if (cu_q[mid] <= r) lo = mid; else hi = mid;
    }
    const unsigned int* bt = table + (unsigned long long)lo * max_blocks;
    const unsigned int keys = pos[r] + 1;
    const unsigned int kvh = h / (heads / kv_heads);
    const unsigned long long qbase = ((unsigned long long)r * heads + h) * d;
    float qv[ROW_DIMS], acc[ROW_DIMS];
#pragma unroll
    for (int i = 0; i < ROW_DIMS; i++) {
        const unsigned int dim = lane + 32u * i;
        qv[i] = dim < d ? ld(q, qbase + dim) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (unsigned int j0 = warp * ROW_UNROLL; j0 < keys; j0 += WARPS * ROW_UNROLL) {
        if (WIDE) {
            float kv[ROW_UNROLL][ROW_DIMS], vv[ROW_UNROLL][ROW_DIMS];
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                const bool valid = j0 + u < keys;  // the same for every lane
                const unsigned long long base =
                    valid ? kv_row(bt, j0 + u, block_size, kv_heads, kvh, d) : 0;
#pragma unroll
                for (int i = 0; i < ROW_DIMS; i++) {
                    const unsigned int dim = lane + 32u * i;
                    const bool in = valid && dim < d;
                    kv[u][i] = in ? ld(kp, base + dim) : 0.0f;
                    vv[u][i] = in ? ld(vp, base + dim) : 0.0f;
                }
            }
            float s[ROW_UNROLL], mx = m;
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                float a = 0.0f;
#pragma unroll
                for (int i = 0; i < ROW_DIMS; i++) a = fmaf(qv[i], kv[u][i], a);
                s[u] = j0 + u < keys ? warp_sum(a) * scale : NEG_INF;
                mx = fmaxf(mx, s[u]);
            }
            const float alpha = expf(m - mx);  // key j0 is valid: mx is finite
            l *= alpha;
#pragma unroll
            for (int i = 0; i < ROW_DIMS; i++) acc[i] *= alpha;
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                const float p = j0 + u < keys ? expf(s[u] - mx) : 0.0f;
                l += p;
#pragma unroll
                for (int i = 0; i < ROW_DIMS; i++) acc[i] = fmaf(p, vv[u][i], acc[i]);
            }
            m = mx;
        } else {
            unsigned long long base[ROW_UNROLL];
            float s[ROW_UNROLL];
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                const bool valid = j0 + u < keys;  // the same for every lane
                base[u] = valid ? kv_row(bt, j0 + u, block_size, kv_heads, kvh, d) : 0;
                float a = 0.0f;
#pragma unroll
                for (int i = 0; i < ROW_DIMS; i++) {
                    const unsigned int dim = lane + 32u * i;
                    if (valid && dim < d) a = fmaf(qv[i], ld(kp, base[u] + dim), a);
                }
                s[u] = a;
            }
            float mx = m;
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                s[u] = j0 + u < keys ? warp_sum(s[u]) * scale : NEG_INF;
                mx = fmaxf(mx, s[u]);
            }
            const float alpha = expf(m - mx);  // key j0 is valid: mx is finite
            l *= alpha;
#pragma unroll
            for (int i = 0; i < ROW_DIMS; i++) acc[i] *= alpha;
#pragma unroll
            for (int u = 0; u < ROW_UNROLL; u++) {
                if (j0 + u >= keys) break;
                const float p = expf(s[u] - mx);
                l += p;
#pragma unroll
                for (int i = 0; i < ROW_DIMS; i++) {
                    const unsigned int dim = lane + 32u * i;
                    if (dim < d) acc[i] = fmaf(p, ld(vp, base[u] + dim), acc[i]);
                }
            }
            m = mx;
        }
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int i = 0; i < ROW_DIMS; i++) wacc[warp][lane + 32u * i] = acc[i];
    __syncthreads();
    float bm = wm[0];
    for (int w = 1; w < WARPS; w++) bm = fmaxf(bm, wm[w]);
    float bl = 0.0f;
    for (int w = 0; w < WARPS; w++) bl += wm[w] == NEG_INF ? 0.0f : wl[w] * expf(wm[w] - bm);
    for (unsigned int dim = threadIdx.x; dim < d; dim += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            if (wm[w] != NEG_INF) v = fmaf(wacc[w][dim], expf(wm[w] - bm), v);
        }
        st(out, qbase + dim, v / bl);
    }
}
#define ROW_KERNEL(NAME, T, WARPS, WIDE)                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(const T* q, const T* kp,      \
            const T* vp, T* out, const unsigned int* pos, const unsigned int* cu_q,            \
            unsigned int seqs, const unsigned int* table, unsigned int max_blocks,             \
            unsigned int block_size, unsigned int heads, unsigned int kv_heads, unsigned int d, \
            float scale) {                                                                      \
        attention_rows<T, WARPS, WIDE>(q, kp, vp, out, pos, cu_q, seqs, table, max_blocks,     \
                                       block_size, heads, kv_heads, d, scale);                 \
    }
ROW_KERNEL(dsvl_attention_rows_wide_bf16, unsigned short, 16, true)
ROW_KERNEL(dsvl_attention_rows_wide_f32, float, 16, true)
ROW_KERNEL(dsvl_attention_rows_bf16, unsigned short, 8, false)
ROW_KERNEL(dsvl_attention_rows_f32, float, 8, false)

// Steps with prompt chunks (d <= 32 * TILE_DIMS): one block of 4 warps per (tile, head), a tile
// being up to TILE_Q consecutive query rows of one sequence (tiles[3t..3t+3]: sequence, first
// row, rows). Keys and values come through shared memory TILE_K at a time, read once for all the
// tile's rows (a warp loads whole key rows: no index arithmetic per element). Warp w serves rows
// w, w + 4, w + 8, w + 12 together: lane k scores key k of the tile against the four rows (four
// independent sums over one read of the key; rows padded to d + 1 floats, so the lanes' reads
// hit distinct banks), then the lanes update each row's softmax, and each value read serves the
// four rows. Dynamic shared memory: (TILE_Q * d + 2 * TILE_K * (d + 1)) floats.
#define TILE_Q 16
#define TILE_K 32
#define TILE_DIMS 4
#define TILE_ROWS (TILE_Q / 4)
template <typename T>
__device__ void attention_tiles(const T* q, const T* kp, const T* vp, T* out,
        const unsigned int* pos, const unsigned int* tiles, const unsigned int* table,
        unsigned int max_blocks, unsigned int block_size, unsigned int heads,
        unsigned int kv_heads, unsigned int d, float scale) {
    extern __shared__ float sh[];
    float* qs = sh;                      // TILE_Q x d
    float* ks = qs + TILE_Q * d;         // TILE_K x (d + 1)
    float* vs = ks + TILE_K * (d + 1);   // TILE_K x (d + 1)
    const unsigned int t = blockIdx.x, h = blockIdx.y;
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int seq = tiles[3 * t], r0 = tiles[3 * t + 1], nr = tiles[3 * t + 2];
    const unsigned int* bt = table + (unsigned long long)seq * max_blocks;
    const unsigned int kvh = h / (heads / kv_heads);
    for (unsigned int row = warp; row < TILE_Q; row += 4) {
        const unsigned long long qb = ((unsigned long long)(r0 + row) * heads + h) * d;
        for (unsigned int dim = lane; dim < d; dim += 32) {
            qs[row * d + dim] = row < nr ? ld(q, qb + dim) : 0.0f;
        }
    }
    const unsigned int last = pos[r0 + nr - 1];  // the tile's rows sit at consecutive positions
    float m[TILE_ROWS], l[TILE_ROWS], acc[TILE_ROWS][TILE_DIMS];
    unsigned int prow[TILE_ROWS];
#pragma unroll
    for (int w = 0; w < TILE_ROWS; w++) {
        const unsigned int row = warp + 4 * w;
        prow[w] = row < nr ? pos[r0 + row] : 0;
        m[w] = NEG_INF;
        l[w] = 0.0f;
#pragma unroll
        for (int i = 0; i < TILE_DIMS; i++) acc[w][i] = 0.0f;
    }
    for (unsigned int k0 = 0; k0 <= last; k0 += TILE_K) {
        __syncthreads();  // the previous tile is consumed (and, the first time, q is in)
        for (unsigned int kk = warp; kk < TILE_K; kk += 4) {
            const bool live = k0 + kk <= last;
            const unsigned long long b = live ? kv_row(bt, k0 + kk, block_size, kv_heads, kvh, d) : 0;
            for (unsigned int dim = lane; dim < d; dim += 32) {
                ks[kk * (d + 1) + dim] = live ? ld(kp, b + dim) : 0.0f;
                vs[kk * (d + 1) + dim] = live ? ld(vp, b + dim) : 0.0f;
            }
        }
        __syncthreads();
        float a[TILE_ROWS];
#pragma unroll
        for (int w = 0; w < TILE_ROWS; w++) a[w] = 0.0f;
        const float* kr = ks + lane * (d + 1);
        for (unsigned int dim = 0; dim < d; dim++) {
            const float kx = kr[dim];
#pragma unroll
            for (int w = 0; w < TILE_ROWS; w++) a[w] = fmaf(qs[(warp + 4 * w) * d + dim], kx, a[w]);
        }
        const unsigned int j = k0 + lane;
        float p[TILE_ROWS];
#pragma unroll
        for (int w = 0; w < TILE_ROWS; w++) {
            p[w] = 0.0f;
            // Rows past the tile's end, or wholly before this key tile, take no part (uniform
            // over the warp).
            if (warp + 4 * w >= nr || k0 > prow[w]) continue;
            const float sc = j <= prow[w] ? a[w] * scale : NEG_INF;
            const float mx = fmaxf(m[w], warp_max(sc));  // key k0 is visible: finite
            const float alpha = expf(m[w] - mx);
            p[w] = j <= prow[w] ? expf(sc - mx) : 0.0f;
            l[w] = l[w] * alpha + warp_sum(p[w]);
#pragma unroll
            for (int i = 0; i < TILE_DIMS; i++) acc[w][i] *= alpha;
            m[w] = mx;
        }
        const unsigned int visible = min(last - k0 + 1, (unsigned int)TILE_K);
        for (unsigned int kk = 0; kk < visible; kk++) {
            float v[TILE_DIMS];
#pragma unroll
            for (int i = 0; i < TILE_DIMS; i++) {
                const unsigned int dim = lane + 32u * i;
                v[i] = dim < d ? vs[kk * (d + 1) + dim] : 0.0f;
            }
#pragma unroll
            for (int w = 0; w < TILE_ROWS; w++) {
                const float pk = __shfl_sync(0xffffffffu, p[w], kk);
#pragma unroll
                for (int i = 0; i < TILE_DIMS; i++) acc[w][i] = fmaf(pk, v[i], acc[w][i]);
            }
        }
    }
#pragma unroll
    for (int w = 0; w < TILE_ROWS; w++) {
        const unsigned int row = warp + 4 * w;
        if (row >= nr) break;
        const unsigned long long ob = ((unsigned long long)(r0 + row) * heads + h) * d;
#pragma unroll
        for (int i = 0; i < TILE_DIMS; i++) {
            const unsigned int dim = lane + 32u * i;
            if (dim < d) st(out, ob + dim, acc[w][i] / l[w]);
        }
    }
}
extern "C" __global__ void __launch_bounds__(128) dsvl_attention_tiles_bf16(const unsigned short* q,
        const unsigned short* kp, const unsigned short* vp, unsigned short* out,
        const unsigned int* pos, const unsigned int* tiles, const unsigned int* table,
        unsigned int max_blocks, unsigned int block_size, unsigned int heads,
        unsigned int kv_heads, unsigned int d, float scale) {
    attention_tiles(q, kp, vp, out, pos, tiles, table, max_blocks, block_size, heads, kv_heads,
                    d, scale);
}
extern "C" __global__ void __launch_bounds__(128) dsvl_attention_tiles_f32(const float* q, const float* kp,
        const float* vp, float* out, const unsigned int* pos, const unsigned int* tiles,
        const unsigned int* table, unsigned int max_blocks, unsigned int block_size,
        unsigned int heads, unsigned int kv_heads, unsigned int d, float scale) {
    attention_tiles(q, kp, vp, out, pos, tiles, table, max_blocks, block_size, heads, kv_heads,
                    d, scale);
}
