/* attention.cu - paged attention on the GPU: flash-decoding for single queries,
 * flash-attention tiles for prompt chunks (kernels/ops.h semantics).
 *
 * Decode (pdc_attn_decode): one block per (query, kv head, split of PDC_ATTN_SPLIT
 * positions). The block serves every query head of its kv head group, so each K/V row
 * is read from memory once per group. A K/V row is read by a few lanes with vector
 * loads (16 bytes where registers allow); each lane keeps the group's q slices in
 * registers, so one loaded element feeds one FMA per head. The per-head dot products
 * are reduced across the row's lanes with a transposing butterfly (about G shuffles
 * for G heads instead of G log2(lanes)). Scores then probabilities live in shared memory;
 * the V pass accumulates per lane, then per warp, then across warps in fixed order.
 * Partials go to scratch [n_q][n_heads][n_splits][head_dim + 2] and a second kernel
 * folds them in split order as dispatch.c's attn_fold does. Every reduction order is
 * fixed by (head_dim, group, dtype) alone, so a query's output does not depend on the
 * rest of the batch.
 * Two variants of the split kernel (pdc_attn_decode_variant), one template: REGS loads
 * K rows, then V rows, into registers U rows per lane at a time, so a block keeps at
 * most about 16 KiB in flight; VSTAGE copies every V row of the split into dynamic
 * shared memory with cp.async as soon as the row offsets are known, so the whole
 * split's V bytes (up to 64 KiB) are in flight during the K pass and the softmax, and
 * the V pass reads shared memory. The floats and their order are the same: VSTAGE
 * gives REGS's bits. Shapes whose stage would pass 64 KiB, and devices that cannot
 * give a block the stage plus the static shared memory, run REGS.
 *
 * Prefill (pdc_attn_prefill): one block per (64-query tile of a run, query head).
 * Q, K (then V, in the same buffer) and P tiles in dynamic shared memory, 4x4 register
 * tiles of scores per thread, online softmax per row (running max and sum), F32
 * arithmetic on CUDA cores. The next K/V tile is prefetched into registers while the
 * current one is used. A row's result does not depend on its place in the tile: key
 * tiles are aligned to absolute positions and fully masked tiles change nothing.
 *
 * Threading: host functions enqueue on the given stream and return; they are called
 * from the engine thread of one backend. The shared-memory opt-ins (prefill, VSTAGE
 * decode) are set lazily, once per device and instantiation, before the first launch
 * (cudaFuncSetAttribute is no stream operation, so this also works under graph
 * capture). */
#include <cuda_fp16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/cp_async.cuh"

#define NT        256 /* threads per block, both kernels */
#define NW        (NT / 32)
#define FULL_MASK 0xffffffffu

__host__ __device__ constexpr int cmin(int a, int b)
{
    return a < b ? a : b;
}
__host__ __device__ constexpr int cmax(int a, int b)
{
    return a > b ? a : b;
}
__host__ __device__ constexpr int ilog2(int x)
{
    return x <= 1 ? 0 : 1 + ilog2(x / 2);
}

