/* ops_basic.cu - the CUDA kernels behind the ops table apart from attention:
 * embeddings (get_rows), rmsnorm, RoPE, softmax, silu_mul, add, KV rows, the decode
 * matvec, f32 <-> half conversions, argmax and top-p sampling.
 *
 * Design: each op mirrors the CPU reference (kernels/cpu/scalar.c) formula by formula;
 * only summation orders differ (block reductions), and RoPE is written with explicit
 * round-to-nearest intrinsics so that nvcc cannot contract it into FMAs the CPU
 * build (-ffp-contract=off) does not use. Row ops run one block per row with a
 * grid-stride loop over rows; element-wise ops use grid-stride loops with int64_t
 * indices. The matvec streams each weight row once for up to 8 rows of x (see
 * matvec below); it is batch invariant: y[t][o] is the same bits for every T.
 * Every entry point only enqueues work on the given stream: no allocation, no
 * synchronisation; it returns cudaGetLastError() after its launches.
 * Threading: the entry points may be called from any host thread (one stream each). */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/cp_async.cuh"

namespace
{

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;      /* element-wise and small row kernels */
constexpr int kRowThreads = 512;   /* rmsnorm, softmax */
constexpr int kWideThreads = 1024; /* argmax, sampling: rows of a whole vocabulary */
constexpr int64_t kGridCap = 4096; /* grid-stride kernels: enough blocks to fill a GPU */
constexpr int64_t kRowGridCap = 65535;

/* ---- launch helpers ---- */

unsigned grid_for(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < kGridCap ? b : kGridCap);
}

unsigned grid_rows(int64_t rows)
{
    return (unsigned)(rows < kRowGridCap ? rows : kRowGridCap);
}

bool aligned16(const void *p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

/* ---- block reductions (blockDim.x a multiple of 32, at most 1024) ----
 * Each starts with a barrier so its scratch can be reused by the next call, and ends
 * with every warp reducing the warp partials itself in the same order: all threads get
 * the same bits, so block-uniform decisions can be taken on the result. */

__device__ __forceinline__ float warp_sum(float v)
{
    /* xor butterfly: partners add the same two values (addition commutes exactly), so
     * every lane ends with the same bits */
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    return v;
}

__device__ float block_sum(float v, float *red /* [32] */)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    return warp_sum(lane < nw ? red[lane] : 0.0f);
}

__device__ float block_max(float v, float *red /* [32] */)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    return warp_max(lane < nw ? red[lane] : -INFINITY);
}

/* op 0: min, op 1: max, over ints. */
template <int kMax> __device__ int block_minmax_int(int v, int *red /* [32] */)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(kFull, v, o);
        v = kMax ? max(v, u) : min(v, u);
    }
    __syncthreads();
    if (lane == 0)
        red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (kMax ? INT32_MIN : INT32_MAX);
    for (int o = 16; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(kFull, v, o);
        v = kMax ? max(v, u) : min(v, u);
    }
    return v;
}

/* (value, index) of the largest value; equal values: the lowest index. */
__device__ __forceinline__ void argmax_merge(float &v, int &i, float v2, int i2)
{
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ int block_argmax_pair(float v, int i, float *red_v, int *red_i)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(v, i, __shfl_xor_sync(kFull, v, o), __shfl_xor_sync(kFull, i, o));
    __syncthreads();
    if (lane == 0) {
        red_v[w] = v;
        red_i[w] = i;
    }
    __syncthreads();
    v = lane < nw ? red_v[lane] : -INFINITY;
    i = lane < nw ? red_i[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(v, i, __shfl_xor_sync(kFull, v, o), __shfl_xor_sync(kFull, i, o));
    return i;
}

/* Exclusive prefix sum over the block in thread order; *total_p = the block total
 * (the same bits in every thread). */
__device__ float block_scan_excl(float v, float *red /* [32] */, float *total_p)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(kFull, incl, o);
        if (lane >= o)
            incl += u;
    }
    float excl = __shfl_up_sync(kFull, incl, 1);
    if (lane == 0)
        excl = 0.0f;
    __syncthreads();
    if (lane == 31)
        red[w] = incl;
    __syncthreads();
    /* every warp scans the warp totals itself */
    float wt = lane < nw ? red[lane] : 0.0f;
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(kFull, wt, o);
        if (lane >= o)
            wt += u;
    }
    float before = __shfl_sync(kFull, wt, (w + 31) & 31); /* inclusive total of w - 1 */
    *total_p = __shfl_sync(kFull, wt, 31);
    return (w == 0 ? 0.0f : before) + excl;
}

/* ---- element loads ---- */

__device__ __forceinline__ float half_bits_to_f32(uint16_t h)
{
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

/* Element j of a row of dtype DT, as pd_dequantize_row computes it. The row is at
 * least 2-byte aligned (4 for F32). */
template <int DT>
__device__ __forceinline__ float load_elem(const uint8_t *row, int64_t j)
{
    if constexpr (DT == PD_DTYPE_F32)
        return __ldg(reinterpret_cast<const float *>(row) + j);
    if constexpr (DT == PD_DTYPE_F16)
        return half_bits_to_f32(__ldg(reinterpret_cast<const unsigned short *>(row) + j));
    if constexpr (DT == PD_DTYPE_BF16)
        return bf16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short *>(row) + j));
    if constexpr (DT == PD_DTYPE_Q8_0) {
        const uint8_t *b = row + (j / PD_QK) * 34;
        float d = half_bits_to_f32(__ldg(reinterpret_cast<const unsigned short *>(b)));
        return (float)(int8_t)__ldg(b + 2 + j % PD_QK) * d;
    }
    /* Q4_0: element k < 16 in the low nibble of qs[k], k >= 16 in the high of qs[k-16] */
    const uint8_t *b = row + (j / PD_QK) * 18;
    float d = half_bits_to_f32(__ldg(reinterpret_cast<const unsigned short *>(b)));
    int k = (int)(j % PD_QK);
    uint8_t q = __ldg(b + 2 + (k & 15));
    int nib = k < 16 ? (q & 0x0f) : (q >> 4);
    return (float)(nib - 8) * d;
}

/* Bytes of a row of n elements (n a multiple of 32 for the quantized dtypes). */
int64_t row_bytes_of(pd_dtype_t dt, int64_t n)
{
    switch (dt) {
    case PD_DTYPE_F32:
        return n * 4;
    case PD_DTYPE_F16:
    case PD_DTYPE_BF16:
        return n * 2;
    case PD_DTYPE_Q8_0:
        return n / PD_QK * 34;
    case PD_DTYPE_Q4_0:
        return n / PD_QK * 18;
    }
    return -1;
}

/* 0 when dt is a known weight dtype and n fits its blocks. */
bool dtype_ok(pd_dtype_t dt, int64_t n)
{
    switch (dt) {
    case PD_DTYPE_F32:
    case PD_DTYPE_F16:
    case PD_DTYPE_BF16:
        return true;
    case PD_DTYPE_Q8_0:
    case PD_DTYPE_Q4_0:
        return n % PD_QK == 0;
    }
    return false;
}

/* ---- get_rows ---- */

template <int DT>
__global__ void __launch_bounds__(kThreads)
    get_rows_kernel(const uint8_t *w, int64_t ne0, int64_t row_bytes, const int32_t *ids,
                    int64_t n, float *out)
{
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const uint8_t *row = w + (int64_t)ids[r] * row_bytes;
        float *o = out + r * ne0;
        for (int64_t j = threadIdx.x; j < ne0; j += blockDim.x)
            o[j] = load_elem<DT>(row, j);
    }
}

/* ---- rmsnorm, softmax ---- */

