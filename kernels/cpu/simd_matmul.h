/* simd_matmul.h - ISA-neutral bodies of the matmul kernels (matrix-vector and
 * matrix-matrix), compiled once per ISA after simd_ops.h.
 *
 * Design: batch invariance. y[t][o] is a pure function of (W row o, x[t]) within one
 * ISA: it does not depend on T, on t's place in the batch, on the thread split, or on
 * whether dispatch.c picked the mv or the gemm path. Each dtype has ONE reduction,
 * and every tile shape below performs it lane for lane:
 *   F32/F16/BF16: one VW-lane accumulator per (o, t); k in VW steps in order,
 *     acc = fma(w_k, x_k, acc), a zero-filled masked step for the tail, then the fixed
 *     tree of vhsum4/vhsum1. A tile of R rows x TT tokens holds R * TT accumulators
 *     (the ILP); mv walks rows outermost (each weight row streamed once for all
 *     tokens), gemm walks tokens outermost over a panel of rows kept in L2 (F16/BF16
 *     converted to f32 once per panel: the conversion is exact).
 *   Q8_0/Q4_0: x as Q8 blocks (quantize_x, per token). Per block b the integer dot
 *     P_b = sum w * x is exact. The f32 sum keeps VW partials: S_j for j = b mod VW
 *     takes S_j = fma((float)P_b, d_w[b] * d_x[b], S_j) in block order, from 0; then
 *     the VW partials are added by vhsum1's tree. The mv kernels walk one row at a
 *     time (a sequential stream) in chunks of VW blocks: a chunk's 8 groups of 4
 *     bytes are transposed so that lane j is block j, its dots become one vector of
 *     P_b and the partials are the lanes of one accumulator per token. The gemm
 *     kernels put rows in lanes instead: a panel of NR = 2 * VW rows is repacked per
 *     block as [8 groups][NR rows][4 bytes] with the rows' scales, once per task, and
 *     the partials are kept apart by visiting blocks j, j + VW, ... in phase j. The
 *     integer dots are vpdpbusd with VNNI (x + 128 unsigned, the accumulator started
 *     at -128 * sum(w), which cancels the offset exactly), else |w| times sign(x, w)
 *     through vpmaddubsw/vpmaddwd: the same exact P_b either way.
 * Threading: pure functions over the rows and tokens they are given; packed panels
 * and converted rows live in the caller's per-thread scratch. */
#ifndef PD_SIMD_MATMUL_H
#define PD_SIMD_MATMUL_H

#include "kernels/cpu/simd_ops.h"

#define MM_R 4 /* weight rows per float tile */
#if VW == 16
#define MM_TT 6 /* tokens per float tile: 24 zmm accumulators */
#define MQ_M  6 /* tokens per int8 tile: 24 zmm of accumulators */
typedef __m512i vi;
#else
#define MM_TT 3 /* 12 ymm accumulators */
#define MQ_M  2
typedef __m256i vi;
#endif
#define MQ_NR          (2 * VW) /* rows of an int8 panel (= gemm_nr) */
#define MQ_BLOCK_BYTES (PD_QK * MQ_NR + 2 * 4 * MQ_NR) /* w, scales, -128 * sum(w) */

/* ---- float weights ------------------------------------------------------------------
 */

/* Weights stream from DRAM once per token on the mv path; the kernels prefetch
 * PD_MV_PREFETCH bytes ahead of each row. */
#ifndef PD_MV_PREFETCH
#define PD_MV_PREFETCH 512
#endif

static inline __attribute__((always_inline)) vf wload(const uint8_t *w, int64_t k,
                                                      const int dt)
{
    if (dt == PD_CPU_DT_F32)
        return vload((const float *)w + k);
    if (dt == PD_CPU_DT_F16)
        return vload_h((const uint16_t *)w + k);
    return vload_bf((const uint16_t *)w + k);
}

static inline __attribute__((always_inline)) vf wloadn(const uint8_t *w, int64_t k,
                                                       int64_t n, const int dt)
{
    if (dt == PD_CPU_DT_F32)
        return vloadn((const float *)w + k, n);
    if (dt == PD_CPU_DT_F16)
        return vloadn_h((const uint16_t *)w + k, n);
    return vloadn_bf((const uint16_t *)w + k, n);
}

