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

#if VW == 16
#define MQ_M  6 /* tokens per int8 tile: 24 zmm of accumulators */
typedef __m512i vi;
#else
#define MQ_M  2
typedef __m256i vi;
#endif
#define MQ_NR          (2 * VW) /* rows of an int8 panel (= gemm_nr) */
#define MQ_BLOCK_BYTES (PD_QK * MQ_NR + 2 * 4 * MQ_NR) /* w, scales, -128 * sum(w) */

/* ---- float weights ------------------------------------------------------------------
 */

/* Tile shapes: MF_TT tokens per tile (MF_TT x 4 rows of accumulators fill most of the
 * vector registers), MF_RS rows when a few tokens leave room for more rows (more
 * independent chains, one weight load per row feeding all the tokens). */
#if VW == 16
#define MF_TT 6 /* 4 x 6 = 24 zmm accumulators */
#define MF_RS 8 /* T <= 3: 8 x 3 */
#else
#define MF_TT 3 /* 4 x 3 = 12 ymm accumulators */
#define MF_RS 4
#endif
#define MF_RMAX 8

/* The int8 kernels below prefetch PD_MV_PREFETCH bytes ahead of each row. */
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
 * dt) and TT tokens: the canonical reduction of the header for each (o, t).
 * Prefetch: with pf, the lines pf bytes past those read (into L2), and with pf2 also
 * those pf2 bytes past. Streaming overlaps the arithmetic only when the weights are
 * requested blocks of rows ahead, and more than once (measured on Zen 4: one request
 * per line leaves much of the stream to demand misses; presumably prefetches are
 * dropped while the miss queues are full). */
static inline __attribute__((always_inline)) void
mm_tile(const pd_cpu_mm_t *mm, const uint8_t *w, size_t stride, int64_t o, int64_t t,
        const int R, const int TT, const int dt, size_t pf, size_t pf2)
{
    const int64_t K = mm->n_in;
    const uint8_t *wr[MF_RMAX];
    const float *x[MF_TT];
    vf acc[MF_RMAX][MF_TT];
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
        if (pf && (k * (int64_t)es) % 64 == 0)
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                _mm_prefetch((const char *)wr[r] + pf + (size_t)k * es, _MM_HINT_T1);
                if (pf2)
                    _mm_prefetch((const char *)wr[r] + pf2 + (size_t)k * es, _MM_HINT_T1);
            }
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
        if (R % 4 == 0)
#pragma GCC unroll 8
            for (int r = 0; r < R; r += 4)
                _mm_storeu_ps(
                    y + j * mm->n_out + r,
                    vhsum4(acc[r][j], acc[r + 1][j], acc[r + 2][j], acc[r + 3][j]));
        else
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                y[j * mm->n_out + r] = vhsum1(acc[r][j]);
    }
}

/* Tokens [t0, t1) of R rows in tiles of at most TT, as even as possible (a ragged
 * last tile would have few chains); one case per tile size up to TT (the others fold
 * away) so that the inlined tile keeps only the accumulators it uses. Every tile
 * prefetches pf bytes ahead (the repeats are cheap: the lines are in flight or in
 * L2), and a lone tile also pf / 2 ahead (measured on Zen 4: better than either
 * distance alone). */