/* out may alias x: each thread reads x[j] before it writes out[j], for its own j
 * only, and every read of the first pass is before the reduction's barriers. */
__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_kernel(float *out, const float *x, const float *weight, int64_t T, int64_t n,
                   float eps)
{
    __shared__ float red[32];
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        const float *xr = x + t * n;
        float *orow = out + t * n;
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            ss += xr[j] * xr[j];
        ss = block_sum(ss, red);
        /* as scalar.c: ss /= n; ss += eps; ss = 1 / sqrtf(ss) (IEEE div and sqrt) */
        ss = __fdiv_rn(ss, (float)n);
        ss = __fadd_rn(ss, eps);
        ss = __fdiv_rn(1.0f, __fsqrt_rn(ss));
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            orow[j] = __fmul_rn(weight[j], __fmul_rn(ss, xr[j]));
    }
}

__global__ void __launch_bounds__(kRowThreads)
    softmax_kernel(float *x, int64_t T, int64_t n)
{
    __shared__ float red[32];
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        float *xr = x + t * n;
        float mx = -INFINITY;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            mx = fmaxf(mx, xr[j]);
        mx = block_max(mx, red);
        float sum = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            float e = expf(xr[j] - mx);
            xr[j] = e;
            sum += e;
        }
        sum = block_sum(sum, red);
        /* each thread divides the elements it wrote itself */
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            xr[j] = __fdiv_rn(xr[j], sum);
    }
}

/* ---- RoPE ---- */

/* One thread per (token, head, pair), all in float as scalar.c:
 * freq = 1 / powf(theta, i / head_dim) for the even index i, val = pos * freq,
 * (v0, v1) -> (v0 cos - v1 sin, v0 sin + v1 cos). The _rn intrinsics keep nvcc from
 * contracting into FMAs; cosf/sinf/powf are the accurate (not __ fast) versions. */
__global__ void __launch_bounds__(kThreads)
    rope_kernel(float *x, const int32_t *pos, int64_t T, int n_heads, int head_dim,
                float theta)
{
    const int half = head_dim / 2;
    const int64_t total = T * n_heads * half;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int p = (int)(idx % half);
        const int64_t th = idx / half; /* t * n_heads + h */
        const int64_t t = th / n_heads;
        const int i = 2 * p;
        float freq = __fdiv_rn(1.0f, powf(theta, __fdiv_rn((float)i, (float)head_dim)));
        float val = __fmul_rn((float)pos[t], freq);
        float fcr = cosf(val), fci = sinf(val);
        float *v = x + th * head_dim + i;
        float v0 = v[0], v1 = v[1];
        v[0] = __fsub_rn(__fmul_rn(v0, fcr), __fmul_rn(v1, fci));
        v[1] = __fadd_rn(__fmul_rn(v0, fci), __fmul_rn(v1, fcr));
    }
}

/* ---- element-wise ---- */

__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(float *gate, const float *up, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = gate[i];
        /* as scalar.c: v *= 1 / (1 + expf(-v)); gate = v * up */
        v = __fmul_rn(v, __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v))));
        gate[i] = __fmul_rn(v, up[i]);
    }
}

__global__ void __launch_bounds__(kThreads)
    add_kernel(float *y, const float *x, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], x[i]);
}

__global__ void __launch_bounds__(kThreads)
    f32_to_half_kernel(bool bf16, const float *src, uint16_t *dst, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (bf16)
            dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
        else
            dst[i] = __half_as_ushort(__float2half_rn(src[i]));
    }
}

__global__ void __launch_bounds__(kThreads)
    half_to_f32_kernel(bool bf16, const uint16_t *src, float *dst, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = bf16 ? bf16_bits_to_f32(src[i]) : half_bits_to_f32(src[i]);
}

/* ---- KV rows ---- */

__global__ void __launch_bounds__(kThreads)
    kv_write_kernel(void *cache, bool f16, int64_t row_elems, const int32_t *slots,
                    int64_t T, const float *src)
{
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
        const int64_t slot = slots[t];
        if (slot < 0) /* block-uniform: no barrier in this kernel anyway */
            continue;
        const float *s = src + t * row_elems;
        if (f16) {
            __half *d = static_cast<__half *>(cache) + slot * row_elems;
            for (int64_t j = threadIdx.x; j < row_elems; j += blockDim.x)
                d[j] = __float2half_rn(s[j]);
        } else {
            float *d = static_cast<float *>(cache) + slot * row_elems;
            for (int64_t j = threadIdx.x; j < row_elems; j += blockDim.x)
                d[j] = s[j];
        }
    }
}

/* Rows of `words` words of type W; gather: dst row i = cache row slots[i], scatter:
 * cache row slots[i] = src row i. Negative slots are skipped. */
template <typename W, bool kScatter>
__global__ void __launch_bounds__(kThreads)
    kv_copy_kernel(W *cache, int64_t words, const int32_t *slots, int64_t n, W *rows)
{
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const int64_t slot = slots[i];
        if (slot < 0)
            continue;
        W *c = cache + slot * words, *r = rows + i * words;
        for (int64_t j = threadIdx.x; j < words; j += blockDim.x) {
            if (kScatter)
                c[j] = r[j];
            else
                r[j] = c[j];
        }
    }
}

/* ---- matvec ----
 * y[t][o] = sum_i W[o][i] x[t][i] for the decode path: memory bound on the weights.
 *
 * Work split: a block is 8 warps, one weight row o per warp. Blocks loop over row
 * groups (o0 += 8 * gridDim.x; the grid is capped at the resident blocks per SM)
 * and, on grid.y, over groups of TG rows of x (TG = 1, 2, 4 or 8 chosen from T; rows
 * past T are zeros in shared memory and never stored). Each warp reads its weight row
 * once and keeps TG accumulators per lane, so the rows of x share every weight load.
 *
 * x: staged in shared memory as float, TG rows of a chunk of K = 8192 / TG columns
 * (32 KiB), reloaded per chunk; when one chunk holds the whole row (n_in <= K) it is
 * loaded once per block and reused for every row group the block visits. For the
 * quantized dtypes every 32 columns are followed by 4 floats of padding, so that lanes
 * reading whole 32-element blocks (144 bytes apart) hit distinct banks.
 *
 * Weights: when rows are 16-byte aligned (base and row_bytes % 16 == 0) lane l reads
 * uint4 g = l, l + 32, ... of the chunk (8 halves or 4 floats), U of them in flight
 * before any is used (U = 8 for T = 1: 4 KiB a warp). F16/BF16 lanes read the two
 * float4 halves of their x in a lane-dependent order ((l >> 2) & 1), which makes the
 * 8 lanes of each shared-memory phase hit 8 distinct 16-byte bank groups.
 * Quantized rows go through a per-warp staging buffer: 32 blocks of Q8_0 (1088 bytes)
 * or 64 of Q4_0 (1152) read with coalesced uint4 loads (lanes reading whole 34-byte
 * blocks from global memory would touch 9 cache lines per load instruction); then
 * lane l dequantizes blocks l (and l + 32), int8 / nibble to float by the exact 2^23
 * magic-number trick (cheaper than I2F), dots each with x and scales the block sum by
 * d once. Unaligned rows: lane-strided scalar loads (or 16-bit copies into the
 * staging buffer); correct, slower.
 *
 * Batch invariance: a lane's elements and their order depend only on the column
 * index (K is a multiple of 1024, so chunks start on the same lane), never on T, TG
 * or the unroll; the warp reduction is a fixed butterfly. So y[t][o] is the same bits
 * for every T and every place of row t in the batch. */