/* y[t..t+TT)[o..o+R) from R weight rows (w: row o, stride bytes apart, elements of
 * dt) and TT tokens: the canonical reduction of the header for each (o, t). */
static inline __attribute__((always_inline)) void
mm_tile(const pd_cpu_mm_t *mm, const uint8_t *w, size_t stride, int64_t o, int64_t t,
        const int R, const int TT, const int dt, const int prefetch)
{
    const int64_t K = mm->n_in;
    const uint8_t *wr[MM_R];
    const float *x[MM_TT];
    vf acc[MM_R][MM_TT];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        wr[r] = w + (size_t)r * stride;
#pragma GCC unroll 8
        for (int j = 0; j < TT; j++)
            acc[r][j] = vzero();
    }
#pragma GCC unroll 8
    for (int j = 0; j < TT; j++)
        x[j] = mm->x + (t + j) * K;
    const size_t es = dt == PD_CPU_DT_F32 ? 4 : 2;
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        if (prefetch && (k * (int64_t)es) % 64 == 0)
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)wr[r] + PD_MV_PREFETCH + (size_t)k * es,
                             _MM_HINT_T0);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            vf wv = wload(wr[r], k, dt);
#pragma GCC unroll 8
            for (int j = 0; j < TT; j++)
                acc[r][j] = vfma(wv, vload(x[j] + k), acc[r][j]);
        }
    }
    if (k < K) {
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            vf wv = wloadn(wr[r], k, K - k, dt);
#pragma GCC unroll 8
            for (int j = 0; j < TT; j++)
                acc[r][j] = vfma(wv, vloadn(x[j] + k, K - k), acc[r][j]);
        }
    }
    float *y = mm->y + t * mm->n_out + o;
#pragma GCC unroll 8
    for (int j = 0; j < TT; j++) {
        if (R == 4)
            _mm_storeu_ps(y + j * mm->n_out,
                          vhsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        else
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                y[j * mm->n_out + r] = vhsum1(acc[r][j]);
    }
}

/* Tokens [t0, t1) of R rows, MM_TT at a time; one case per remainder so that the
 * inlined tile keeps only the accumulators it uses. */
static inline __attribute__((always_inline)) void
mm_tokens(const pd_cpu_mm_t *mm, const uint8_t *w, size_t stride, int64_t o, int64_t t0,
          int64_t t1, const int R, const int dt, const int prefetch)
{
    int64_t t = t0;
    for (; t + MM_TT <= t1; t += MM_TT)
        mm_tile(mm, w, stride, o, t, R, MM_TT, dt, prefetch);
    switch (t1 - t) {
    case 1:
        mm_tile(mm, w, stride, o, t, R, 1, dt, prefetch);
        break;
    case 2:
        mm_tile(mm, w, stride, o, t, R, 2, dt, prefetch);
        break;
#if MM_TT > 3
    case 3:
        mm_tile(mm, w, stride, o, t, R, 3, dt, prefetch);
        break;
    case 4:
        mm_tile(mm, w, stride, o, t, R, 4, dt, prefetch);
        break;
    case 5:
        mm_tile(mm, w, stride, o, t, R, 5, dt, prefetch);
        break;
#endif
    default:
        break;
    }
}

/* mv: rows outermost, MM_R at a time (their weights are read from DRAM once and from
 * L1 for further groups of tokens), then single rows. For one token, one row at a
 * time: a strictly sequential stream, which the hardware prefetcher follows far
 * better than interleaved rows, and one chain of fused multiply-adds (16 bytes a cycle
 * of f32 weights on AVX-512: more than a core's share of DRAM bandwidth). */
static inline __attribute__((always_inline)) void
mv_float(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, const int dt)
{
    int64_t o = o0;
    if (mm->T > 1)
        for (; o + MM_R <= o1; o += MM_R)
            mm_tokens(mm, mm->w + (size_t)o * mm->row_bytes, mm->row_bytes, o, 0, mm->T,
                      MM_R, dt, 1);
    for (; o < o1; o++)
        mm_tokens(mm, mm->w + (size_t)o * mm->row_bytes, mm->row_bytes, o, 0, mm->T, 1,
                  dt, 1);
}