static inline __attribute__((always_inline)) void
mm_tokens(const pd_cpu_mm_t *mm, const uint8_t *w, size_t stride, int64_t o, int64_t t0,
          int64_t t1, const int R, const int TT, const int dt, size_t pf)
{
    int64_t n = t1 - t0, tiles = (n + TT - 1) / TT, t = t0;
    size_t pf2 = tiles == 1 ? pf / 2 : 0;
    for (int64_t i = 0; i < tiles; i++) {
        int64_t tt = n / tiles + (i < n % tiles);
        switch (tt) {
        case 1:
            mm_tile(mm, w, stride, o, t, R, 1, dt, pf, pf2);
            break;
        case 2:
            if (TT >= 2)
                mm_tile(mm, w, stride, o, t, R, 2, dt, pf, pf2);
            break;
        case 3:
            if (TT >= 3)
                mm_tile(mm, w, stride, o, t, R, 3, dt, pf, pf2);
            break;
#if MF_TT > 3
        case 4:
            if (TT >= 4)
                mm_tile(mm, w, stride, o, t, R, 4, dt, pf, pf2);
            break;
        case 5:
            if (TT >= 5)
                mm_tile(mm, w, stride, o, t, R, 5, dt, pf, pf2);
            break;
        case 6:
            if (TT >= 6)
                mm_tile(mm, w, stride, o, t, R, 6, dt, pf, pf2);
            break;
#endif
        default:
            break;
        }
        t += tt;
    }
}

/* Rows [o0, o1), R at a time (read from DRAM once, from L1 for the further tiles of
 * tokens) while the rows two blocks on are prefetched; then single rows. */
static inline __attribute__((always_inline)) void mv_rows(const pd_cpu_mm_t *mm,
                                                          int64_t o0, int64_t o1,
                                                          const int R, const int TT,
                                                          const int dt)
{
    const size_t rb = mm->row_bytes;
    int64_t o = o0;
    for (; o + R <= o1; o += R)
        mm_tokens(mm, mm->w + (size_t)o * rb, rb, o, 0, mm->T, R, TT, dt, 2 * R * rb);
    for (; o < o1; o++)
        mm_tokens(mm, mm->w + (size_t)o * rb, rb, o, 0, mm->T, 1, TT, dt, 2 * rb);
}

/* mv: every weight row is streamed from DRAM once for all T tokens, whose activations
 * stay in L1 / L2; one token or a few: MF_RS rows at a time (the chains), more: 4
 * rows x MF_TT tokens per tile. */
static inline __attribute__((always_inline)) void
mv_float(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, const int dt)
{
    if (mm->T == 1)
        mv_rows(mm, o0, o1, MF_RS, 1, dt);
    else if (mm->T <= 3)
        mv_rows(mm, o0, o1, MF_RS, 3, dt);
    else
        mv_rows(mm, o0, o1, 4, MF_TT, dt);
}

/* gemm: rows [o0, o1) (at most MQ_NR) as f32 rows (F16/BF16 converted into scratch),
 * then tokens outermost: a tile's activation rows stay in L1 while it sweeps the
 * panel, which stays in L2 for the whole chunk of tokens. The first sweep (or the
 * conversion) reads the panel from DRAM, prefetching ahead. */