__device__ __forceinline__ float h2f(unsigned int bits)
{
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

/* Butterfly sum: every lane ends with the same bits (each level adds the same two
 * values, and float addition commutes). */
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

/* One vector load: through the read-only cache from global memory (SH false), or a
 * plain load from shared memory (SH true: the VSTAGE V stage). */
template <bool SH, class T> __device__ __forceinline__ T ld_vec(const T *p)
{
    if constexpr (SH)
        return *p;
    else
        return __ldg(p);
}

/* E consecutive cache elements at element offset off, as floats, from a cache in global
 * memory (SH false) or from staged rows in shared memory (SH true); both give the same
 * floats for the same bits. The caller guarantees alignment to E elements (rows are
 * multiples of 8 elements, bases 16-byte aligned, staged rows too): F32 E = 2 (8 B),
 * 4 (16 B), 8 (2 x 16 B); F16 E = 2 (4 B), 4 (8 B), 8 (16 B). */
template <int E, bool F16, bool SH>
__device__ __forceinline__ void load_frag(const void *base, int64_t off, float (&f)[E])
{
    if constexpr (!F16) {
        const float *p = static_cast<const float *>(base) + off;
        if constexpr (E == 2) {
            float2 v = ld_vec<SH>(reinterpret_cast<const float2 *>(p));
            f[0] = v.x;
            f[1] = v.y;
        } else {
#pragma unroll
            for (int j = 0; j < E / 4; j++) {
                float4 v = ld_vec<SH>(reinterpret_cast<const float4 *>(p) + j);
                f[4 * j + 0] = v.x;
                f[4 * j + 1] = v.y;
                f[4 * j + 2] = v.z;
                f[4 * j + 3] = v.w;
            }
        }
    } else {
        const uint16_t *p = static_cast<const uint16_t *>(base) + off;
        if constexpr (E == 2) {
            unsigned int w = ld_vec<SH>(reinterpret_cast<const unsigned int *>(p));
            f[0] = h2f(w);
            f[1] = h2f(w >> 16);
        } else if constexpr (E == 4) {
            uint2 w = ld_vec<SH>(reinterpret_cast<const uint2 *>(p));
            f[0] = h2f(w.x);
            f[1] = h2f(w.x >> 16);
            f[2] = h2f(w.y);
            f[3] = h2f(w.y >> 16);
        } else {
#pragma unroll
            for (int j = 0; j < E / 8; j++) {
                uint4 w = ld_vec<SH>(reinterpret_cast<const uint4 *>(p) + j);
                f[8 * j + 0] = h2f(w.x);
                f[8 * j + 1] = h2f(w.x >> 16);
                f[8 * j + 2] = h2f(w.y);
                f[8 * j + 3] = h2f(w.y >> 16);
                f[8 * j + 4] = h2f(w.z);
                f[8 * j + 5] = h2f(w.z >> 16);
                f[8 * j + 6] = h2f(w.w);
                f[8 * j + 7] = h2f(w.w >> 16);
            }
        }
    }
}

/* ---- decode: split partials ---------------------------------------------------- */

/* The lane layout of one decode instantiation. HDP: head_dim (a multiple of 8) rounded
 * up to a power of two, 32..256; lanes past head_dim load nothing (E divides 8, so a
 * lane's elements are all inside the row or all past it). GP: group size rounded up to
 * a power of two (1..16; heads past the group compute zeros that nobody writes).
 * E: elements of a row per lane: 16 bytes where the q registers (GP * E) stay <= 64,
 * fewer for large groups, and never so few that a row needs more than 32 lanes.
 * LPR lanes read one row, RPW rows per warp at a time; GP <= LPR lets the butterfly
 * hand each head to its own lanes. U rows per lane are loaded before any is used (64
 * bytes in flight per lane). HC heads per pass of the cross-warp reduction.
 * VS_BYTES: the largest V stage of the instantiation (SPLIT rows of HDP elements; a
 * launch stages rows of head_dim <= HDP); VS_OK: it is at most DEC_VS_MAX, so VSTAGE
 * is built for this instantiation. As 64 KiB / SPLIT / ES is a power of two, a
 * head_dim whose stage fits always rounds to an HDP with VS_OK. */
#define DEC_VS_MAX (64 * 1024)
template <int HDP_, int GP_, bool F16_> struct dec_cfg {
    static constexpr int HDP = HDP_, GP = GP_;
    static constexpr bool F16 = F16_;
    static constexpr int ES = F16 ? 2 : 4;
    static constexpr int E = cmax(HDP / 32, cmin(16 / ES, cmin(HDP / GP, 64 / GP)));
    static constexpr int LPR = HDP / E;
    static constexpr int RPW = 32 / LPR;
    static constexpr int U = cmin(GP >= 16 ? 4 : 8, cmax(1, 64 / (E * ES)));
    static constexpr int HC = cmin(GP, cmax(1, 512 / HDP));
    static constexpr int MIN_BLOCKS = GP * E <= 32 ? 3 : (GP * E <= 64 ? 2 : 1);
    static constexpr int VS_BYTES = PDC_ATTN_SPLIT * HDP * ES;
    static constexpr bool VS_OK = VS_BYTES <= DEC_VS_MAX;
    static_assert(E >= 2 && LPR * E == HDP && LPR <= 32 && GP <= LPR, "lane layout");
    static_assert(GP % HC == 0, "reduction passes");
};

typedef struct dec_params {
    const float *q;
    const void *k, *v;
    const int32_t *pos, *seq, *bt, *q_idx;
    float *scratch; /* [n_q][n_heads][ns_max][hd + 2] */
    int64_t bt_stride;
    int bs, n_heads, nkv, hd, G, ns_max;
    float scale;
} dec_params_t;

/* The GP per-lane partial dot products s[] of one row, summed over the row's LPR
 * lanes. Halving steps over the top log2(GP) lane bits: a lane keeps half of its
 * heads, sends the other half to its partner and adds what the partner sent, so after
 * them lane sub holds head sub / (LPR / GP) summed over 2^log2(GP) lanes; plain xor
 * steps over the low bits finish the sum. Every lane must call this (full mask). */
template <int GP, int LPR>
__device__ __forceinline__ float reduce_heads(float (&s)[GP], int sub)
{
    constexpr int LG = ilog2(GP);
#pragma unroll
    for (int k = 0; k < LG; k++) {
        const int half = GP >> (k + 1);
        const int off = LPR >> (k + 1);
        const bool up = (sub & off) != 0;
#pragma unroll
        for (int j = 0; j < half; j++) {
            const float send = up ? s[j] : s[j + half];
            const float keep = up ? s[j + half] : s[j];
            s[j] = keep + __shfl_xor_sync(FULL_MASK, send, off);
        }
    }
    float v = s[0];
#pragma unroll
    for (int off = LPR / (2 * GP); off >= 1; off >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

/* Shared memory of one decode block: q staging [GP][HDP] then scores and
 * probabilities [GP][SST] (SST odd, which spreads a column's heads over banks), the
 * element offsets of the split's rows (kv head included), the cross-warp reduction
 * buffer [warp][HC][HDP], and each head's max and sum. */
#define DEC_SST (PDC_ATTN_SPLIT + 1)
template <class C> struct dec_smem {
    __align__(16) float buf[C::GP * DEC_SST];
    __align__(16) float red[NW * C::HC * C::HDP];
    int64_t row[PDC_ATTN_SPLIT];
    float m[C::GP], l[C::GP];
    static_assert(C::HDP <= DEC_SST, "q staging fits in the score buffer");
};

/* The second __launch_bounds__ argument. REGS: C::MIN_BLOCKS, as measured. VSTAGE: no
 * more blocks than the shared memory lets onto an SM (sm_90: 228 KiB per SM, 1 KiB of
 * it reserved per block; the largest stage of the instantiation), which for the big
 * stages is fewer than MIN_BLOCKS: asking for more would only cap the registers per
 * thread below what REGS gets at the occupancy that can really be reached (a spill
 * risk for nothing). Never more than MIN_BLOCKS, so VSTAGE's register cap is at least
 * REGS's and it spills no more than REGS does. */
template <class C, bool VS> constexpr int dec_min_blocks()
{
    if constexpr (!VS) {
        return C::MIN_BLOCKS;
    } else {
        constexpr int per_block = C::VS_BYTES + (int)sizeof(dec_smem<C>) + 1024;
        return cmax(1, cmin(C::MIN_BLOCKS, 228 * 1024 / per_block));
    }
}

/* Where a thread sits in the decode layout: warp, row group within the warp (rig), lane
 * within the row (sub) and its first element of a row (e0); inactive lanes lie past
 * head_dim and load nothing. */
typedef struct dec_lane {
    int tid, lane, warp, sub, rig, e0;
    bool active;
} dec_lane_t;

/* Row r (< nv) handled by this lane at unrolled step u of the pass starting at base. */
template <class C>
__device__ __forceinline__ int dec_row(const dec_lane_t &ln, int base, int u)
{
    return base + u * (NW * C::RPW) + ln.warp * C::RPW + ln.rig;
}

/* VSTAGE: the split's V rows (kv head g's slice of each, hd elements at sm.row[r])
 * into vst [nv][hd] of the kv dtype, packed, so 16-byte unit u of the stage is unit
 * u % upr of row u / upr (rows are hd * ES bytes, a multiple of 16: hd % 8 == 0; the
 * cache rows are 16-byte aligned as the cache base is). Spread over the whole block,
 * consecutive threads on consecutive units of a row. Nothing waits here: the copies
 * stay in flight through the K pass and the softmax, and the kernel waits for them
 * (cp.async.wait_all, then a barrier) before the V pass. */
template <class C>
__device__ __forceinline__ void dec_stage_v(const dec_params_t &p, const dec_smem<C> &sm,
                                            void *vst, const dec_lane_t &ln, int nv)
{
    const int upr = p.hd * C::ES / 16;
    const int n = nv * upr; /* at most SPLIT * 16 */
    const char *src = static_cast<const char *>(p.v);
    char *dst = static_cast<char *>(vst);
    for (int u = ln.tid; u < n; u += NT) {
        const int r = u / upr, c = u - r * upr;
        cp_async16(dst + (int64_t)u * 16, src + sm.row[r] * C::ES + (int64_t)c * 16);
    }
}

/* Row offsets of the split and the group's q rows (heads g*G.. are consecutive) into
 * shared memory, zero-padded to [GP][HDP]; then each lane's q slices into registers.
 * VS: the V rows' copies into vst start as soon as the row offsets are visible. */
template <class C, bool VS>
__device__ __forceinline__ void dec_stage(const dec_params_t &p, dec_smem<C> &sm,
                                          void *vst, const dec_lane_t &ln, int t, int g,
                                          int p0, int nv, float (&qf)[C::GP][C::E])
{
    const int32_t *tbl = p.bt + (int64_t)p.seq[t] * p.bt_stride;
    for (int j = ln.tid; j < nv; j += NT) {
        const int pp = p0 + j;
        const int64_t blk = tbl[pp / p.bs];
        sm.row[j] = ((blk * p.bs + pp % p.bs) * p.nkv + g) * p.hd;
    }
    const int64_t qbase = ((int64_t)t * p.n_heads + (int64_t)g * p.G) * p.hd;
    for (int j = ln.tid; j < C::GP * C::HDP; j += NT) {
        const int h = j / C::HDP, e = j % C::HDP;
        sm.buf[j] = (h < p.G && e < p.hd) ? p.q[qbase + (int64_t)h * p.hd + e] : 0.0f;
    }
    __syncthreads();
    if constexpr (VS)
        dec_stage_v<C>(p, sm, vst, ln, nv);
#pragma unroll
    for (int h = 0; h < C::GP; h++)
#pragma unroll
        for (int j = 0; j < C::E; j++)
            qf[h][j] = sm.buf[h * C::HDP + ln.e0 + j];
    __syncthreads(); /* buf becomes the score buffer */
}

/* U rows of K or V for this lane (zeros past nv or head_dim): from the cache in
 * global memory at sm.row[r] (SH false), or from the V stage [nv][hd] in shared
 * memory (SH true). The same elements either way. */
template <class C, bool SH>
__device__ __forceinline__ void dec_load_rows(const void *src, const dec_smem<C> &sm,
                                              const dec_lane_t &ln, int hd, int base,
                                              int nv, float (&f)[C::U][C::E])
{
#pragma unroll
    for (int u = 0; u < C::U; u++) {
        const int r = dec_row<C>(ln, base, u);
        if (ln.active && r < nv) {
            const int64_t off = SH ? (int64_t)r * hd : sm.row[r];
            load_frag<C::E, C::F16, SH>(src, off + ln.e0, f[u]);
        } else {
#pragma unroll
            for (int j = 0; j < C::E; j++)
                f[u][j] = 0.0f;
        }
    }
}

/* buf[h][r] = dot(q_h, k_r) * scale for every row of the split and every head. The
 * loop bounds are block-uniform and every lane reaches every shuffle. */
template <class C>
__device__ __forceinline__ void dec_scores(const dec_params_t &p, dec_smem<C> &sm,
                                           const dec_lane_t &ln, int nv,
                                           const float (&qf)[C::GP][C::E])
{
    constexpr int HPL = C::LPR / C::GP; /* lanes holding each head after reduce_heads */
    for (int base = 0; base < nv; base += NW * C::RPW * C::U) {
        float kf[C::U][C::E];
        dec_load_rows<C, false>(p.k, sm, ln, p.hd, base, nv, kf);
#pragma unroll
        for (int u = 0; u < C::U; u++) {
            float s[C::GP];
#pragma unroll
            for (int h = 0; h < C::GP; h++) {
                s[h] = 0.0f;
#pragma unroll
                for (int j = 0; j < C::E; j++)
                    s[h] = fmaf(qf[h][j], kf[u][j], s[h]);
            }
            const float v = reduce_heads<C::GP, C::LPR>(s, ln.sub);
            const int r = dec_row<C>(ln, base, u);
            if (r < nv && ln.sub % HPL == 0)
                sm.buf[(ln.sub / HPL) * DEC_SST + r] = v * p.scale;
        }
    }
}

/* Per real head, one warp each: m = max score, buf = expf(score - m), l = sum, as the
 * CPU chunk does. Padding heads keep their zero scores (their sums are never used). */
template <class C>
__device__ __forceinline__ void dec_softmax(dec_smem<C> &sm, const dec_lane_t &ln, int nv,
                                            int G)
{
    for (int h = ln.warp; h < G; h += NW) { /* warp-uniform */
        float *sr = sm.buf + h * DEC_SST;
        float m = -INFINITY;
        for (int r = ln.lane; r < nv; r += 32)
            m = fmaxf(m, sr[r]);
        m = warp_max(m);
        float l = 0.0f;
        for (int r = ln.lane; r < nv; r += 32) {
            const float e = expf(sr[r] - m);
            sr[r] = e;
            l += e;
        }
        l = warp_sum(l);
        if (ln.lane == 0) {
            sm.m[h] = m;
            sm.l[h] = l;
        }
    }
}

/* acc[h][j] = sum over this lane's rows (in order) of p[h][r] * v_r[e0 + j], then
 * summed over the warp's row groups (lane bits LPR..16). V rows from the cache (VS
 * false) or from the stage vst (VS true, complete and visible): the same floats in the
 * same order, so the same bits. */
template <class C, bool VS>
__device__ __forceinline__ void dec_values(const dec_params_t &p, const dec_smem<C> &sm,
                                           const void *vst, const dec_lane_t &ln, int nv,
                                           float (&acc)[C::GP][C::E])
{
#pragma unroll
    for (int h = 0; h < C::GP; h++)
#pragma unroll
        for (int j = 0; j < C::E; j++)
            acc[h][j] = 0.0f;
    for (int base = 0; base < nv; base += NW * C::RPW * C::U) {
        float vf[C::U][C::E];
        dec_load_rows<C, VS>(VS ? vst : p.v, sm, ln, p.hd, base, nv, vf);
#pragma unroll
        for (int u = 0; u < C::U; u++) {
            const int r = dec_row<C>(ln, base, u);
            if (r < nv) {
#pragma unroll
                for (int h = 0; h < C::GP; h++) {
                    const float pr = sm.buf[h * DEC_SST + r];
#pragma unroll
                    for (int j = 0; j < C::E; j++)
                        acc[h][j] = fmaf(pr, vf[u][j], acc[h][j]);
                }
            }
        }
    }
#pragma unroll
    for (int off = C::LPR; off < 32; off <<= 1)
#pragma unroll
        for (int h = 0; h < C::GP; h++)
#pragma unroll
            for (int j = 0; j < C::E; j++)
                acc[h][j] += __shfl_xor_sync(FULL_MASK, acc[h][j], off);
}

/* The partials of the group's real heads: acc summed across warps in order 0..NW-1,
 * HC heads per pass through red, then m and l. part: head 0 of the group, this split. */
template <class C>
__device__ __forceinline__ void dec_write(const dec_params_t &p, dec_smem<C> &sm,
                                          const dec_lane_t &ln,
                                          const float (&acc)[C::GP][C::E], float *part)
{
    constexpr int HC = C::HC;
    const int hd = p.hd;
    const int64_t head_stride = (int64_t)p.ns_max * (hd + 2); /* between heads */
#pragma unroll
    for (int c0 = 0; c0 < C::GP; c0 += HC) {
        if (c0 >= p.G)
            break; /* block-uniform */
        if (ln.rig == 0) {
#pragma unroll
            for (int hh = 0; hh < HC; hh++)
#pragma unroll
                for (int j = 0; j < C::E; j++)
                    sm.red[(ln.warp * HC + hh) * C::HDP + ln.e0 + j] = acc[c0 + hh][j];
        }
        __syncthreads();
        const int n = cmin(HC, p.G - c0) * hd;
        for (int j = ln.tid; j < n; j += NT) {
            const int hh = j / hd, e = j - hh * hd;
            float sum = sm.red[hh * C::HDP + e];
#pragma unroll
            for (int w = 1; w < NW; w++)
                sum += sm.red[(w * HC + hh) * C::HDP + e];
            part[(int64_t)(c0 + hh) * head_stride + e] = sum;
        }
        __syncthreads();
    }
    if (ln.tid < p.G) {
        part[(int64_t)ln.tid * head_stride + hd] = sm.m[ln.tid];
        part[(int64_t)ln.tid * head_stride + hd + 1] = sm.l[ln.tid];
    }
}

/* Grid (query in the list, kv head, split); NT threads. Positions
 * [split * SPLIT, min((split + 1) * SPLIT, pos + 1)) of the query's sequence. A block
 * whose split starts past pos exits at once, writing nothing: the fold reads only the
 * splits 0..pos / SPLIT. VS false: REGS, no dynamic shared memory. VS true: VSTAGE,
 * SPLIT * hd * ES bytes of dynamic shared memory for the V stage; the copies started
 * in dec_stage are waited for after the softmax, and the barrier before the V pass
 * makes every thread's copies visible to all. */
template <int HDP, int GP, bool F16, bool VS>
__global__ void __launch_bounds__(NT, dec_min_blocks<dec_cfg<HDP, GP, F16>, VS>())
    attn_decode_split(const dec_params_t p)
{
    typedef dec_cfg<HDP, GP, F16> C;
    static_assert(!VS || C::VS_OK, "the V stage fits");
    __shared__ dec_smem<C> sm;
    extern __shared__ float4 dec_vstage[]; /* VS: [nv][hd] of the kv dtype */

    const int qi = blockIdx.x, g = blockIdx.y, split = blockIdx.z;
    const int t = p.q_idx ? p.q_idx[qi] : qi;
    const int p0 = split * PDC_ATTN_SPLIT;
    const int64_t nv64 = (int64_t)p.pos[t] + 1 - p0;
    if (nv64 <= 0)
        return; /* block-uniform, before any barrier */
    const int nv = nv64 < PDC_ATTN_SPLIT ? (int)nv64 : PDC_ATTN_SPLIT;

    dec_lane_t ln;
    ln.tid = threadIdx.x;
    ln.lane = ln.tid & 31;
    ln.warp = ln.tid >> 5;
    ln.sub = ln.lane % C::LPR;
    ln.rig = ln.lane / C::LPR;
    ln.e0 = ln.sub * C::E;
    ln.active = ln.e0 < p.hd;

    float qf[C::GP][C::E];
    dec_stage<C, VS>(p, sm, dec_vstage, ln, t, g, p0, nv, qf);
    dec_scores<C>(p, sm, ln, nv, qf);
    __syncthreads();
    dec_softmax<C>(sm, ln, nv, p.G);
    if constexpr (VS)
        cp_async_wait_all(); /* this thread's V copies, before the barrier */
    __syncthreads();
    float acc[C::GP][C::E];
    dec_values<C, VS>(p, sm, dec_vstage, ln, nv, acc);
    float *part =
        p.scratch + (((int64_t)qi * p.n_heads + (int64_t)g * p.G) * p.ns_max + split) *
                        (int64_t)(p.hd + 2);
    dec_write<C>(p, sm, ln, acc, part);
}

/* ---- decode: fold ---------------------------------------------------------------- */

typedef struct fold_params {
    const float *scratch;
    float *out;
    const int32_t *pos, *q_idx;
    int n_heads, hd, ns_max;
} fold_params_t;

#define FOLD_BATCH 8 /* partials loaded ahead of their (sequential) fold */

/* Grid (query in the list, ceil(n_heads * hd / NT)); thread = one (head, element).
 * Folds splits 0..pos / SPLIT in order exactly as attn_fold, then out = acc / l. */
__global__ void __launch_bounds__(NT) attn_decode_fold(const fold_params_t p)
{
    const int qi = blockIdx.x;
    const int j = blockIdx.y * NT + threadIdx.x;
    if (j >= p.n_heads * p.hd)
        return; /* no barriers in this kernel */
    const int t = p.q_idx ? p.q_idx[qi] : qi;
    const int h = j / p.hd, i = j - h * p.hd;
    float *o = p.out + ((int64_t)t * p.n_heads + h) * p.hd + i;
    const int pos = p.pos[t];
    if (pos < 0) { /* invalid query: no partial was written */
        *o = 0.0f;
        return;
    }
    const int ns = cmin(pos / PDC_ATTN_SPLIT + 1, p.ns_max);
    const int64_t stride = p.hd + 2;
    const float *part = p.scratch + ((int64_t)qi * p.n_heads + h) * p.ns_max * stride;
    float m = part[p.hd], l = part[p.hd + 1], acc = part[i];
    for (int s0 = 1; s0 < ns; s0 += FOLD_BATCH) {
        float pm[FOLD_BATCH], pl[FOLD_BATCH], pa[FOLD_BATCH];
#pragma unroll
        for (int b = 0; b < FOLD_BATCH; b++) {
            pm[b] = -INFINITY;
            pl[b] = 0.0f;
            pa[b] = 0.0f;
            if (s0 + b < ns) {
                const float *q = part + (int64_t)(s0 + b) * stride;
                pm[b] = q[p.hd];
                pl[b] = q[p.hd + 1];
                pa[b] = q[i];
            }
        }
#pragma unroll
        for (int b = 0; b < FOLD_BATCH; b++) {
            if (s0 + b < ns) {
                const float mm = fmaxf(m, pm[b]);
                const float ws = expf(m - mm), wp = expf(pm[b] - mm);
                acc = acc * ws + pa[b] * wp;
                l = l * ws + pl[b] * wp;
                m = mm;
            }
        }
    }
    *o = acc / l;
}

/* ---- prefill ----------------------------------------------------------------------- */

/* Tiles: BQ queries x BK keys, 16 x 16 threads; thread (ty, tx) owns score rows
 * ty*4..ty*4+3 and columns tx + 16 cc (cc < CC), and output rows ty*4.. with columns
 * k*64 + tx*4 + 0..3 (k < NCV). Shared memory: Q [BQ][QS], K or V [BK][KS], P
 * transposed [BK][PS] (floats; the +4 pads make the float4 accesses conflict-free),
 * then the element offsets of the K/V tile rows [2][BK] (int64, double-buffered by
 * tile parity). HDP >= 64 (head_dim <= 64 runs in the 64 layout). A K/V tile moves as
 * 4-element units: thread tid takes column (tid % (HDP/4)) * 4 of rows
 * tid / (HDP/4) + k * RSTEP, k < NU. */
template <int HDP_, bool F16_> struct pre_cfg {
    static constexpr int HDP = HDP_;
    static constexpr bool F16 = F16_;
    static constexpr int BQ = 64;
    static constexpr int BK = HDP == 256 ? 32 : 64;
    static constexpr int CC = BK / 16;
    static constexpr int NCV = HDP / 64;
    static constexpr int QS = HDP + 4, KS = HDP + 4, PS = BQ + 4;
    static constexpr int RSTEP = NT / (HDP / 4);
    static constexpr int NU = BK / RSTEP;
    static constexpr int FLOATS = BQ * QS + BK * KS + BK * PS;
    static constexpr int SMEM =
        FLOATS * (int)sizeof(float) + 2 * BK * (int)sizeof(int64_t);
    static constexpr int MIN_BLOCKS = HDP <= 128 ? 2 : 1;
    static_assert(BQ == 64 && NT == 256, "16 x 16 threads, 4 rows each");
    static_assert(NU * RSTEP == BK && NU * NT * 4 == BK * HDP && NCV >= 1, "tile units");
    static_assert(FLOATS % 4 == 0, "row offsets 16-byte aligned");
};

typedef struct pre_params {
    const float *q;
    float *out;
    const void *k, *v;
    const int32_t *pos, *seq, *bt, *runs;
    int64_t n_runs, bt_stride;
    int bs, n_heads, nkv, hd, G;
    float scale;
} pre_params_t;

template <bool F16> struct raw4;
template <> struct raw4<false> {
    typedef float4 type;
}; /* 4 F32 elements */
template <> struct raw4<true> {
    typedef uint2 type;
}; /* 4 F16 elements */

/* offs[c] = element offset of key kb + c (kv head g) in the cache, -1 past kmax. */
template <int BK>
__device__ __forceinline__ void pre_offsets(const pre_params_t &p, const int32_t *tbl,
                                            int g, int kb, int kmax, int64_t *offs)
{
    const int c = threadIdx.x;
    if (c < BK) {
        const int kp = kb + c;
        int64_t off = -1;
        if (kp <= kmax) {
            const int64_t blk = tbl[kp / p.bs];
            off = ((blk * p.bs + kp % p.bs) * p.nkv + g) * p.hd;
        }
        offs[c] = off;
    }
}

/* This thread's units of a K or V tile into registers; rows past kmax and columns past
 * hd are zeros (V rows must be finite: P = 0 multiplies them). */
template <int HDP, bool F16>
__device__ __forceinline__ void
pre_load(const void *cache, const int64_t *offs, int hd,
         typename raw4<F16>::type (&pre)[pre_cfg<HDP, F16>::NU])
{
    typedef pre_cfg<HDP, F16> C;
    const int c0 = threadIdx.x / (HDP / 4), d = (threadIdx.x % (HDP / 4)) * 4;
#pragma unroll
    for (int k = 0; k < C::NU; k++) {
        const int64_t off = offs[c0 + k * C::RSTEP];
        if (off >= 0 && d < hd) {
            if constexpr (F16)
                pre[k] = __ldg(reinterpret_cast<const uint2 *>(
                    static_cast<const uint16_t *>(cache) + off + d));
            else
                pre[k] = __ldg(reinterpret_cast<const float4 *>(
                    static_cast<const float *>(cache) + off + d));
        } else {
            if constexpr (F16)
                pre[k] = make_uint2(0u, 0u);
            else
                pre[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
}

template <int HDP, bool F16>
__device__ __forceinline__ void
pre_store(float *kvs, const typename raw4<F16>::type (&pre)[pre_cfg<HDP, F16>::NU])
{
    typedef pre_cfg<HDP, F16> C;
    const int c0 = threadIdx.x / (HDP / 4), d = (threadIdx.x % (HDP / 4)) * 4;
#pragma unroll
    for (int k = 0; k < C::NU; k++) {
        float4 f;
        if constexpr (F16)
            f = make_float4(h2f(pre[k].x), h2f(pre[k].x >> 16), h2f(pre[k].y),
                            h2f(pre[k].y >> 16));
        else
            f = pre[k];
        *reinterpret_cast<float4 *>(kvs + (c0 + k * C::RSTEP) * C::KS + d) = f;
    }
}

/* The Q tile (rows t0+q0.. of head h), zero past nr rows and hd elements. */
template <class C>
__device__ __forceinline__ void pre_stage_q(const pre_params_t &p, float *qs, int t0,
                                            int q0, int nr, int h)
{
    for (int j = threadIdx.x; j < C::BQ * C::HDP; j += NT) {
        const int r = j / C::HDP, d = j % C::HDP;
        qs[r * C::QS + d] = (r < nr && d < p.hd)
                                ? p.q[((int64_t)(t0 + q0 + r) * p.n_heads + h) * p.hd + d]
                                : 0.0f;
    }
}

/* sc[rr][cc] = dot(Q row ty*4+rr, K row tx+16cc) over hd. */
template <class C>
__device__ __forceinline__ void pre_scores(const float *qs, const float *kvs, int hd,
                                           int ty, int tx, float (&sc)[4][C::CC])
{
#pragma unroll
    for (int rr = 0; rr < 4; rr++)
#pragma unroll
        for (int cc = 0; cc < C::CC; cc++)
            sc[rr][cc] = 0.0f;
#pragma unroll 1
    for (int d = 0; d < hd; d += 4) {
        float4 qv[4], kv[C::CC];
#pragma unroll
        for (int rr = 0; rr < 4; rr++)
            qv[rr] = *reinterpret_cast<const float4 *>(qs + (ty * 4 + rr) * C::QS + d);
#pragma unroll
        for (int cc = 0; cc < C::CC; cc++)
            kv[cc] = *reinterpret_cast<const float4 *>(kvs + (tx + 16 * cc) * C::KS + d);
#pragma unroll
        for (int rr = 0; rr < 4; rr++)
#pragma unroll
            for (int cc = 0; cc < C::CC; cc++) {
                float s = sc[rr][cc];
                s = fmaf(qv[rr].x, kv[cc].x, s);
                s = fmaf(qv[rr].y, kv[cc].y, s);
                s = fmaf(qv[rr].z, kv[cc].z, s);
                s = fmaf(qv[rr].w, kv[cc].w, s);
                sc[rr][cc] = s;
            }
    }
}

/* Online softmax over key tile kb: causal mask, running max m and sum l per row, acc
 * rescaled; sc becomes P. The 16 tx lanes of a row are one half-warp (xor 1..8); every
 * lane of the warp reaches each shuffle. */
template <class C>
__device__ __forceinline__ void
pre_softmax(float (&sc)[4][C::CC], int kb, int tx, const int (&rowpos)[4], float scale,
            float (&m)[4], float (&l)[4], float (&acc)[4][4 * C::NCV])
{
#pragma unroll
    for (int rr = 0; rr < 4; rr++) {
        float mt = -INFINITY;
#pragma unroll
        for (int cc = 0; cc < C::CC; cc++) {
            const bool ok = kb + tx + 16 * cc <= rowpos[rr];
            sc[rr][cc] = ok ? sc[rr][cc] * scale : -INFINITY;
            mt = fmaxf(mt, sc[rr][cc]);
        }
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1)
            mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, off));
        /* Finite: key 0 of tile 0 is visible to every row. */
        const float mn = fmaxf(m[rr], mt);
        const float alpha = expf(m[rr] - mn); /* 0 on the first tile */
        float rs = 0.0f;
#pragma unroll
        for (int cc = 0; cc < C::CC; cc++) {
            const bool ok = kb + tx + 16 * cc <= rowpos[rr];
            const float e = ok ? expf(sc[rr][cc] - mn) : 0.0f;
            sc[rr][cc] = e;
            rs += e;
        }
#pragma unroll
        for (int off = 8; off >= 1; off >>= 1)
            rs += __shfl_xor_sync(FULL_MASK, rs, off);
        l[rr] = l[rr] * alpha + rs;
#pragma unroll
        for (int j = 0; j < 4 * C::NCV; j++)
            acc[rr][j] *= alpha;
        m[rr] = mn;
    }
}

/* acc[rr][4k + jj] += sum over keys c < cn of P[c][ty*4+rr] * V[c][k*64 + tx*4 + jj]. */
template <class C>
__device__ __forceinline__ void pre_pv(const float *ps, const float *kvs, int cn, int ty,
                                       int tx, float (&acc)[4][4 * C::NCV])
{
    for (int c = 0; c < cn; c++) {
        const float4 pv = *reinterpret_cast<const float4 *>(ps + c * C::PS + ty * 4);
        const float pr[4] = {pv.x, pv.y, pv.z, pv.w};
#pragma unroll
        for (int k = 0; k < C::NCV; k++) {
            const float4 vv =
                *reinterpret_cast<const float4 *>(kvs + c * C::KS + k * 64 + tx * 4);
#pragma unroll
            for (int rr = 0; rr < 4; rr++) {
                acc[rr][4 * k + 0] = fmaf(pr[rr], vv.x, acc[rr][4 * k + 0]);
                acc[rr][4 * k + 1] = fmaf(pr[rr], vv.y, acc[rr][4 * k + 1]);
                acc[rr][4 * k + 2] = fmaf(pr[rr], vv.z, acc[rr][4 * k + 2]);
                acc[rr][4 * k + 3] = fmaf(pr[rr], vv.w, acc[rr][4 * k + 3]);
            }
        }
    }
}

/* Grid (query tile, run, query head); NT threads; C::SMEM bytes of dynamic shared
 * memory. Loops over runs (grid.y may be capped) and tiles (grid.x may be short), so
 * every row of every run is computed; all loop bounds are block-uniform.
 * Per key tile kt, with offs[kt & 1] ready and K(kt) in registers:
 *   store K(kt) -> barrier A -> load V(kt) to registers, S = Q K^T, online softmax,
 *   P -> ps, offsets of tile kt+1 -> offs[(kt+1) & 1] -> barrier B -> store V(kt) ->
 *   barrier C -> load K(kt+1) to registers, O += P V -> barrier D.
 * ps and kvs were last read before the previous barrier D; offs[(kt+1) & 1] last by
 * V(kt-1)'s load, before barrier B of tile kt-1. */
template <int HDP, bool F16>
__global__ void __launch_bounds__(NT, pre_cfg<HDP, F16>::MIN_BLOCKS)
    attn_prefill_tile(const pre_params_t p)
{
    typedef pre_cfg<HDP, F16> C;
    constexpr int BQ = C::BQ, BK = C::BK;
    extern __shared__ float4 pre_smem[];
    float *qs = reinterpret_cast<float *>(pre_smem); /* [BQ][QS] */
    float *kvs = qs + BQ * C::QS;                    /* [BK][KS], K then V */
    float *ps = kvs + BK * C::KS;                    /* [BK][PS], P transposed */
    int64_t *offs = reinterpret_cast<int64_t *>(ps + BK * C::PS); /* [2][BK] */

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int h = blockIdx.z, g = h / p.G;
    for (int64_t run = blockIdx.y; run < p.n_runs; run += gridDim.y) {
        const int t0 = p.runs[3 * run], n = p.runs[3 * run + 1];
        const int P0 = n > 0 ? p.pos[t0] : 0;
        const int32_t *tbl = p.bt + (int64_t)(n > 0 ? p.seq[t0] : 0) * p.bt_stride;
        for (int q0 = blockIdx.x * BQ; q0 < n; q0 += gridDim.x * BQ) {
            const int nr = cmin(BQ, n - q0);      /* real rows in this tile */
            const int kmax = P0 + q0 + nr - 1;    /* last key any real row sees */
            pre_stage_q<C>(p, qs, t0, q0, nr, h); /* after the last tile's barrier D */
            pre_offsets<BK>(p, tbl, g, 0, kmax, offs);
            /* Padding rows take the last real row's position so they stay finite. */
            int rowpos[4];
            float m[4], l[4], acc[4][4 * C::NCV];
#pragma unroll
            for (int rr = 0; rr < 4; rr++) {
                rowpos[rr] = P0 + q0 + cmin(ty * 4 + rr, nr - 1);
                m[rr] = -INFINITY;
                l[rr] = 0.0f;
#pragma unroll
                for (int j = 0; j < 4 * C::NCV; j++)
                    acc[rr][j] = 0.0f;
            }
            __syncthreads(); /* Q and the offsets of tile 0 visible */
            typename raw4<F16>::type pre[C::NU];
            pre_load<HDP, F16>(p.k, offs, p.hd, pre);
            const int ntiles = kmax / BK + 1;
            for (int kt = 0; kt < ntiles; kt++) {
                const int kb = kt * BK;
                int64_t *off_next = offs + ((kt + 1) & 1) * BK;
                pre_store<HDP, F16>(kvs, pre);
                __syncthreads(); /* A: K tile visible */
                pre_load<HDP, F16>(p.v, offs + (kt & 1) * BK, p.hd, pre); /* during S */
                float sc[4][C::CC];
                pre_scores<C>(qs, kvs, p.hd, ty, tx, sc);
                pre_softmax<C>(sc, kb, tx, rowpos, p.scale, m, l, acc);
#pragma unroll
                for (int cc = 0; cc < C::CC; cc++)
                    *reinterpret_cast<float4 *>(ps + (tx + 16 * cc) * C::PS + ty * 4) =
                        make_float4(sc[0][cc], sc[1][cc], sc[2][cc], sc[3][cc]);
                if (kt + 1 < ntiles)
                    pre_offsets<BK>(p, tbl, g, kb + BK, kmax, off_next);
                __syncthreads(); /* B: everyone is done with K */
                pre_store<HDP, F16>(kvs, pre);
                __syncthreads(); /* C: V, P and the next offsets visible */
                if (kt + 1 < ntiles)
                    pre_load<HDP, F16>(p.k, off_next, p.hd, pre); /* during PV */
                /* Keys past kmax have P = 0 for every row: skip them. */
                pre_pv<C>(ps, kvs, cmin(BK, kmax - kb + 1), ty, tx, acc);
                __syncthreads(); /* D: done with V and P */
            }
#pragma unroll
            for (int rr = 0; rr < 4; rr++) {
                const int r = ty * 4 + rr;
                if (r >= nr)
                    continue;
                float *o = p.out + ((int64_t)(t0 + q0 + r) * p.n_heads + h) * p.hd;
#pragma unroll
                for (int k = 0; k < C::NCV; k++)
#pragma unroll
                    for (int jj = 0; jj < 4; jj++) {
                        const int d = k * 64 + tx * 4 + jj;
                        if (d < p.hd)
                            o[d] = acc[rr][4 * k + jj] / l[rr];
                    }
            }
        }
    }
}

/* ---- host ---------------------------------------------------------------------- */

/* What both paths need; false: cudaErrorInvalidValue (or misaligned cache bases,
 * which the vector loads cannot take). */
static bool attn_args_ok(const pd_attn_args_t *a)
{
    if (!a || !a->q || !a->out || !a->pos || !a->seq || !a->k_cache || !a->v_cache ||
        !a->block_tables)
        return false;
    if (a->kv_dtype != PD_DTYPE_F32 && a->kv_dtype != PD_DTYPE_F16)
        return false;
    /* head_dim a multiple of 8 up to 256: the lanes' vector loads (at most 8
     * elements) then never straddle a row's end (small models: stories260K's is 8) */
    if (a->head_dim < 8 || a->head_dim > 256 || a->head_dim % 8 != 0)
        return false;
    if (a->n_heads < 1 || a->n_heads > 65535 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || a->n_heads / a->n_kv_heads > 16)
        return false;
    if (a->block_size < 1 || a->block_size > INT_MAX || a->bt_stride < 1)
        return false;
    return true;
}

static bool cache_aligned(const pd_attn_args_t *a)
{
    return (((uintptr_t)a->k_cache | (uintptr_t)a->v_cache) & 15u) == 0;
}

static int pow2_at_least(int x)
{
    int p = 1;
    while (p < x)
        p *= 2;
    return p;
}

static int64_t decode_splits(int64_t max_ctx)
{
    return (max_ctx + PDC_ATTN_SPLIT - 1) / PDC_ATTN_SPLIT;
}

extern "C" int64_t pdc_attn_decode_scratch(const pd_attn_args_t *a, int64_t n_q,
                                           int64_t max_ctx)
{
    if (!a || n_q <= 0 || max_ctx <= 0 || a->n_heads < 1 || a->head_dim < 1)
        return 0;
    return n_q * a->n_heads * decode_splits(max_ctx) * (a->head_dim + 2);
}

/* Devices with a lazily set shared-memory opt-in flag per kernel instantiation; a
 * device past the table sets (or checks) it at every launch. */
#define MAX_DEVICES 64

/* The dynamic shared-memory opt-in of one VSTAGE instantiation, once per device (as
 * prefill_opt_in), for its largest stage: whether VSTAGE may run there. false (REGS
 * runs instead, the same bits): the device cannot give a block the static shared
 * memory plus that stage (at most 100,544 bytes, group 16 with a 64 KiB stage: sm_80,
 * sm_86/89 and sm_90 can, with 163, 99 and 227 KiB; a 64 KiB part cannot), or the
 * opt-in failed. The answer is kept either way. A
 * failed call's error is taken off the runtime's last error, unless an earlier error
 * was pending there, so that it does not come back as the launch's status. */
template <int HDP, int GP, bool F16> static bool decode_vs_opt_in(void)
{
    typedef dec_cfg<HDP, GP, F16> C;
    static signed char state[MAX_DEVICES]; /* 0 not yet asked, 1 VSTAGE, -1 REGS */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess)
        return false; /* the launch reports it */
    const bool keep = dev >= 0 && dev < MAX_DEVICES;
    if (keep && state[dev] != 0)
        return state[dev] > 0;
    const bool clean = cudaPeekAtLastError() == cudaSuccess;
    int optin = 0;
    bool ok = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                     dev) == cudaSuccess;
    ok = ok && (int64_t)sizeof(dec_smem<C>) + C::VS_BYTES <= (int64_t)optin;
    ok = ok && cudaFuncSetAttribute(attn_decode_split<HDP, GP, F16, true>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    C::VS_BYTES) == cudaSuccess;
    if (!ok && clean)
        (void)cudaGetLastError();
    if (keep)
        state[dev] = ok ? 1 : -1;
    return ok;
}

/* One split launch: VSTAGE where asked for (vs: the stage of this head_dim fits in
 * DEC_VS_MAX) and the device takes it, else REGS. */
template <int HDP, int GP, bool F16>
static void launch_decode(cudaStream_t s, dim3 grid, const dec_params_t &p, bool vs)
{
    typedef dec_cfg<HDP, GP, F16> C;
    if constexpr (C::VS_OK) { /* only these instantiations have a VSTAGE kernel */
        if (vs && decode_vs_opt_in<HDP, GP, F16>()) {
            const size_t bytes = (size_t)PDC_ATTN_SPLIT * (size_t)p.hd * C::ES;
            attn_decode_split<HDP, GP, F16, true><<<grid, NT, bytes, s>>>(p);
            return;
        }
    }
    attn_decode_split<HDP, GP, F16, false><<<grid, NT, 0, s>>>(p);
}

template <int HDP, bool F16>
static bool launch_decode_gp(cudaStream_t s, dim3 grid, int gp, const dec_params_t &p,
                             bool vs)
{
    switch (gp) {
    case 1:
        launch_decode<HDP, 1, F16>(s, grid, p, vs);
        return true;
    case 2:
        launch_decode<HDP, 2, F16>(s, grid, p, vs);
        return true;
    case 4:
        launch_decode<HDP, 4, F16>(s, grid, p, vs);
        return true;
    case 8:
        launch_decode<HDP, 8, F16>(s, grid, p, vs);
        return true;
    case 16:
        launch_decode<HDP, 16, F16>(s, grid, p, vs);
        return true;
    default:
        return false;
    }
}

template <bool F16>
static bool launch_decode_hd(cudaStream_t s, dim3 grid, int hdp, int gp,
                             const dec_params_t &p, bool vs)
{
    switch (hdp) {
    case 32:
        return launch_decode_gp<32, F16>(s, grid, gp, p, vs);
    case 64:
        return launch_decode_gp<64, F16>(s, grid, gp, p, vs);
    case 128:
        return launch_decode_gp<128, F16>(s, grid, gp, p, vs);
    case 256:
        return launch_decode_gp<256, F16>(s, grid, gp, p, vs);
    default:
        return false;
    }
}

extern "C" cudaError_t pdc_attn_decode(cudaStream_t s, const pd_attn_args_t *a,
                                       const int32_t *q_idx, int64_t n_q, int64_t max_ctx,
                                       float *scratch)
{
    return pdc_attn_decode_variant(s, a, q_idx, n_q, max_ctx, scratch,
                                   PDC_ATTN_DEC_DEFAULT);
}

/* Whether VSTAGE runs for one instantiation (pdc_attn_decode_vstage_runs). */
template <int HDP, int GP, bool F16> static bool vs_runs(void)
{
    if constexpr (dec_cfg<HDP, GP, F16>::VS_OK)
        return decode_vs_opt_in<HDP, GP, F16>();
    else
        return false;
}

template <int HDP, bool F16> static bool vs_runs_gp(int gp)
{
    switch (gp) {
    case 1:
        return vs_runs<HDP, 1, F16>();
    case 2:
        return vs_runs<HDP, 2, F16>();
    case 4:
        return vs_runs<HDP, 4, F16>();
    case 8:
        return vs_runs<HDP, 8, F16>();
    case 16:
        return vs_runs<HDP, 16, F16>();
    default:
        return false;
    }
}

template <bool F16> static bool vs_runs_hd(int hdp, int gp)
{
    switch (hdp) {
    case 32:
        return vs_runs_gp<32, F16>(gp);
    case 64:
        return vs_runs_gp<64, F16>(gp);
    case 128:
        return vs_runs_gp<128, F16>(gp);
    case 256:
        return vs_runs_gp<256, F16>(gp);
    default:
        return false;
    }
}

extern "C" int pdc_attn_decode_vstage_runs(const pd_attn_args_t *a)
{
    if (!attn_args_ok(a))
        return -1;
    const bool f16 = a->kv_dtype == PD_DTYPE_F16;
    if ((int64_t)PDC_ATTN_SPLIT * a->head_dim * (f16 ? 2 : 4) > DEC_VS_MAX)
        return 0;
    const int hdp = cmax(32, pow2_at_least(a->head_dim));
    const int gp = pow2_at_least(a->n_heads / a->n_kv_heads);
    return (f16 ? vs_runs_hd<true>(hdp, gp) : vs_runs_hd<false>(hdp, gp)) ? 1 : 0;
}

/* The variant is checked before anything else, so an unknown one fails even with no
 * queries. */
extern "C" cudaError_t pdc_attn_decode_variant(cudaStream_t s, const pd_attn_args_t *a,
                                               const int32_t *q_idx, int64_t n_q,
                                               int64_t max_ctx, float *scratch,
                                               int variant)
{
    if (variant != PDC_ATTN_DEC_REGS && variant != PDC_ATTN_DEC_VSTAGE)
        return cudaErrorInvalidValue;
    if (n_q <= 0)
        return cudaSuccess;
    if (!attn_args_ok(a) || !scratch || n_q > INT_MAX || max_ctx <= 0)
        return cudaErrorInvalidValue;
    if (!cache_aligned(a))
        return cudaErrorMisalignedAddress;
    const int64_t ns = decode_splits(max_ctx);
    if (ns > 65535)
        return cudaErrorInvalidValue;
    dec_params_t p;
    p.q = a->q;
    p.k = a->k_cache;
    p.v = a->v_cache;
    p.pos = a->pos;
    p.seq = a->seq;
    p.bt = a->block_tables;
    p.q_idx = q_idx;
    p.scratch = scratch;
    p.bt_stride = a->bt_stride;
    p.bs = (int)a->block_size;
    p.n_heads = a->n_heads;
    p.nkv = a->n_kv_heads;
    p.hd = a->head_dim;
    p.G = a->n_heads / a->n_kv_heads;
    p.ns_max = (int)ns;
    p.scale = a->scale;
    const int hdp = cmax(32, pow2_at_least(a->head_dim)), gp = pow2_at_least(p.G);
    const bool f16 = a->kv_dtype == PD_DTYPE_F16;
    const int64_t stage = (int64_t)PDC_ATTN_SPLIT * a->head_dim * (f16 ? 2 : 4);
    const bool vs = variant == PDC_ATTN_DEC_VSTAGE && stage <= DEC_VS_MAX;
    dim3 grid((unsigned)n_q, (unsigned)a->n_kv_heads, (unsigned)ns);
    const bool ok = f16 ? launch_decode_hd<true>(s, grid, hdp, gp, p, vs)
                        : launch_decode_hd<false>(s, grid, hdp, gp, p, vs);
    if (!ok)
        return cudaErrorInvalidValue; /* unreachable after attn_args_ok */

    fold_params_t f;
    f.scratch = scratch;
    f.out = a->out;
    f.pos = a->pos;
    f.q_idx = q_idx;
    f.n_heads = a->n_heads;
    f.hd = a->head_dim;
    f.ns_max = (int)ns;
    const int64_t per_q = (int64_t)a->n_heads * a->head_dim;
    dim3 fgrid((unsigned)n_q, (unsigned)((per_q + NT - 1) / NT));
    attn_decode_fold<<<fgrid, NT, 0, s>>>(f);
    return cudaGetLastError();
}

/* The dynamic shared-memory opt-in of one prefill instantiation, once per device (the
 * attribute is per device; a device past the table sets it every time). */
template <int HDP, bool F16> static cudaError_t prefill_opt_in(void)
{
    static bool done[MAX_DEVICES];
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess)
        return err;
    if (dev >= 0 && dev < MAX_DEVICES && done[dev])
        return cudaSuccess;
    err = cudaFuncSetAttribute(attn_prefill_tile<HDP, F16>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               pre_cfg<HDP, F16>::SMEM);
    if (err == cudaSuccess && dev >= 0 && dev < MAX_DEVICES)
        done[dev] = true;
    return err;
}