/* gemm: rows [o0, o1) (at most MQ_NR) as f32 rows (F16/BF16 converted into scratch),
 * then tokens outermost: a tile's MM_TT activation rows stay in L1 while it sweeps
 * the panel, which stays in L2 for the whole chunk of tokens. */
static inline __attribute__((always_inline)) void gemm_float(const pd_cpu_mm_t *mm,
                                                             int64_t o0, int64_t o1,
                                                             int64_t t0, int64_t t1,
                                                             void *scratch, const int dt)
{
    const int64_t K = mm->n_in;
    const uint8_t *w = mm->w + (size_t)o0 * mm->row_bytes;
    size_t stride = mm->row_bytes;
    if (dt != PD_CPU_DT_F32) {
        float *conv = scratch; /* [o1 - o0][K] */
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *src = mm->w + (size_t)o * mm->row_bytes;
            float *dst = conv + (o - o0) * K;
            int64_t k = 0;
            for (; k + VW <= K; k += VW)
                vstore(dst + k, wload(src, k, dt));
            if (k < K)
                vstoren(dst + k, wloadn(src, k, K - k, dt), K - k);
        }
        w = scratch;
        stride = (size_t)K * sizeof(float);
    }
    for (int64_t t = t0; t < t1; t += MM_TT) {
        int64_t te = pd_cpu_min64(t + MM_TT, t1), o = o0;
        for (; o + MM_R <= o1; o += MM_R)
            mm_tokens(mm, w + (size_t)(o - o0) * stride, stride, o, t, te, MM_R,
                      PD_CPU_DT_F32, 0);
        for (; o < o1; o++)
            mm_tokens(mm, w + (size_t)(o - o0) * stride, stride, o, t, te, 1,
                      PD_CPU_DT_F32, 0);
    }
}

static inline void simd_mv_f32(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                               void *scratch)
{
    (void)scratch;
    mv_float(mm, o0, o1, PD_CPU_DT_F32);
}

static inline void simd_mv_f16(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                               void *scratch)
{
    (void)scratch;
    mv_float(mm, o0, o1, PD_CPU_DT_F16);
}

static inline void simd_mv_bf16(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                void *scratch)
{
    (void)scratch;
    mv_float(mm, o0, o1, PD_CPU_DT_BF16);
}

static inline void simd_gemm_f32(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                 int64_t t0, int64_t t1, void *scratch)
{
    gemm_float(mm, o0, o1, t0, t1, scratch, PD_CPU_DT_F32);
}

static inline void simd_gemm_f16(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                 int64_t t0, int64_t t1, void *scratch)
{
    gemm_float(mm, o0, o1, t0, t1, scratch, PD_CPU_DT_F16);
}

static inline void simd_gemm_bf16(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                  int64_t t0, int64_t t1, void *scratch)
{
    gemm_float(mm, o0, o1, t0, t1, scratch, PD_CPU_DT_BF16);
}

/* ---- Q8_0 / Q4_0 weights x Q8 activations -------------------------------------------
 */

/* acc + the int32 dots of each lane's 4 bytes of x and w: x is u8 (+128) with VNNI,
 * where acc starts at -128 * sum(w); otherwise x is s8 and |w| (aw) times sign(x, w)
 * (neg) goes through vpmaddubsw (no overflow: |w| <= 128, |x| <= 127). */
#if VW == 16
typedef __mmask64 vneg;
#else
typedef __m256i vneg;
#endif

static inline __attribute__((always_inline)) void mq_prep(vi w, vi *aw, vneg *neg)
{
#if defined(PD_SIMD_VNNI)
    (void)w;
    (void)aw;
    (void)neg;
#elif VW == 16
    *aw = _mm512_abs_epi8(w);
    *neg = _mm512_movepi8_mask(w);
#else
    *aw = _mm256_abs_epi8(w);
    *neg = w;
#endif
}

static inline __attribute__((always_inline)) vi mq_dot(vi acc, vi x, vi w, vi aw,
                                                       vneg neg)
{
#if defined(PD_SIMD_VNNI)
    (void)aw;
    (void)neg;
    return _mm512_dpbusd_epi32(acc, x, w);
#elif VW == 16
    (void)w;
    __m512i sx = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    return _mm512_add_epi32(
        acc, _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), _mm512_set1_epi16(1)));