static inline __attribute__((always_inline)) void gemm_float(const pd_cpu_mm_t *mm,
                                                             int64_t o0, int64_t o1,
                                                             int64_t t0, int64_t t1,
                                                             void *scratch, const int dt)
{
    const int64_t K = mm->n_in;
    const uint8_t *w = mm->w + (size_t)o0 * mm->row_bytes;
    size_t stride = mm->row_bytes, pf = 8 * stride;
    if (dt != PD_CPU_DT_F32) {
        float *conv = scratch; /* [o1 - o0][K] */
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *src = mm->w + (size_t)o * mm->row_bytes;
            float *dst = conv + (o - o0) * K;
            int64_t k = 0;
            for (; k + VW <= K; k += VW) {
                if ((k * 2) % 64 == 0)
                    _mm_prefetch((const char *)src + pf + 2 * k, _MM_HINT_T1);
                vstore(dst + k, wload(src, k, dt));
            }
            if (k < K)
                vstoren(dst + k, wloadn(src, k, K - k, dt), K - k);
        }
        w = scratch;
        stride = (size_t)K * sizeof(float);
        pf = 0;
    }
    int64_t n = t1 - t0, tiles = (n + MF_TT - 1) / MF_TT;
    for (int64_t i = 0, t = t0; i < tiles; i++) { /* even tiles, as mm_tokens */
        int64_t te = t + n / tiles + (i < n % tiles), o = o0;
        for (; o + 4 <= o1; o += 4)
            mm_tokens(mm, w + (size_t)(o - o0) * stride, stride, o, t, te, 4, MF_TT,
                      PD_CPU_DT_F32, pf);
        for (; o < o1; o++)
            mm_tokens(mm, w + (size_t)(o - o0) * stride, stride, o, t, te, 1, MF_TT,
                      PD_CPU_DT_F32, pf);
        pf = 0;
        t = te;
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

static inline __attribute__((always_inline)) vi vi_add(vi a, vi b)
{
#if VW == 16
    return _mm512_add_epi32(a, b);
#else
    return _mm256_add_epi32(a, b);
#endif
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

/* mv of one token (decode): the same blocks-in-lanes reduction, but the integer dots
 * are reduced after the multiply instead of transposing the weights: a vector holds
 * whole blocks in their natural byte order (VW = 16: blocks e and e + 4 of the chunk
 * in its halves, e = 0..3, then 8 + e and 12 + e; VW = 8: one block), its dot with
 * x (arranged alike, once per call) gives 8 int32 partials per block, and a fixed
 * tree of unpacks and adds (mq1_tree) turns the chunk's 8 vectors into one vector of
 * P_b with lane j = block j. The sums are exact integers, so P_b equals the one of
 * the transposing kernels bit for bit. The weights go in as bytes that vpdpbusd (or
 * vpmaddubsw) takes unsigned where that is exact: Q8_0 with VNNI as w + 128 (xor
 * 0x80), Q4_0 as its nibbles; the offset (128 resp. 8 times sum x_b) is subtracted
 * once per block after the tree (mq1_corr, per call). Q8_0 without VNNI goes through
 * |w| and sign(x, w). */
#if defined(PD_SIMD_VNNI)
#define MQ1_Q8_OFFSET 128
#else
#define MQ1_Q8_OFFSET 0
#endif

/* Block of vector i (first half) of a chunk; the second half is 4 blocks further. */
static inline __attribute__((always_inline)) int mq1_block(int i)
{
#if VW == 16
    return i < 4 ? i : i + 4;
#else
    return i;
#endif
}

/* Vector i of the chunk at blocks b0.. of a weight row (row points at the first
 * block's scale); clamp: block indices past n - 1 read block n - 1. */
static inline __attribute__((always_inline)) vi mq1_wload(const uint8_t *row, size_t bs,
                                                          int64_t b0, int64_t n, int i,
                                                          const int dt, const int clamp)
{
    int64_t b = b0 + mq1_block(i);
#if VW == 16
    int64_t b2 = b + 4;
    if (clamp) {
        b = pd_cpu_min64(b, n - 1);
        b2 = pd_cpu_min64(b2, n - 1);
    }
    const uint8_t *p = row + (size_t)b * bs + 2, *p2 = row + (size_t)b2 * bs + 2;
    if (dt == PD_CPU_DT_Q8_0) {
        __m512i w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
            _mm256_loadu_si256((const __m256i *)p2), 1);
#if defined(PD_SIMD_VNNI)
        w = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
#endif
        return w;
    }
    __m256i q = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
        _mm_loadu_si128((const __m128i *)p2), 1);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
    return _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
#else
    if (clamp)
        b = pd_cpu_min64(b, n - 1);
    const uint8_t *p = row + (size_t)b * bs + 2;
    if (dt == PD_CPU_DT_Q8_0)
        return _mm256_loadu_si256((const __m256i *)p);
    __m128i q = _mm_loadu_si128((const __m128i *)p);
    __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
    return _mm256_and_si256(z, _mm256_set1_epi8(0x0f));
#endif
}

/* The int32 partial dots of w (as mq1_wload gives it) and x (signed bytes). */
static inline __attribute__((always_inline)) vi mq1_dot(vi w, vi x, const int dt)
{
#if VW == 16
    if (dt == PD_CPU_DT_Q4_0 || MQ1_Q8_OFFSET != 0) { /* w unsigned */
#if defined(PD_SIMD_VNNI)
        return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
#else
        return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
#endif
    }
    __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), sx),
                             _mm512_set1_epi16(1));