template <int HDP, bool F16>
static cudaError_t launch_prefill(cudaStream_t s, int64_t max_run, const pre_params_t &p)
{
    cudaError_t err = prefill_opt_in<HDP, F16>();
    if (err != cudaSuccess)
        return err;
    const int64_t tiles = (max_run + pre_cfg<HDP, F16>::BQ - 1) / pre_cfg<HDP, F16>::BQ;
    dim3 grid((unsigned)(tiles < INT_MAX ? tiles : INT_MAX),
              (unsigned)(p.n_runs < 65535 ? p.n_runs : 65535), (unsigned)p.n_heads);
    attn_prefill_tile<HDP, F16><<<grid, NT, pre_cfg<HDP, F16>::SMEM, s>>>(p);
    return cudaGetLastError();
}

extern "C" cudaError_t pdc_attn_prefill(cudaStream_t s, const pd_attn_args_t *a,
                                        const int32_t *runs, int64_t n_runs,
                                        int64_t max_run)
{
    if (n_runs <= 0 || max_run <= 0)
        return cudaSuccess;
    if (!attn_args_ok(a) || !runs)
        return cudaErrorInvalidValue;
    if (!cache_aligned(a))
        return cudaErrorMisalignedAddress;
    pre_params_t p;
    p.q = a->q;
    p.out = a->out;
    p.k = a->k_cache;
    p.v = a->v_cache;
    p.pos = a->pos;
    p.seq = a->seq;
    p.bt = a->block_tables;
    p.runs = runs;
    p.n_runs = n_runs;
    p.bt_stride = a->bt_stride;
    p.bs = (int)a->block_size;
    p.n_heads = a->n_heads;
    p.nkv = a->n_kv_heads;
    p.hd = a->head_dim;
    p.G = a->n_heads / a->n_kv_heads;
    p.scale = a->scale;
    const bool f16 = a->kv_dtype == PD_DTYPE_F16;
    if (a->head_dim <= 64)
        return f16 ? launch_prefill<64, true>(s, max_run, p)
                   : launch_prefill<64, false>(s, max_run, p);
    if (a->head_dim <= 128)
        return f16 ? launch_prefill<128, true>(s, max_run, p)
                   : launch_prefill<128, false>(s, max_run, p);
    return f16 ? launch_prefill<256, true>(s, max_run, p)
               : launch_prefill<256, false>(s, max_run, p);
}