#else
    (void)w;
    __m256i sx = _mm256_sign_epi8(x, neg);
    return _mm256_add_epi32(
        acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) vi vi_zero(void)
{
#if VW == 16
    return _mm512_setzero_si512();
#else
    return _mm256_setzero_si256();
#endif
}

static inline __attribute__((always_inline)) vi vi_load(const void *p)
{
    vi v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) vf vi_cvt(vi v)
{
#if VW == 16
    return _mm512_cvtepi32_ps(v);
#else
    return _mm256_cvtepi32_ps(v);
#endif
}

/* -128 * sum(w) of each lane's 32 weights (VNNI: the offset of unsigned x). */
static inline __attribute__((always_inline)) vi mq_ncorr(const vi g[8])
{
#if defined(PD_SIMD_VNNI)
    const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
    __m512i s[4]; /* four short chains */
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        s[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, g[i]), ones, g[i + 4]);
    __m512i sum =
        _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
    return _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 7));
#else
    (void)g;
    return vi_zero();
#endif
}

/* Block b of VW rows (row r's block at rows[r]) as g[8]: lane r of g[i] holds bytes
 * 4i..4i+3 of row r's 32 int8 weights (Q4_0 unpacked, minus 8). */
static inline __attribute__((always_inline)) void
mq_transpose(const uint8_t *const *rows, size_t off, vi g[8], const int dt)
{
#if VW == 16
    if (dt == PD_CPU_DT_Q8_0) {
        __m512i z[8], t[8], u[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            z[i] = _mm512_inserti64x4(
                _mm512_castsi256_si512(
                    _mm256_loadu_si256((const __m256i *)(rows[i] + off))),
                _mm256_loadu_si256((const __m256i *)(rows[i + 8] + off)), 1);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
        }
#pragma GCC unroll 8
        for (int h = 0; h < 8; h += 4) { /* u[h + e]: dword e (and e + 4) of 4 rows */
            u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]);
            u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
            u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
            u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
        const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
#pragma GCC unroll 8
        for (int e = 0; e < 4; e++) {
            g[e] = _mm512_permutex2var_epi64(u[e], lo, u[e + 4]);
            g[e + 4] = _mm512_permutex2var_epi64(u[e], hi, u[e + 4]);
        }
    } else {
        __m512i z[4], p[4];
#pragma GCC unroll 8
        for (int i = 0; i < 4; i++) {
            __m512i v =
                _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[i] + off)));
            v = _mm512_inserti32x4(
                v, _mm_loadu_si128((const __m128i *)(rows[i + 4] + off)), 1);
            v = _mm512_inserti32x4(
                v, _mm_loadu_si128((const __m128i *)(rows[i + 8] + off)), 2);
            z[i] = _mm512_inserti32x4(
                v, _mm_loadu_si128((const __m128i *)(rows[i + 12] + off)), 3);
        }
        __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]),
                t1 = _mm512_unpackhi_epi32(z[0], z[1]);
        __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]),
                t3 = _mm512_unpackhi_epi32(z[2], z[3]);
        p[0] = _mm512_unpacklo_epi64(t0, t2);
        p[1] = _mm512_unpackhi_epi64(t0, t2);
        p[2] = _mm512_unpacklo_epi64(t1, t3);
        p[3] = _mm512_unpackhi_epi64(t1, t3);
        const __m512i m = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
#pragma GCC unroll 8
        for (int i = 0; i < 4; i++) {
            g[i] = _mm512_sub_epi8(_mm512_and_si512(p[i], m), eight);
            g[i + 4] =
                _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p[i], 4), m), eight);
        }
    }