#else
    if (dt == PD_CPU_DT_Q4_0)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                             _mm256_set1_epi16(1));
#endif
}

/* d[0..8) (d[0..4) when half) -> lane j = the sum of block j's partials. Written
 * out: arrays indexed in loops would stay in memory. */
#if VW == 16
#define MQ1_UNPACK(a, b, w)                                                              \
    _mm512_add_epi32(_mm512_unpacklo_epi##w(a, b), _mm512_unpackhi_epi##w(a, b))
#else
#define MQ1_UNPACK(a, b, w)                                                              \
    _mm256_add_epi32(_mm256_unpacklo_epi##w(a, b), _mm256_unpackhi_epi##w(a, b))
#endif
static inline __attribute__((always_inline)) vi mq1_tree(const vi d[8], const int dt,
                                                         const int half)
{
    vi a0 = MQ1_UNPACK(d[0], d[1], 32), a1 = MQ1_UNPACK(d[2], d[3], 32);
    vi b0 = MQ1_UNPACK(a0, a1, 64), b1 = b0;
    if (!half) {
        vi a2 = MQ1_UNPACK(d[4], d[5], 32), a3 = MQ1_UNPACK(d[6], d[7], 32);
        b1 = MQ1_UNPACK(a2, a3, 64);
    }
#if VW == 16
    /* 128-bit lane L of b0 (b1): the sums of lane L of d[0..4) (d[4..8)). Q8_0 has a
     * vector's first block in lanes 0-1, Q4_0 (low nibbles, then high) in 0 and 2. */
    if (dt == PD_CPU_DT_Q8_0)
        return _mm512_add_epi32(_mm512_shuffle_i32x4(b0, b1, 0x88),
                                _mm512_shuffle_i32x4(b0, b1, 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(b0, b1, 0x44),
                            _mm512_shuffle_i32x4(b0, b1, 0xee));
#else
    (void)dt;
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20),
                            _mm256_permute2x128_si256(b0, b1, 0x31));
#endif
}
#undef MQ1_UNPACK

/* d_w of blocks b0.. as f32 (lane j: block b0 + j, or min(b0 + j, n - 1) when clamp),
 * lanes from m on zero; m <= 8 when half. Four scales a 64-bit word in general
 * registers, then one vector insert per word: the vector ports are the bottleneck. */
static inline __attribute__((always_inline)) vf mq1_scales(const uint8_t *row, size_t bs,
                                                           int64_t b0, int64_t n,
                                                           int64_t m, const int clamp,
                                                           const int half)
{
    uint64_t q[VW / 4] = {0};
#pragma GCC unroll 4
    for (int k = 0; k < VW / 4; k++) {
        if (half && k >= VW / 8)
            break;
        uint64_t v = 0;
#pragma GCC unroll 4
        for (int e = 0; e < 4; e++) {
            int64_t b = b0 + 4 * k + e;
            if (clamp)
                b = pd_cpu_min64(b, n - 1);
            uint16_t h;
            memcpy(&h, row + (size_t)b * bs, 2);
            v |= (uint64_t)h << (16 * e);
        }
        q[k] = v;
    }
#if VW == 16
    __m128i lo = _mm_set_epi64x((long long)q[1], (long long)q[0]);
    if (half)
        return _mm512_maskz_mov_ps(tail_mask(m), _mm512_cvtph_ps(_mm256_castsi128_si256(lo)));
    __m128i hi = _mm_set_epi64x((long long)q[3], (long long)q[2]);
    vf d = _mm512_cvtph_ps(_mm256_set_m128i(hi, lo));
    return clamp ? _mm512_maskz_mov_ps(tail_mask(m), d) : d;
#else
    __m128i lo = half ? _mm_cvtsi64_si128((long long)q[0])
                      : _mm_set_epi64x((long long)q[1], (long long)q[0]);
    vf d = _mm256_cvtph_ps(lo);
    return clamp ? _mm256_and_ps(d, _mm256_castsi256_ps(tail_mask(m))) : d;
#endif
}

/* Per call: x of the token as mq1 vectors (xs: [chunks][8] vi, the bytes of each
 * vector's blocks in the order mq1_wload gives the weights) and the per-block offset
 * correction (corr: [chunks] vi, lane j = -offset * sum x of block j). */
static inline __attribute__((always_inline)) void
mq1_prep_x(const pd_cpu_mm_t *mm, vi *xs, vi *corr, const int dt)
{
    const int64_t nb = mm->n_in / PD_QK, nc = (nb + VW - 1) / VW;
    const int8_t *xq = mm->xq;
    const int off = dt == PD_CPU_DT_Q4_0 ? 8 : MQ1_Q8_OFFSET;
    for (int64_t c = 0; c < nc; c++) {
        int32_t cr[VW] = {0};
        for (int j = 0; off && j < VW; j++) { /* sum x_b: psadbw of x + 128 */
            int64_t b = pd_cpu_min64(c * VW + j, nb - 1);
            __m256i v = _mm256_xor_si256(
                _mm256_loadu_si256((const __m256i *)(xq + b * PD_QK)),
                _mm256_set1_epi8((char)0x80));
            __m256i sd = _mm256_sad_epu8(v, _mm256_setzero_si256());
            __m128i h = _mm_add_epi64(_mm256_castsi256_si128(sd),
                                      _mm256_extracti128_si256(sd, 1));
            h = _mm_add_epi64(h, _mm_unpackhi_epi64(h, h));
            cr[j] = -off * (_mm_cvtsi128_si32(h) - 128 * PD_QK);
        }
        memcpy(&corr[c], cr, sizeof cr);
        for (int i = 0; i < 8; i++) {
            int64_t b = pd_cpu_min64(c * VW + mq1_block(i), nb - 1);
            uint8_t *dst = (uint8_t *)&xs[c * 8 + i];
#if VW == 16
            int64_t b2 = pd_cpu_min64(c * VW + mq1_block(i) + 4, nb - 1);
            if (dt == PD_CPU_DT_Q8_0) {
                memcpy(dst, xq + b * PD_QK, 32);
                memcpy(dst + 32, xq + b2 * PD_QK, 32);
            } else {
                memcpy(dst, xq + b * PD_QK, 16);
                memcpy(dst + 16, xq + b2 * PD_QK, 16);
                memcpy(dst + 32, xq + b * PD_QK + 16, 16);
                memcpy(dst + 48, xq + b2 * PD_QK + 16, 16);
            }
#else
            memcpy(dst, xq + b * PD_QK, 32);
#endif
        }
    }
}

/* sum_b P_b d_w[b] d_x[b] of row o as the VW canonical partials. */
static inline __attribute__((always_inline)) vf mq1_row(const pd_cpu_mm_t *mm, int64_t o,
                                                        const vi *xs, const vi *corr,
                                                        const int dt)
{
    const int64_t nb = mm->n_in / PD_QK;
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    const int corrected = dt == PD_CPU_DT_Q4_0 || MQ1_Q8_OFFSET != 0;
    const uint8_t *row = mm->w + (size_t)o * mm->row_bytes;
    vf acc = vzero();
    int64_t c = 0, b0 = 0;
    for (; b0 + VW <= nb; b0 += VW, c++) {
        vi d[8];
        /* every line of the chunk, PD_MV_PREFETCH bytes ahead */
#pragma GCC unroll 16
        for (size_t l = 0; l < VW * bs; l += 64)
            _mm_prefetch((const char *)row + (size_t)b0 * bs + PD_MV_PREFETCH + l,
                         _MM_HINT_T0);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            d[i] = mq1_dot(mq1_wload(row, bs, b0, nb, i, dt, 0), xs[c * 8 + i], dt);
        vi p = mq1_tree(d, dt, 0);
        if (corrected)
            p = vi_add(p, corr[c]);
        vf dw = mq1_scales(row, bs, b0, nb, VW, 0, 0);
        acc = vfma(vi_cvt(p), vmul(dw, vload(mm->xd + b0)), acc);
    }
    if (b0 < nb) { /* the last, partial chunk: clamped loads, lanes past nb zero */
        int64_t m = nb - b0;
        vi d[8], p;
        vf dw;
        if (m <= VW / 2) {
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                d[i] = mq1_dot(mq1_wload(row, bs, b0, nb, i, dt, 1), xs[c * 8 + i], dt);
            p = mq1_tree(d, dt, 1);
            dw = mq1_scales(row, bs, b0, nb, m, 1, 1);
        } else {
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                d[i] = mq1_dot(mq1_wload(row, bs, b0, nb, i, dt, 1), xs[c * 8 + i], dt);
            p = mq1_tree(d, dt, 0);
            dw = mq1_scales(row, bs, b0, nb, m, 1, 0);
        }
        if (corrected)
            p = vi_add(p, corr[c]);
        acc = vfma(vi_cvt(p), vmul(dw, vloadn(mm->xd + b0, m)), acc);
    }
    return acc;
}

/* Rows [o0, o1) for one token, four at a time through vhsum4 (each row still read
 * as one sequential stream). */
static inline __attribute__((always_inline)) void
mq1_mv(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, void *scratch, const int dt)
{
    const int64_t nc = (mm->n_in / PD_QK + VW - 1) / VW;
    vi *xs = scratch, *corr = xs + nc * 8;
    mq1_prep_x(mm, xs, corr, dt);
    float *y = mm->y;
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        vf r0 = mq1_row(mm, o, xs, corr, dt), r1 = mq1_row(mm, o + 1, xs, corr, dt);
        vf r2 = mq1_row(mm, o + 2, xs, corr, dt), r3 = mq1_row(mm, o + 3, xs, corr, dt);
        _mm_storeu_ps(y + o, vhsum4(r0, r1, r2, r3));
    }
    for (; o < o1; o++)
        y[o] = vhsum1(mq1_row(mm, o, xs, corr, dt));
}