constexpr int kMvWarps = 8;
constexpr int kMvThreads = kMvWarps * 32;
constexpr int kMvXFloats = 8192; /* TG * K */
/* Resident blocks per SM the kernel is built for (<= 64 registers a thread, shared
 * memory <= 45 KiB a block); the grid is capped at this many per SM and the blocks
 * loop over row groups, so x is staged once per block when n_in <= K. */
constexpr int kMvBlocksPerSm = 4;

template <int DT> struct MvQuant {
    static constexpr int kBlockBytes = DT == PD_DTYPE_Q8_0 ? 34 : 18;
    /* 32-block groups per staging round: about 1.1 KiB of loads in flight per warp */
    static constexpr int kSub = DT == PD_DTYPE_Q8_0 ? 1 : 2;
    static constexpr int kStageBytes = kSub * 32 * kBlockBytes; /* a multiple of 16 */
    static constexpr int kStage16 = kStageBytes / 16;           /* uint4 per round */
    static constexpr int kLoads = (kStage16 + 31) / 32;         /* uint4 per lane */
};

__host__ __device__ constexpr bool is_quant(int dt)
{
    return dt == PD_DTYPE_Q8_0 || dt == PD_DTYPE_Q4_0;
}

/* 2^23 + byte k of v, exactly, as a float (no I2F). */
__device__ __forceinline__ float byte_magic(uint32_t v, int k)
{
    return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540u | (unsigned)k));
}

__device__ __forceinline__ float2 half2_bits_to_f32(uint32_t u, bool bf16)
{
    if (bf16)
        return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
    return make_float2(half_bits_to_f32((uint16_t)(u & 0xffffu)),
                       half_bits_to_f32((uint16_t)(u >> 16)));
}

/* The uint4 g0 + lane, g0 + 32 + lane, ... (U of them) of a chunk of G (zeros past G). */
template <int U>
__device__ __forceinline__ void vec_round_load(uint4 (&r)[U], const uint4 *wv, int g0,
                                               int G, int lane)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int g = g0 + 32 * u + lane;
        r[u] = g < G ? __ldg(wv + g) : make_uint4(0, 0, 0, 0);
    }
}

/* F32 rows, 16-byte aligned: G uint4 (4 floats each) in this chunk; r holds the first
 * round, loaded by the caller before it staged x. */
template <int TG, int U>
__device__ __forceinline__ void mv_f32_vec(const uint4 *wv, int G, const float *xs,
                                           int kstride, int lane, float (&acc)[TG],
                                           uint4 (&r)[U])
{
    for (int g0 = 0; g0 < G; g0 += 32 * U) {
        if (g0 > 0)
            vec_round_load<U>(r, wv, g0, G, lane);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + 32 * u + lane;
            if (g < G) {
                const float w0 = __uint_as_float(r[u].x), w1 = __uint_as_float(r[u].y);
                const float w2 = __uint_as_float(r[u].z), w3 = __uint_as_float(r[u].w);
#pragma unroll
                for (int t = 0; t < TG; t++) {
                    const float4 xv =
                        *reinterpret_cast<const float4 *>(xs + t * kstride + 4 * g);
                    acc[t] = fmaf(w0, xv.x, acc[t]);
                    acc[t] = fmaf(w1, xv.y, acc[t]);
                    acc[t] = fmaf(w2, xv.z, acc[t]);
                    acc[t] = fmaf(w3, xv.w, acc[t]);
                }
            }
        }
    }
}

/* F16/BF16 rows, 16-byte aligned: G uint4 (8 halves each) in this chunk; r holds the
 * first round, as for mv_f32_vec. */
template <int TG, int U, bool kBf16>
__device__ __forceinline__ void mv_half_vec(const uint4 *wv, int G, const float *xs,
                                            int kstride, int lane, float (&acc)[TG],
                                            uint4 (&r)[U])
{
    const int h = (lane >> 2) & 1; /* which float4 half of x this lane reads first */
    for (int g0 = 0; g0 < G; g0 += 32 * U) {
        if (g0 > 0)
            vec_round_load<U>(r, wv, g0, G, lane);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + 32 * u + lane;
            if (g < G) {
                /* elements 0-1 in .x, 2-3 in .y, 4-5 in .z, 6-7 in .w */
                const float2 a = half2_bits_to_f32(h ? r[u].z : r[u].x, kBf16);
                const float2 b = half2_bits_to_f32(h ? r[u].w : r[u].y, kBf16);
                const float2 c = half2_bits_to_f32(h ? r[u].x : r[u].z, kBf16);
                const float2 d = half2_bits_to_f32(h ? r[u].y : r[u].w, kBf16);
#pragma unroll
                for (int t = 0; t < TG; t++) {
                    const float *xr = xs + t * kstride + 8 * g;
                    const float4 xa = *reinterpret_cast<const float4 *>(xr + 4 * h);
                    const float4 xb = *reinterpret_cast<const float4 *>(xr + 4 * (h ^ 1));
                    acc[t] = fmaf(a.x, xa.x, acc[t]);
                    acc[t] = fmaf(a.y, xa.y, acc[t]);
                    acc[t] = fmaf(b.x, xa.z, acc[t]);
                    acc[t] = fmaf(b.y, xa.w, acc[t]);
                    acc[t] = fmaf(c.x, xb.x, acc[t]);
                    acc[t] = fmaf(c.y, xb.y, acc[t]);
                    acc[t] = fmaf(d.x, xb.z, acc[t]);
                    acc[t] = fmaf(d.y, xb.w, acc[t]);
                }
            }
        }
    }
}

/* Float dtypes, any alignment: lane-strided scalar loads of the kc columns. */
template <int DT, int TG>
__device__ __forceinline__ void mv_float_scalar(const uint8_t *rowc, int kc,
                                                const float *xs, int kstride, int lane,
                                                float (&acc)[TG])
{
#pragma unroll 4
    for (int j = lane; j < kc; j += 32) {
        const float wj = load_elem<DT>(rowc, j);
#pragma unroll
        for (int t = 0; t < TG; t++)
            acc[t] = fmaf(wj, xs[t * kstride + j], acc[t]);
    }
}

/* One quantized block (bq: its bytes in shared memory, 2-byte aligned) dotted with
 * the 32 floats of x at xb (row t at xb + t * kstride), added to acc as d * sum. */