#else
    if (dt == PD_CPU_DT_Q8_0) {
        __m256i z[8], t[8], u[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            z[i] = _mm256_loadu_si256((const __m256i *)(rows[i] + off));
#pragma GCC unroll 8
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_epi32(z[i], z[i + 1]);
            t[i + 1] = _mm256_unpackhi_epi32(z[i], z[i + 1]);
        }
#pragma GCC unroll 8
        for (int h = 0; h < 8; h += 4) {
            u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
            u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
            u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
            u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
#pragma GCC unroll 8
        for (int e = 0; e < 4; e++) {
            g[e] = _mm256_permute2x128_si256(u[e], u[e + 4], 0x20);
            g[e + 4] = _mm256_permute2x128_si256(u[e], u[e + 4], 0x31);
        }
    } else {
        __m256i z[4], p[4];
#pragma GCC unroll 8
        for (int i = 0; i < 4; i++)
            z[i] = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[i] + off))),
                _mm_loadu_si128((const __m128i *)(rows[i + 4] + off)), 1);
        __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]),
                t1 = _mm256_unpackhi_epi32(z[0], z[1]);
        __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]),
                t3 = _mm256_unpackhi_epi32(z[2], z[3]);
        p[0] = _mm256_unpacklo_epi64(t0, t2);
        p[1] = _mm256_unpackhi_epi64(t0, t2);
        p[2] = _mm256_unpacklo_epi64(t1, t3);
        p[3] = _mm256_unpackhi_epi64(t1, t3);
        const __m256i m = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
#pragma GCC unroll 8
        for (int i = 0; i < 4; i++) {
            g[i] = _mm256_sub_epi8(_mm256_and_si256(p[i], m), eight);
            g[i + 4] =
                _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(p[i], 4), m), eight);
        }
    }
#endif
}

/* Rows [o0, o1) of W (at most MQ_NR; lanes past o1 repeat row o1 - 1 and are never
 * stored) as the panel layout of the header. */
static inline __attribute__((always_inline)) void
mq_pack(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, uint8_t *panel, const int dt)
{
    const int64_t nb = mm->n_in / PD_QK;
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    const size_t qs = bs - 2;                             /* weight bytes of a block */
    uint8_t *stage = panel + (size_t)nb * MQ_BLOCK_BYTES; /* [VW][nb][qs] */
    for (int v = 0; v < MQ_NR / VW; v++) {
        /* First the VW rows in memory order, one sequential stream from DRAM: their
         * weights into stage, their scales into the panel. */
        const uint8_t *rows[VW];
        for (int r = 0; r < VW; r++) {
            int64_t o = pd_cpu_min64(o0 + v * VW + r, o1 - 1);
            const uint8_t *src = mm->w + (size_t)o * mm->row_bytes;
            uint8_t *dst = stage + (size_t)r * (size_t)nb * qs;
            float *scale = (float *)(panel + PD_QK * MQ_NR) + v * VW + r;
            rows[r] = dst;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = src + (size_t)b * bs;
                uint16_t d;
                memcpy(&d, blk, 2);
                scale[b * (MQ_BLOCK_BYTES / 4)] = _cvtsh_ss(d);
                if (dt == PD_CPU_DT_Q8_0)
                    _mm256_storeu_si256((__m256i *)(dst + b * 32),
                                        _mm256_loadu_si256((const __m256i *)(blk + 2)));
                else
                    _mm_storeu_si128((__m128i *)(dst + b * 16),
                                     _mm_loadu_si128((const __m128i *)(blk + 2)));
            }
        }
        /* Then block by block from L1/L2: transposed into the panel. */
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = panel + (size_t)b * MQ_BLOCK_BYTES;
            vi g[8];
            mq_transpose(rows, (size_t)b * qs, g, dt);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                memcpy(blk + (i * MQ_NR + v * VW) * 4, &g[i], sizeof(vi));
#if defined(PD_SIMD_VNNI)
            vi nc = mq_ncorr(g);
            memcpy(blk + (PD_QK + 4) * MQ_NR + v * VW * 4, &nc, sizeof nc);
#endif
        }
    }
}

/* The sum of the VW partials p[j] (j = block index mod VW) by vhsum1's tree, one
 * vector of rows at a time: p[0] = what vhsum1 makes of a vector whose lane j is p[j]. */
static inline __attribute__((always_inline)) vf mq_tree(vf p[VW])
{
#if VW == 16
    const int step[4] = {2, 1, 8, 4};
#else
    const int step[3] = {1, 2, 4};
#endif
    int done = 0;
#pragma GCC unroll 4
    for (int l = 0; l < (int)(sizeof step / sizeof step[0]); l++) {
#pragma GCC unroll 16
        for (int j = 0; j < VW; j++)
            if ((j & (done | step[l])) == 0)
                p[j] = vadd(p[j], p[j | step[l]]);
        done |= step[l];
    }
    return p[0];
}