/* Row o for T (2 <= T <= MQ_MV_MAX_T) tokens. */
static inline __attribute__((always_inline)) void mq_mv_row(const pd_cpu_mm_t *mm,
                                                            int64_t o, const vi *xt,
                                                            const int dt, const int clamp)
{
    const int64_t nb = mm->n_in / PD_QK, nc = (nb + VW - 1) / VW;
    const int64_t T = mm->T;
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
    if (T == 1) {
        mq1_mv(mm, o0, o1, scratch, dt);
        return;
    }
    vi *xt = scratch;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < nc; c++) {
            vi *g = xt + (t * nc + c) * 8;
            mq_chunk((const uint8_t *)mm->xq + t * K, PD_QK, c * VW, nb, g,
                     PD_CPU_DT_Q8_0, 1);
#if defined(PD_SIMD_VNNI) /* x comes signed (mq1's format): vpdpbusd wants x + 128 */
            for (int i = 0; i < 8; i++)
                g[i] = _mm512_xor_si512(g[i], _mm512_set1_epi8((char)0x80));
#endif
        }
    /* Rows followed by a whole chunk's bytes of the matrix may read past their end
     * (constant offsets); the last few clamp. */
    int64_t slack = (int64_t)((VW * bs + mm->row_bytes - 1) / mm->row_bytes);
    int64_t o_fast = pd_cpu_min64(o1, mm->n_out - slack);
    int64_t o = o0;
    for (; o < o_fast; o++)
        mq_mv_row(mm, o, xt, dt, 0);
    for (; o < o1; o++)
        mq_mv_row(mm, o, xt, dt, 1);
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