template <int DT, int TG>
__device__ __forceinline__ void quant_block_dot(const uint16_t *bq, const float *xb,
                                                int kstride, float (&acc)[TG])
{
    const float d = half_bits_to_f32(bq[0]);
    float s[TG];
#pragma unroll
    for (int t = 0; t < TG; t++)
        s[t] = 0.0f;
    if constexpr (DT == PD_DTYPE_Q8_0) {
#pragma unroll
        for (int q = 0; q < 8; q++) {
            /* qs[4q..4q+3], offset by 128 so each byte reads as unsigned */
            const uint32_t v =
                ((uint32_t)bq[1 + 2 * q] | ((uint32_t)bq[2 + 2 * q] << 16)) ^ 0x80808080u;
            const float f0 = byte_magic(v, 0) - 8388736.0f; /* 2^23 + 128 */
            const float f1 = byte_magic(v, 1) - 8388736.0f;
            const float f2 = byte_magic(v, 2) - 8388736.0f;
            const float f3 = byte_magic(v, 3) - 8388736.0f;
#pragma unroll
            for (int t = 0; t < TG; t++) {
                const float4 xv =
                    *reinterpret_cast<const float4 *>(xb + t * kstride + 4 * q);
                s[t] = fmaf(f0, xv.x, s[t]);
                s[t] = fmaf(f1, xv.y, s[t]);
                s[t] = fmaf(f2, xv.z, s[t]);
                s[t] = fmaf(f3, xv.w, s[t]);
            }
        }
    } else {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            /* qs[4q..4q+3]: low nibbles are elements 4q.., high ones 16+4q.. */
            const uint32_t v = (uint32_t)bq[1 + 2 * q] | ((uint32_t)bq[2 + 2 * q] << 16);
            const uint32_t lo = v & 0x0f0f0f0fu, hi = (v >> 4) & 0x0f0f0f0fu;
            const float l0 = byte_magic(lo, 0) - 8388616.0f; /* 2^23 + 8 */
            const float l1 = byte_magic(lo, 1) - 8388616.0f;
            const float l2 = byte_magic(lo, 2) - 8388616.0f;
            const float l3 = byte_magic(lo, 3) - 8388616.0f;
            const float h0 = byte_magic(hi, 0) - 8388616.0f;
            const float h1 = byte_magic(hi, 1) - 8388616.0f;
            const float h2 = byte_magic(hi, 2) - 8388616.0f;
            const float h3 = byte_magic(hi, 3) - 8388616.0f;
#pragma unroll
            for (int t = 0; t < TG; t++) {
                const float4 xl =
                    *reinterpret_cast<const float4 *>(xb + t * kstride + 4 * q);
                const float4 xh =
                    *reinterpret_cast<const float4 *>(xb + t * kstride + 16 + 4 * q);
                s[t] = fmaf(l0, xl.x, s[t]);
                s[t] = fmaf(l1, xl.y, s[t]);
                s[t] = fmaf(l2, xl.z, s[t]);
                s[t] = fmaf(l3, xl.w, s[t]);
                s[t] = fmaf(h0, xh.x, s[t]);
                s[t] = fmaf(h1, xh.y, s[t]);
                s[t] = fmaf(h2, xh.z, s[t]);
                s[t] = fmaf(h3, xh.w, s[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TG; t++)
        acc[t] = fmaf(s[t], d, acc[t]);
}

/* The uint4 of the staging round starting at block b0 that lane loads (16-byte aligned
 * rows; nblk is then a multiple of 8, so nblk * block bytes is a multiple of 16). */
template <int DT>
__device__ __forceinline__ void quant_round_load(uint4 (&r)[MvQuant<DT>::kLoads],
                                                 const uint8_t *rowc, int b0, int nb,
                                                 int lane)
{
    using Q = MvQuant<DT>;
    const int nblk = min(Q::kSub * 32, nb - b0);
    const int n16 = nblk * Q::kBlockBytes / 16;
    const uint4 *src =
        reinterpret_cast<const uint4 *>(rowc + (int64_t)b0 * Q::kBlockBytes);
#pragma unroll
    for (int q = 0; q < Q::kLoads; q++) {
        const int idx = lane + 32 * q;
        r[q] = idx < n16 ? __ldg(src + idx) : make_uint4(0, 0, 0, 0);
    }
}

/* Quantized rows: the nb blocks of this chunk from rowc, kSub * 32 at a time through
 * the warp's stage; lane l takes blocks l, l + 32, ... (ascending, whatever kSub).
 * r holds the first round of an aligned row, loaded by the caller before it staged x
 * (unused for unaligned rows). Issuing the next round before dequantizing this one
 * (software pipelining) was measured slower: it needs the registers of a fourth
 * resident block per SM. */
template <int DT, int TG, bool kVec>
__device__ __forceinline__ void
mv_quant(const uint8_t *rowc, int nb, const float *xs, int kstride, uint8_t *stage,
         int lane, float (&acc)[TG], uint4 (&r)[MvQuant<DT>::kLoads])
{
    using Q = MvQuant<DT>;
    constexpr int kStep = Q::kSub * 32;
    for (int b0 = 0; b0 < nb; b0 += kStep) {
        const int nblk = min(kStep, nb - b0);
        if constexpr (kVec) {
            if (b0 > 0)
                quant_round_load<DT>(r, rowc, b0, nb, lane);
            const int n16 = nblk * Q::kBlockBytes / 16;
#pragma unroll
            for (int q = 0; q < Q::kLoads; q++) {
                const int idx = lane + 32 * q;
                if (idx < n16)
                    reinterpret_cast<uint4 *>(stage)[idx] = r[q];
            }
        } else {
            const uint8_t *src = rowc + (int64_t)b0 * Q::kBlockBytes;
            const int n2 = nblk * Q::kBlockBytes / 2;
            for (int idx = lane; idx < n2; idx += 32)
                reinterpret_cast<uint16_t *>(stage)[idx] =
                    __ldg(reinterpret_cast<const unsigned short *>(src) + idx);
        }
        __syncwarp();
#pragma unroll
        for (int sub = 0; sub < Q::kSub; sub++) {
            const int j = lane + 32 * sub;
            if (j < nblk)
                quant_block_dot<DT, TG>(
                    reinterpret_cast<const uint16_t *>(stage + j * Q::kBlockBytes),
                    xs + (b0 + j) * 36 /* 32 columns + 4 padding */, kstride, acc);
        }
        __syncwarp(); /* the stage is rewritten by the next round */
    }
}

/* Columns [k0, k0 + kc) of rows t0.. t0 + TG - 1 of x into xs ([TG][kstride]; zeros for
 * rows >= nt; padded after every 32 columns for the quantized dtypes). The caller
 * puts a barrier after it. Aligned x is copied with cp.async, which keeps no
 * registers busy (the caller holds a round of weight loads in registers meanwhile)
 * and has every copy in flight at once. */
template <bool kPad, int TG>
__device__ __forceinline__ void mv_stage_x(float *xs, int kstride, const float *x,
                                           int64_t n_in, int64_t t0, int nt, int64_t k0,
                                           int kc, bool x_vec)
{
    if (x_vec) { /* n_in % 4 == 0 and x 16-byte aligned: kc and k0 multiples of 4 */
        const int n4 = kc / 4, total = TG * n4;
        for (int idx = threadIdx.x; idx < total; idx += kMvThreads) {
            const int t = idx / n4, c = 4 * (idx - t * n4);
            float *dst = xs + t * kstride + (kPad ? c / 32 * 36 + c % 32 : c);
            if (t < nt)
                cp_async16(dst, x + (t0 + t) * n_in + k0 + c);
            else
                *reinterpret_cast<float4 *>(dst) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        cp_async_wait_all();
    } else {
        const int total = TG * kc;
        for (int idx = threadIdx.x; idx < total; idx += kMvThreads) {
            const int t = idx / kc, c = idx - t * kc;
            xs[t * kstride + (kPad ? c / 32 * 36 + c % 32 : c)] =
                t < nt ? x[(t0 + t) * n_in + k0 + c] : 0.0f;
        }
    }
}

/* The matrices of one matvec launch (pdc_matvec: one; pdc_matvec_multi: up to
 * PDC_MV_MULTI_MAX sharing dtype and n_in): rows [start[m], start[m + 1]) of the
 * launch's row space are the rows of w[m], written to y[m] ([T][start[m + 1] -
 * start[m]]). Passed by value; members past n are never read. */
struct MvSegs {
    const uint8_t *w[PDC_MV_MULTI_MAX];
    float *y[PDC_MV_MULTI_MAX];
    int64_t start[PDC_MV_MULTI_MAX + 1];
    int64_t rows; /* start[n], kept apart: a dynamic index would put the table in local
                   * memory */
    int n;
};

/* Members of the table by a run-time index, read as selects over constant indices
 * (unrolled): a dynamic index into a kernel parameter would copy the whole table to
 * local memory. */
__device__ __forceinline__ int mv_seg_of(const MvSegs &sg, int64_t o)
{
    int m = 0; /* the last matrix starting at or before o; empty ones never qualify
                * (a later matrix starts where they do) unless last, past every row */
#pragma unroll
    for (int j = 1; j < PDC_MV_MULTI_MAX; j++)
        if (j < sg.n && o >= sg.start[j])
            m = j;
    return m;
}

__device__ __forceinline__ int64_t mv_seg_start(const MvSegs &sg, int m)
{
    int64_t v = sg.start[0];
#pragma unroll
    for (int j = 1; j <= PDC_MV_MULTI_MAX; j++)
        if (m == j)
            v = sg.start[j];
    return v;
}

__device__ __forceinline__ const uint8_t *mv_seg_w(const MvSegs &sg, int m)
{
    const uint8_t *v = sg.w[0];
#pragma unroll
    for (int j = 1; j < PDC_MV_MULTI_MAX; j++)
        if (m == j)
            v = sg.w[j];
    return v;
}

__device__ __forceinline__ float *mv_seg_y(const MvSegs &sg, int m)
{
    float *v = sg.y[0];
#pragma unroll
    for (int j = 1; j < PDC_MV_MULTI_MAX; j++)
        if (m == j)
            v = sg.y[j];
    return v;
}

/* kMulti false: one matrix (sg.w[0], sg.y[0], sg.rows rows), the row addressing of
 * the single-matrix kernel exactly, with none of the segment lookups' registers (the
 * per-matrix decode launches, the output matrix); true: up to PDC_MV_MULTI_MAX. */
template <int DT, int TG, bool kVec, bool kMulti>
__global__ void __launch_bounds__(kMvThreads, kMvBlocksPerSm)
    matvec_kernel(const MvSegs sg, int64_t row_bytes, int64_t n_in, const float *x,
                  int64_t T, int chunk, int kstride, bool x_vec)
{
    constexpr bool kQuant = is_quant(DT);
    constexpr int kU = TG == 1 ? 6 : TG <= 4 ? 4 : 2; /* uint4 loads in flight per lane */
    /* a chunk starts k0 / kElemsPer * kBytesPer bytes into the row (k0 is a multiple of
     * 1024); kElemsPer16: elements per uint4 of the float dtypes */
    constexpr int kElemsPer = kQuant ? PD_QK : 1;
    constexpr int kBytesPer = DT == PD_DTYPE_Q8_0   ? 34
                              : DT == PD_DTYPE_Q4_0 ? 18
                              : DT == PD_DTYPE_F32  ? 4
                                                    : 2;
    constexpr int kElemsPer16 = DT == PD_DTYPE_F32 ? 4 : 8;
    extern __shared__ __align__(16) unsigned char mv_smem[];
    float *xs = reinterpret_cast<float *>(mv_smem); /* [TG][kstride] */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint8_t *stage = nullptr;
    if constexpr (kQuant) /* after xs: TG * kstride * 4 is a multiple of 144 bytes */
        stage =
            mv_smem + (size_t)TG * kstride * 4 + (size_t)warp * MvQuant<DT>::kStageBytes;

    const int64_t n_rows = sg.rows; /* every matrix's rows */
    const int64_t n_groups = (T + TG - 1) / TG;
    const int64_t n_rg = (n_rows + kMvWarps - 1) / kMvWarps;
    const int64_t n_chunks = (n_in + chunk - 1) / chunk;
    for (int64_t tg = blockIdx.y; tg < n_groups; tg += gridDim.y) {
        const int64_t t0 = tg * TG;
        const int nt = (int)(T - t0 < TG ? T - t0 : TG);
        bool staged = false; /* block-uniform: xs holds the single chunk of this tg */
        for (int64_t rg = blockIdx.x; rg < n_rg; rg += gridDim.x) {
            const int64_t o = rg * kMvWarps + warp;
            const bool valid = o < n_rows; /* warp-uniform */
            const uint8_t *wrow;
            if constexpr (kMulti) {
                const int m = mv_seg_of(sg, valid ? o : 0); /* the row's matrix */
                wrow =
                    mv_seg_w(sg, m) + (valid ? o - mv_seg_start(sg, m) : 0) * row_bytes;
            } else {
                wrow = sg.w[0] + (valid ? o : 0) * row_bytes;
            }
            float acc[TG];
#pragma unroll
            for (int t = 0; t < TG; t++)
                acc[t] = 0.0f;
            for (int64_t c = 0; c < n_chunks; c++) {
                const int64_t k0 = c * chunk;
                const int kc = (int)(n_in - k0 < chunk ? n_in - k0 : chunk);
                /* the first round of weights is requested before x is staged, so the
                 * staging latency overlaps the weight loads */
                uint4 r[kQuant ? MvQuant<DT>::kLoads : kU];
                const uint8_t *wc = wrow + k0 / kElemsPer * kBytesPer; /* chunk start */
                if constexpr (kVec) {
                    if (valid) {
                        if constexpr (kQuant)
                            quant_round_load<DT>(r, wc, 0, kc / PD_QK, lane);
                        else
                            vec_round_load<kU>(r, reinterpret_cast<const uint4 *>(wc), 0,
                                               kc / kElemsPer16, lane);
                    }
                }
                if (!(staged && n_chunks == 1)) { /* block-uniform condition */
                    __syncthreads();              /* every warp is done with xs */
                    mv_stage_x<kQuant, TG>(xs, kstride, x, n_in, t0, nt, k0, kc, x_vec);
                    __syncthreads();
                    staged = true;
                }
                if (!valid)
                    continue;
                if constexpr (kQuant) {
                    mv_quant<DT, TG, kVec>(wc, kc / PD_QK, xs, kstride, stage, lane, acc,
                                           r);
                } else if constexpr (kVec && DT == PD_DTYPE_F32) {
                    mv_f32_vec<TG, kU>(reinterpret_cast<const uint4 *>(wc), kc / 4, xs,
                                       kstride, lane, acc, r);
                } else if constexpr (kVec) {
                    mv_half_vec<TG, kU, DT == PD_DTYPE_BF16>(
                        reinterpret_cast<const uint4 *>(wc), kc / 8, xs, kstride, lane,
                        acc, r);
                } else {
                    mv_float_scalar<DT, TG>(wc, kc, xs, kstride, lane, acc);
                }
            }
            if (valid) {
                float *y = sg.y[0] + o;
                int64_t n_out = n_rows;
                if constexpr (kMulti) {
                    /* found again rather than kept through the loop (registers) */
                    const int m2 = mv_seg_of(sg, o);
                    const int64_t s0 = mv_seg_start(sg, m2);
                    n_out = mv_seg_start(sg, m2 + 1) - s0;
                    y = mv_seg_y(sg, m2) + (o - s0);
                }
#pragma unroll
                for (int t = 0; t < TG; t++) {
                    const float v = warp_sum(acc[t]);
                    if (lane == 0 && t < nt)
                        y[(t0 + t) * n_out] = v;
                }
            }
        }
    }
}

/* One launch over the matrices of sg (their rows in the grid's row groups); vec: every
 * matrix's rows are 16-byte aligned (the caller checked; it decides the code path, so
 * it must be the same for all of them). */
template <int DT, int TG>
cudaError_t matvec_launch(cudaStream_t s, const MvSegs &sg, bool vec, int64_t n_in,
                          const float *x, int64_t T, int sms)
{
    constexpr bool kQuant = is_quant(DT);
    const int chunk = kMvXFloats / TG; /* a multiple of 1024 */
    const int kmax = (int)(n_in < chunk ? n_in : chunk);
    const int kstride = kQuant ? kmax / 32 * 36 : kmax;
    size_t smem = ((size_t)TG * (size_t)kstride * 4 + 15) / 16 * 16;
    if constexpr (kQuant)
        smem += (size_t)kMvWarps * MvQuant<DT>::kStageBytes;
    const int64_t row_bytes = row_bytes_of((pd_dtype_t)DT, n_in);
    const bool x_vec = aligned16(x) && n_in % 4 == 0;
    const int64_t n_rg = (sg.rows + kMvWarps - 1) / kMvWarps;
    const int64_t cap = (int64_t)sms * kMvBlocksPerSm;
    const int64_t n_groups = (T + TG - 1) / TG;
    dim3 grid((unsigned)(n_rg < cap ? n_rg : cap),
              (unsigned)(n_groups < kRowGridCap ? n_groups : kRowGridCap));
    const bool multi = sg.n > 1;
    if (vec && multi)
        matvec_kernel<DT, TG, true, true><<<grid, kMvThreads, smem, s>>>(
            sg, row_bytes, n_in, x, T, chunk, kstride, x_vec);
    else if (vec)
        matvec_kernel<DT, TG, true, false><<<grid, kMvThreads, smem, s>>>(
            sg, row_bytes, n_in, x, T, chunk, kstride, x_vec);
    else if (multi)
        matvec_kernel<DT, TG, false, true><<<grid, kMvThreads, smem, s>>>(
            sg, row_bytes, n_in, x, T, chunk, kstride, x_vec);
    else
        matvec_kernel<DT, TG, false, false><<<grid, kMvThreads, smem, s>>>(
            sg, row_bytes, n_in, x, T, chunk, kstride, x_vec);
    return cudaGetLastError();
}

template <int DT>
cudaError_t matvec_dtype(cudaStream_t s, const MvSegs &sg, bool vec, int64_t n_in,
                         const float *x, int64_t T, int sms)
{
    if (T <= 1)
        return matvec_launch<DT, 1>(s, sg, vec, n_in, x, T, sms);
    if (T <= 2)
        return matvec_launch<DT, 2>(s, sg, vec, n_in, x, T, sms);
    if (T <= 4)
        return matvec_launch<DT, 4>(s, sg, vec, n_in, x, T, sms);
    return matvec_launch<DT, 8>(s, sg, vec, n_in, x, T, sms);
}

/* ---- argmax and top-p sampling ---- */

/* Index of the largest of l[0..n) (n >= 1), the lowest among equal maxima; every
 * thread gets it. */
__device__ int block_argmax(const float *l, int n, float *red_v, int *red_i)
{
    float bv = -INFINITY;
    int bi = INT32_MAX;
    if ((int)threadIdx.x < n) {
        bv = l[threadIdx.x];
        bi = threadIdx.x;
    }
    for (int i = threadIdx.x + blockDim.x; i < n; i += blockDim.x) {
        const float v = l[i];
        if (v > bv) { /* strict: the first of equal values in this thread's order */
            bv = v;
            bi = i;
        }
    }
    return block_argmax_pair(bv, bi, red_v, red_i);
}

__global__ void __launch_bounds__(kWideThreads)
    argmax_kernel(const float *logits, int64_t rows, int vocab, int32_t *out)
{
    __shared__ float red_v[32];
    __shared__ int red_i[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int best = block_argmax(logits + r * vocab, vocab, red_v, red_i);
        if (threadIdx.x == 0)
            out[r] = best;
    }
}

/* Top-p sampling, one block of 1024 threads per row. With p_i = expf((l_i - max) / T)
 * (unnormalised: the argmax has p = 1) and Z = sum p_i:
 *  1. Nucleus: th = the largest float with mass(p >= th) >= top_p * Z, found by
 *     bisection on the bit pattern of th in [0, 1] (positive floats order as their
 *     bits; ~30 steps, each a block reduction of mass(p >= mid)). The answer is exact
 *     (th is one of the p_i) up to the rounding of the sums. top_p >= 1: th = 0
 *     (every token); top_p * Z <= 0: th = 1 (the maxima only).
 *     To keep the ~30 mass passes off the whole vocabulary, tokens with
 *     p < eps = 0.5 * (1 - top_p) * Z / vocab are dropped first: they hold at most
 *     half of the 1 - top_p tail, so th >= eps and they cannot be in the nucleus. The
 *     survivors are compacted into shared memory in index order (warp-contiguous
 *     segments, ballot prefix); when more than kCandCap survive (a flat
 *     distribution) the passes run over the whole vocabulary instead.
 *  2. Draw: M = mass(p >= th), target = u * M; the answer is the first token in index
 *     order whose inclusive prefix sum of nucleus probabilities exceeds target. The
 *     prefix is a block-wide scan over chunks of 4096 tokens (4 per thread) carrying
 *     the running sum from chunk to chunk; the first chunk containing a crossing
 *     gives the lowest such index (block min). If rounding leaves none (target >= the
 *     scanned total), the last nucleus token with p > 0.
 * The result is a deterministic function of the row, temperature, top_p and u.
 * temperature <= 0 (or so small that 1 / T overflows): argmax. */
constexpr int kCandCap = 5120; /* 40 KiB of candidates */
constexpr int kScanPerThread = 4;

struct SampleSmem {
    float cand_p[kCandCap];
    int32_t cand_i[kCandCap];
    float red[32];
    int red_i[32];
    int warp_cnt[32];
};

struct SampleRow {
    const float *l;
    int vocab;
    float mx, inv_t;
    bool cand; /* items are the candidates in shared memory, else the vocabulary */
    int n_items;

    __device__ float prob(int i) const
    {
        return expf((l[i] - mx) * inv_t);
    }
    /* item j: probability and token id */
    __device__ float item(const SampleSmem &sm, int j, int *id) const
    {
        if (cand) {
            *id = sm.cand_i[j];
            return sm.cand_p[j];
        }
        *id = j;
        return prob(j);
    }
};

__device__ float sample_mass(const SampleRow &row, SampleSmem &sm, float th)
{
    float s = 0.0f;
    for (int j = threadIdx.x; j < row.n_items; j += blockDim.x) {
        int id;
        const float p = row.item(sm, j, &id);
        if (p >= th)
            s += p;
    }
    return block_sum(s, sm.red);
}

/* Compacts the tokens with p >= eps into sm (index order); false (nothing usable
 * written) when more than kCandCap of them. */
__device__ bool sample_compact(SampleRow &row, SampleSmem &sm, float eps)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int seg = (row.vocab + nw - 1) / nw; /* warp w: tokens [w * seg, ...) */
    const int start = w * seg;
    const int end = min(start + seg, row.vocab);
    int cnt = 0;
    for (int base = start; base < end; base += 32) { /* warp-uniform bounds */
        const int i = base + lane;
        const bool f = i < end && row.prob(i) >= eps;
        cnt += __popc(__ballot_sync(kFull, f));
    }
    __syncthreads(); /* warp_cnt of a previous row has been read */
    if (lane == 0)
        sm.warp_cnt[w] = cnt;
    __syncthreads();
    int off = 0, total = 0;
    for (int k = 0; k < nw; k++) {
        off += k < w ? sm.warp_cnt[k] : 0;
        total += sm.warp_cnt[k];
    }
    if (total > kCandCap) /* block-uniform */
        return false;
    for (int base = start; base < end; base += 32) {
        const int i = base + lane;
        const float p = i < end ? row.prob(i) : 0.0f;
        const bool f = i < end && p >= eps; /* the same bits as the counting pass */
        const unsigned b = __ballot_sync(kFull, f);
        if (f) {
            const int at = off + __popc(b & ((1u << lane) - 1u));
            sm.cand_p[at] = p;
            sm.cand_i[at] = i;
        }
        off += __popc(b);
    }
    __syncthreads();
    row.cand = true;
    row.n_items = total;
    return true;
}

/* The draw of step 2 over the items (nucleus: p >= th). */
__device__ int sample_draw(const SampleRow &row, SampleSmem &sm, float th, float target)
{
    float carry = 0.0f;
    int last = -1;
    constexpr int kPer = kScanPerThread;
    for (int c0 = 0; c0 < row.n_items; c0 += kPer * (int)blockDim.x) { /* uniform */
        float v[kPer];
        int id[kPer];
        float tsum = 0.0f;
#pragma unroll
        for (int k = 0; k < kPer; k++) {
            const int j = c0 + kPer * (int)threadIdx.x + k;
            v[k] = 0.0f;
            id[k] = -1;
            if (j < row.n_items) {
                const float p = row.item(sm, j, &id[k]);
                v[k] = p >= th ? p : 0.0f;
            }
            tsum += v[k];
        }
        float chunk_total;
        float run = carry + block_scan_excl(tsum, sm.red, &chunk_total);
        int found = INT32_MAX;
#pragma unroll
        for (int k = 0; k < kPer; k++) {
            run += v[k];
            if (v[k] > 0.0f) {
                last = max(last, id[k]);
                if (run > target && found == INT32_MAX)
                    found = id[k];
            }
        }
        found = block_minmax_int<0>(found, sm.red_i);
        if (found != INT32_MAX)
            return found;
        carry += chunk_total;
    }
    return block_minmax_int<1>(last, sm.red_i);
}

__global__ void __launch_bounds__(kWideThreads)
    sample_top_p_kernel(const float *logits, int64_t rows, int vocab,
                        const float *temperature, const float *top_p, const float *u,
                        int32_t *out)
{
    __shared__ SampleSmem sm;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        SampleRow row;
        row.l = logits + r * vocab;
        row.vocab = vocab;
        const float temp = temperature[r];
        row.inv_t = 1.0f / temp;
        if (!(temp > 0.0f) || isinf(row.inv_t)) {
            const int best = block_argmax(row.l, vocab, sm.red, sm.red_i);
            if (threadIdx.x == 0)
                out[r] = best;
            continue;
        }
        float mx = -INFINITY;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            mx = fmaxf(mx, row.l[i]);
        row.mx = block_max(mx, sm.red);
        row.cand = false;
        row.n_items = vocab;
        float z = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            z += row.prob(i);
        z = block_sum(z, sm.red);

        const float tp = top_p[r];
        float th = 0.0f, m = z;
        if (!(tp >= 1.0f)) {
            const float goal = tp * z;
            if (!(goal > 0.0f)) {
                th = 1.0f;
            } else {
                const float eps = 0.5f * (1.0f - tp) * z / (float)vocab;
                sample_compact(row, sm, eps); /* else the passes read the vocabulary */
                uint32_t lo = 0u, hi = 0x3f800001u; /* mass(lo) >= goal > mass(hi) */
                while (hi - lo > 1u) {
                    const uint32_t mid = lo + (hi - lo) / 2u;
                    if (sample_mass(row, sm, __uint_as_float(mid)) >= goal)
                        lo = mid;
                    else
                        hi = mid;
                }
                th = __uint_as_float(lo);
            }
            m = sample_mass(row, sm, th);
        }
        const int tok = sample_draw(row, sm, th, u[r] * m);
        if (threadIdx.x == 0)
            out[r] = tok;
    }
}

} /* namespace */

/* ---- entry points ---- */

extern "C" cudaError_t pdc_get_rows(cudaStream_t s, pd_dtype_t dtype, const void *w,
                                    int64_t ne0, const int32_t *ids, int64_t n,
                                    float *out)
{
    if (!dtype_ok(dtype, ne0) || ne0 < 0)
        return cudaErrorInvalidValue;
    if (n <= 0 || ne0 == 0)
        return cudaSuccess;
    const int64_t rb = row_bytes_of(dtype, ne0);
    const uint8_t *wb = static_cast<const uint8_t *>(w);
    const unsigned g = grid_rows(n);
    switch (dtype) {
    case PD_DTYPE_F32:
        get_rows_kernel<PD_DTYPE_F32><<<g, kThreads, 0, s>>>(wb, ne0, rb, ids, n, out);
        break;
    case PD_DTYPE_F16:
        get_rows_kernel<PD_DTYPE_F16><<<g, kThreads, 0, s>>>(wb, ne0, rb, ids, n, out);
        break;
    case PD_DTYPE_BF16:
        get_rows_kernel<PD_DTYPE_BF16><<<g, kThreads, 0, s>>>(wb, ne0, rb, ids, n, out);
        break;
    case PD_DTYPE_Q8_0:
        get_rows_kernel<PD_DTYPE_Q8_0><<<g, kThreads, 0, s>>>(wb, ne0, rb, ids, n, out);
        break;
    case PD_DTYPE_Q4_0:
        get_rows_kernel<PD_DTYPE_Q4_0><<<g, kThreads, 0, s>>>(wb, ne0, rb, ids, n, out);
        break;
    }
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_rmsnorm(cudaStream_t s, float *out, const float *x,
                                   const float *weight, int64_t T, int64_t n, float eps)
{
    if (T <= 0 || n <= 0)
        return cudaSuccess;
    rmsnorm_kernel<<<grid_rows(T), kRowThreads, 0, s>>>(out, x, weight, T, n, eps);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_rope(cudaStream_t s, float *x, const int32_t *pos, int64_t T,
                                int n_heads, int head_dim, float theta)
{
    if (head_dim % 2 != 0 || n_heads < 0 || head_dim < 0)
        return cudaErrorInvalidValue;
    const int64_t total = T * n_heads * (head_dim / 2);
    if (T <= 0 || total == 0)
        return cudaSuccess;
    rope_kernel<<<grid_for(total, kThreads), kThreads, 0, s>>>(x, pos, T, n_heads,
                                                               head_dim, theta);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_softmax(cudaStream_t s, float *x, int64_t T, int64_t n)
{
    if (T <= 0 || n <= 0)
        return cudaSuccess;
    softmax_kernel<<<grid_rows(T), kRowThreads, 0, s>>>(x, T, n);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_silu_mul(cudaStream_t s, float *gate, const float *up,
                                    int64_t n)
{
    if (n <= 0)
        return cudaSuccess;
    silu_mul_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(gate, up, n);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_add(cudaStream_t s, float *y, const float *x, int64_t n)
{
    if (n <= 0)
        return cudaSuccess;
    add_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(y, x, n);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_kv_write(cudaStream_t s, void *cache, pd_dtype_t kv_dtype,
                                    int64_t row_elems, const int32_t *slots, int64_t T,
                                    const float *src)
{
    if (kv_dtype != PD_DTYPE_F32 && kv_dtype != PD_DTYPE_F16)
        return cudaErrorInvalidValue;
    if (T <= 0 || row_elems <= 0)
        return cudaSuccess;
    kv_write_kernel<<<grid_rows(T), kThreads, 0, s>>>(cache, kv_dtype == PD_DTYPE_F16,
                                                      row_elems, slots, T, src);
    return cudaGetLastError();
}

namespace
{

/* Whether the rows of w take the vector path (16-byte aligned base and rows). */
bool mv_vec(pd_dtype_t dtype, const void *w, int64_t n_in)
{
    return aligned16(w) && row_bytes_of(dtype, n_in) % 16 == 0;
}

/* The matvec of the matrices in sg (checked by the caller). */
cudaError_t matvec_run(cudaStream_t s, pd_dtype_t dtype, const MvSegs &sg, bool vec,
                       int64_t n_in, const float *x, int64_t T)
{
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess)
        return err;
    if (sms < 1)
        sms = 1;
    switch (dtype) {
    case PD_DTYPE_F32:
        return matvec_dtype<PD_DTYPE_F32>(s, sg, vec, n_in, x, T, sms);
    case PD_DTYPE_F16:
        return matvec_dtype<PD_DTYPE_F16>(s, sg, vec, n_in, x, T, sms);
    case PD_DTYPE_BF16:
        return matvec_dtype<PD_DTYPE_BF16>(s, sg, vec, n_in, x, T, sms);
    case PD_DTYPE_Q8_0:
        return matvec_dtype<PD_DTYPE_Q8_0>(s, sg, vec, n_in, x, T, sms);
    case PD_DTYPE_Q4_0:
        return matvec_dtype<PD_DTYPE_Q4_0>(s, sg, vec, n_in, x, T, sms);
    }
    return cudaErrorInvalidValue;
}

} /* namespace */

extern "C" cudaError_t pdc_matvec(cudaStream_t s, pd_dtype_t dtype, const void *w,
                                  int64_t n_in, int64_t n_out, const float *x, int64_t T,
                                  float *y)
{
    if (!dtype_ok(dtype, n_in) || n_in < 0 || n_out < 0)
        return cudaErrorInvalidValue;
    if (T <= 0 || n_out == 0)
        return cudaSuccess;
    MvSegs sg = {};
    sg.w[0] = static_cast<const uint8_t *>(w);
    sg.y[0] = y;
    sg.start[1] = sg.rows = n_out;
    sg.n = 1;
    return matvec_run(s, dtype, sg, mv_vec(dtype, w, n_in), n_in, x, T);
}

/* One launch when every matrix takes the same path (vector or not: the paths sum in
 * different orders, and each matrix must get the bits pdc_matvec gives it), else one
 * launch per matrix. */
extern "C" cudaError_t pdc_matvec_multi(cudaStream_t s, pd_dtype_t dtype,
                                        const void *const *ws, const int64_t *n_outs,
                                        float *const *ys, int n, int64_t n_in,
                                        const float *x, int64_t T)
{
    if (!ws || !n_outs || !ys || n < 1 || n > PDC_MV_MULTI_MAX ||
        !dtype_ok(dtype, n_in) || n_in < 0)
        return cudaErrorInvalidValue;
    for (int m = 0; m < n; m++)
        if (!ws[m] || !ys[m] || n_outs[m] < 0)
            return cudaErrorInvalidValue;
    if (T <= 0)
        return cudaSuccess;
    const bool vec = mv_vec(dtype, ws[0], n_in);
    bool same = true;
    for (int m = 1; m < n; m++)
        same = same && mv_vec(dtype, ws[m], n_in) == vec;
    if (!same) {
        for (int m = 0; m < n; m++) {
            cudaError_t err = pdc_matvec(s, dtype, ws[m], n_in, n_outs[m], x, T, ys[m]);
            if (err != cudaSuccess)
                return err;
        }
        return cudaSuccess;
    }
    MvSegs sg = {};
    for (int m = 0; m < n; m++) {
        sg.w[m] = static_cast<const uint8_t *>(ws[m]);
        sg.y[m] = ys[m];
        sg.start[m + 1] = sg.start[m] + n_outs[m];
    }
    sg.n = n;
    sg.rows = sg.start[n];
    if (sg.rows == 0)
        return cudaSuccess;
    return matvec_run(s, dtype, sg, vec, n_in, x, T);
}

extern "C" cudaError_t pdc_f32_to_half(cudaStream_t s, pd_dtype_t dst_dtype,
                                       const float *src, void *dst, int64_t n)
{
    if (dst_dtype != PD_DTYPE_F16 && dst_dtype != PD_DTYPE_BF16)
        return cudaErrorInvalidValue;
    if (n <= 0)
        return cudaSuccess;
    f32_to_half_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
        dst_dtype == PD_DTYPE_BF16, src, static_cast<uint16_t *>(dst), n);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_half_to_f32(cudaStream_t s, pd_dtype_t src_dtype,
                                       const void *src, float *dst, int64_t n)
{
    if (src_dtype != PD_DTYPE_F16 && src_dtype != PD_DTYPE_BF16)
        return cudaErrorInvalidValue;
    if (n <= 0)
        return cudaSuccess;
    half_to_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
        src_dtype == PD_DTYPE_BF16, static_cast<const uint16_t *>(src), dst, n);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_argmax(cudaStream_t s, const float *logits, int64_t rows,
                                  int64_t vocab, int32_t *out)
{
    if (vocab <= 0 || vocab > INT32_MAX)
        return cudaErrorInvalidValue;
    if (rows <= 0)
        return cudaSuccess;
    argmax_kernel<<<grid_rows(rows), kWideThreads, 0, s>>>(logits, rows, (int)vocab, out);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_sample_top_p(cudaStream_t s, const float *logits, int64_t rows,
                                        int64_t vocab, const float *temperature,
                                        const float *top_p, const float *u, int32_t *out)
{
    if (vocab <= 0 || vocab > INT32_MAX)
        return cudaErrorInvalidValue;
    if (rows <= 0)
        return cudaSuccess;
    sample_top_p_kernel<<<grid_rows(rows), kWideThreads, 0, s>>>(
        logits, rows, (int)vocab, temperature, top_p, u, out);
    return cudaGetLastError();
}

/* Row copies as 16-byte words when every row and both bases allow it, else 4-byte. */
static cudaError_t kv_copy(cudaStream_t s, bool scatter, void *cache, int64_t row_bytes,
                           const int32_t *slots, int64_t n, void *rows)
{
    if (row_bytes <= 0 || row_bytes % 4 != 0)
        return cudaErrorInvalidValue;
    if (n <= 0)
        return cudaSuccess;
    const unsigned g = grid_rows(n);
    if (row_bytes % 16 == 0 && aligned16(cache) && aligned16(rows)) {
        uint4 *c = static_cast<uint4 *>(cache), *r = static_cast<uint4 *>(rows);
        if (scatter)
            kv_copy_kernel<uint4, true>
                <<<g, kThreads, 0, s>>>(c, row_bytes / 16, slots, n, r);
        else
            kv_copy_kernel<uint4, false>
                <<<g, kThreads, 0, s>>>(c, row_bytes / 16, slots, n, r);
    } else {
        uint32_t *c = static_cast<uint32_t *>(cache), *r = static_cast<uint32_t *>(rows);
        if (scatter)
            kv_copy_kernel<uint32_t, true>
                <<<g, kThreads, 0, s>>>(c, row_bytes / 4, slots, n, r);
        else
            kv_copy_kernel<uint32_t, false>
                <<<g, kThreads, 0, s>>>(c, row_bytes / 4, slots, n, r);
    }
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_kv_gather(cudaStream_t s, const void *cache, int64_t row_bytes,
                                     const int32_t *slots, int64_t n, void *dst)
{
    /* the kernel only reads the cache when gathering */
    return kv_copy(s, false, const_cast<void *>(cache), row_bytes, slots, n, dst);
}

extern "C" cudaError_t pdc_kv_scatter(cudaStream_t s, void *cache, int64_t row_bytes,
                                      const int32_t *slots, int64_t n, const void *src)
{
    /* the kernel only reads the rows when scattering */
    return kv_copy(s, true, cache, row_bytes, slots, n, const_cast<void *>(src));
}