/* y[t..t+M)[o0..o0+n_valid) from the panel. Rows sit in lanes, so the VW partials of
 * the canonical sum are kept apart: phase j takes blocks j, j + VW, ... in order into
 * registers, then the partials are added by the fixed tree. */
static inline __attribute__((always_inline)) void mq_kernel(const uint8_t *panel,
                                                            const pd_cpu_mm_t *mm,
                                                            int64_t t, float *y,
                                                            int n_valid, const int M)
{
    const int64_t K = mm->n_in, nb = K / PD_QK;
    vf part[2][MQ_M][VW];
    const uint8_t *xq[MQ_M];
    const float *xd[MQ_M];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        xq[i] = (const uint8_t *)mm->xq + (t + i) * K;
        xd[i] = mm->xd + (t + i) * nb;
    }
    for (int j = 0; j < VW; j++) {
        vf f[MQ_M][2];
#pragma GCC unroll 8
        for (int i = 0; i < M; i++)
            f[i][0] = f[i][1] = vzero();
        for (int64_t b = j; b < nb; b += VW) {
            const uint8_t *blk = panel + (size_t)b * MQ_BLOCK_BYTES;
            const float *scale = (const float *)(blk + PD_QK * MQ_NR);
            vi c0 = vi_zero(), c1 = vi_zero(), a[MQ_M][2];
#if defined(PD_SIMD_VNNI)
            c0 = vi_load(scale + MQ_NR);
            c1 = vi_load(scale + MQ_NR + VW);
#endif
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) {
                a[i][0] = c0;
                a[i][1] = c1;
            }
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                vi w0 = vi_load(blk + g * MQ_NR * 4),
                   w1 = vi_load(blk + g * MQ_NR * 4 + VW * 4);
                vi aw0 = w0, aw1 = w1;
                vneg n0, n1;
                mq_prep(w0, &aw0, &n0);
                mq_prep(w1, &aw1, &n1);
#pragma GCC unroll 8
                for (int i = 0; i < M; i++) {
                    int32_t xv;
                    memcpy(&xv, xq[i] + b * PD_QK + g * 4, 4);
#if VW == 16
                    vi xb = _mm512_set1_epi32(xv);
#else
                    vi xb = _mm256_set1_epi32(xv);
#endif
                    a[i][0] = mq_dot(a[i][0], xb, w0, aw0, n0);
                    a[i][1] = mq_dot(a[i][1], xb, w1, aw1, n1);
                }
            }
            vf s0 = vload(scale), s1 = vload(scale + VW);
#pragma GCC unroll 8
            for (int i = 0; i < M; i++) {
                vf dx = vset1(xd[i][b]);
                f[i][0] = vfma(vi_cvt(a[i][0]), vmul(s0, dx), f[i][0]);
                f[i][1] = vfma(vi_cvt(a[i][1]), vmul(s1, dx), f[i][1]);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) {
            part[0][i][j] = f[i][0];
            part[1][i][j] = f[i][1];
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        float *yi = y + (t + i) * mm->n_out;
        vf r0 = mq_tree(part[0][i]), r1 = mq_tree(part[1][i]);
        if (n_valid == MQ_NR) {
            vstore(yi, r0);
            vstore(yi + VW, r1);
        } else {
            vstoren(yi, r0, n_valid < VW ? n_valid : VW);
            if (n_valid > VW)
                vstoren(yi + VW, r1, n_valid - VW);
        }
    }
}

static inline size_t mq_panel_bytes(int64_t n_in)
{
    /* the panel, then the staged rows of one vector */
    return (size_t)(n_in / PD_QK) * (MQ_BLOCK_BYTES + VW * PD_QK) + 64;
}

/* gemm: rows [o0, o1) (at most MQ_NR) x tokens [t0, t1): pack once, then MQ_M tokens
 * at a time, one case per remainder. */
static inline __attribute__((always_inline)) void mq_gemm(const pd_cpu_mm_t *mm,
                                                          int64_t o0, int64_t o1,
                                                          int64_t t0, int64_t t1,
                                                          uint8_t *panel, const int dt)
{
    mq_pack(mm, o0, o1, panel, dt);
    int n_valid = (int)(o1 - o0);
    float *y = mm->y + o0;
    int64_t t = t0;
    for (; t + MQ_M <= t1; t += MQ_M)
        mq_kernel(panel, mm, t, y, n_valid, MQ_M);
    switch (t1 - t) {
    case 1:
        mq_kernel(panel, mm, t, y, n_valid, 1);
        break;
#if MQ_M > 2
    case 2:
        mq_kernel(panel, mm, t, y, n_valid, 2);
        break;
    case 3:
        mq_kernel(panel, mm, t, y, n_valid, 3);
        break;
    case 4:
        mq_kernel(panel, mm, t, y, n_valid, 4);
        break;
    case 5:
        mq_kernel(panel, mm, t, y, n_valid, 5);
        break;
#endif
    default:
        break;
    }
}

/* mv: one row at a time (a sequential stream), blocks in chunks of VW; lane j of a
 * chunk is block j, so the VW partials of the canonical sum are the lanes of one
 * accumulator per token. A chunk's weights are transposed once ([8 groups][VW blocks]
 * of 4 bytes) and serve every token; x is transposed alike once per call, into
 * scratch: xt [T][chunks][8][VW] int32. */
#define MQ_MV_MAX_T 15

static inline size_t mq_mv_scratch(int64_t n_in)
{
    int64_t nc = (n_in / PD_QK + VW - 1) / VW;
    return (size_t)MQ_MV_MAX_T * (size_t)nc * 8 * sizeof(vi);
}

/* The VW items of block chunk [b0, b0 + VW) as g[8]: item j at base + (b0 + j) *
 * stride, or, when clamp, at base + min(b0 + j, n - 1) * stride (the others may read
 * past block n - 1; their lanes are ignored). */
static inline __attribute__((always_inline)) void mq_chunk(const uint8_t *base,
                                                           size_t stride, int64_t b0,
                                                           int64_t n, vi g[8],
                                                           const int dt, const int clamp)
{
    const uint8_t *p[VW];
#pragma GCC unroll 16
    for (int j = 0; j < VW; j++)
        p[j] = clamp ? base + (size_t)pd_cpu_min64(b0 + j, n - 1) * stride
                     : base + (size_t)b0 * stride + (size_t)j * stride;
    mq_transpose(p, 0, g, dt);
}

/* d_w of the chunk's blocks as f32, 0 from block n on; inserted word by word (a
 * gather, or small stores and a vector load of them, stall). clamp as mq_chunk. */
static inline __attribute__((always_inline)) vf
mq_chunk_scales(const uint8_t *row, size_t bs, int64_t b0, int64_t n, const int clamp)
{
    const uint8_t *base = row + (size_t)b0 * bs;
    int64_t m = pd_cpu_min64(VW, n - b0), last = clamp ? m - 1 : VW - 1;
    __m128i h[VW / 8];
#pragma GCC unroll 2
    for (int q = 0; q < VW / 8; q++) {
        h[q] = _mm_setzero_si128();
#define PD_MQ_INS_(j)                                                                    \
    h[q] = _mm_insert_epi16(                                                             \
        h[q], *(const uint16_t *)(base + (size_t)pd_cpu_min64(8 * q + j, last) * bs), j)
        PD_MQ_INS_(0);
        PD_MQ_INS_(1);
        PD_MQ_INS_(2);
        PD_MQ_INS_(3);
        PD_MQ_INS_(4);
        PD_MQ_INS_(5);
        PD_MQ_INS_(6);
        PD_MQ_INS_(7);
#undef PD_MQ_INS_
    }
#if VW == 16
    vf d = _mm512_cvtph_ps(_mm256_set_m128i(h[1], h[0]));
    return m == VW ? d : _mm512_maskz_mov_ps(tail_mask(m), d);
#else
    vf d = _mm256_cvtph_ps(h[0]);
    return m == VW ? d : _mm256_and_ps(d, _mm256_castsi256_ps(tail_mask(m)));
#endif
}

/* Row o for T (<= MQ_MV_MAX_T) tokens, or one token when T1. */
static inline __attribute__((always_inline)) void mq_mv_row(const pd_cpu_mm_t *mm,
                                                            int64_t o, const vi *xt,
                                                            const int dt, const int clamp,
                                                            const int T1)
{
    const int64_t nb = mm->n_in / PD_QK, nc = (nb + VW - 1) / VW;
    const int64_t T = T1 ? 1 : mm->T;
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    const uint8_t *row = mm->w + (size_t)o * mm->row_bytes;
    vf acc[MQ_MV_MAX_T];
    for (int64_t t = 0; t < T; t++)
        acc[t] = vzero();
    for (int64_t c = 0; c < nc; c++) {
        int64_t b0 = c * VW, m = pd_cpu_min64(VW, nb - b0);
        _mm_prefetch((const char *)row + b0 * bs + 2 * PD_MV_PREFETCH, _MM_HINT_T0);
        vi g[8], aw[8];
        vneg neg[8];
        mq_chunk(row + 2, bs, b0, nb, g, dt, clamp);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            aw[i] = g[i];
            neg[i] = (vneg){0};
            mq_prep(g[i], &aw[i], &neg[i]);
        }
        vi corr = mq_ncorr(g);
        vf dw = mq_chunk_scales(row, bs, b0, nb, clamp);
        for (int64_t t = 0; t < T; t++) {
            const vi *xg = xt + (t * nc + c) * 8;
            vi a = corr;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                a = mq_dot(a, xg[i], g[i], aw[i], neg[i]);
            vf dx = vloadn(mm->xd + t * nb + b0, m);
            acc[t] = vfma(vi_cvt(a), vmul(dw, dx), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++)
        mm->y[t * mm->n_out + o] = vhsum1(acc[t]);
}

static inline __attribute__((always_inline)) void
mq_mv(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, void *scratch, const int dt)
{
    const int64_t K = mm->n_in, nb = K / PD_QK, nc = (nb + VW - 1) / VW, T = mm->T;
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    vi *xt = scratch;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < nc; c++)
            mq_chunk((const uint8_t *)mm->xq + t * K, PD_QK, c * VW, nb,
                     xt + (t * nc + c) * 8, PD_CPU_DT_Q8_0, 1);
    /* Rows followed by a whole chunk's bytes of the matrix may read past their end
     * (constant offsets); the last few clamp. */
    int64_t slack = (int64_t)((VW * bs + mm->row_bytes - 1) / mm->row_bytes);
    int64_t o_fast = pd_cpu_min64(o1, mm->n_out - slack);
    int64_t o = o0;
    if (T == 1) {
        for (; o < o_fast; o++)
            mq_mv_row(mm, o, xt, dt, 0, 1);
        for (; o < o1; o++)
            mq_mv_row(mm, o, xt, dt, 1, 1);
    } else {
        for (; o < o_fast; o++)
            mq_mv_row(mm, o, xt, dt, 0, 0);
        for (; o < o1; o++)
            mq_mv_row(mm, o, xt, dt, 1, 0);
    }
}

static inline void simd_gemm_q8_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                  int64_t t0, int64_t t1, void *scratch)
{
    mq_gemm(mm, o0, o1, t0, t1, scratch, PD_CPU_DT_Q8_0);
}

static inline void simd_gemm_q4_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                  int64_t t0, int64_t t1, void *scratch)
{
    mq_gemm(mm, o0, o1, t0, t1, scratch, PD_CPU_DT_Q4_0);
}

static inline void simd_mv_q8_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                void *scratch)
{
    mq_mv(mm, o0, o1, scratch, PD_CPU_DT_Q8_0);
}

static inline void simd_mv_q4_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                void *scratch)
{
    mq_mv(mm, o0, o1, scratch, PD_CPU_DT_Q4_0);
}

/* Per-thread scratch: the converted f32 rows of a float gemm panel, an int8 panel, or
 * the transposed activations of the int8 mv. */
static inline size_t simd_mm_scratch(int dt, int64_t n_in, int gemm)
{
    if (dt == PD_CPU_DT_Q8_0 || dt == PD_CPU_DT_Q4_0)
        return gemm ? mq_panel_bytes(n_in) : mq_mv_scratch(n_in);
    return gemm && dt != PD_CPU_DT_F32 ? (size_t)n_in * MQ_NR * sizeof(float) : 0;
}

#endif
