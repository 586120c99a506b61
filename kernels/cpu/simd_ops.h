/* simd_ops.h - ISA-neutral bodies of the element-wise, attention and matrix-vector
 * kernels, compiled once per ISA.
 *
 * Design: an ISA file includes simd_avx2.h or simd_avx512.h (VW lanes of vf and the
 * v*() operations), optionally defines PD_SIMD_VNNI, then includes this file and puts
 * the functions into its pd_cpu_isa_t. Numerics follow the scalar reference: the same
 * formulas, with sums in VW-lane partial order and multiply-adds fused where marked;
 * element-wise products (rope, rmsnorm scaling) round exactly as the reference.
 * The integer dot products use the 256-bit AVX2 encodings in both ISAs (the int8
 * blocks of Q8_0/Q4_0 are 32 bytes); with PD_SIMD_VNNI they use vpdpbusd.
 * Threading: pure functions over the rows they are given. */
#ifndef PD_SIMD_OPS_H
#define PD_SIMD_OPS_H

#include <math.h>
#include <string.h>

#include "common/tensor.h"
#include "kernels/cpu/cpu_internal.h"

/* ---- element-wise ---------------------------------------------------------------- */

static inline float simd_dot(const float *a, const float *b, int64_t n)
{
    vf s0 = vzero(), s1 = vzero();
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        s0 = vfma(vload(a + i), vload(b + i), s0);
        s1 = vfma(vload(a + i + VW), vload(b + i + VW), s1);
    }
    for (; i + VW <= n; i += VW)
        s0 = vfma(vload(a + i), vload(b + i), s0);
    if (i < n)
        s1 = vfma(vloadn(a + i, n - i), vloadn(b + i, n - i), s1);
    return vhsum(vadd(s0, s1));
}

static inline float simd_dot_h(const float *a, const uint16_t *b, int64_t n)
{
    vf s0 = vzero(), s1 = vzero();
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        s0 = vfma(vload(a + i), vload_h(b + i), s0);
        s1 = vfma(vload(a + i + VW), vload_h(b + i + VW), s1);
    }
    for (; i + VW <= n; i += VW)
        s0 = vfma(vload(a + i), vload_h(b + i), s0);
    if (i < n)
        s1 = vfma(vloadn(a + i, n - i), vloadn_h(b + i, n - i), s1);
    return vhsum(vadd(s0, s1));
}

static inline void simd_rmsnorm(float *out, const float *x, const float *w, int64_t n,
                                float eps)
{
    float ss = simd_dot(x, x, n);
    ss /= (float)n;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    vf s = vset1(ss);
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        vstore(out + i, vmul(vload(w + i), vmul(s, vload(x + i))));
    if (i < n)
        vstoren(out + i, vmul(vloadn(w + i, n - i), vmul(s, vloadn(x + i, n - i))),
                n - i);
}

static inline void simd_softmax(float *x, int64_t n)
{
    int64_t nv = n / VW * VW, i;
    vf m = vset1(x[0]);
    for (i = 0; i < nv; i += VW)
        m = vmax(m, vload(x + i));
    float max = vhmax(m);
    for (i = nv; i < n; i++)
        max = x[i] > max ? x[i] : max;
    vf mv = vset1(max), s = vzero();
    for (i = 0; i < nv; i += VW) {
        vf e = vexp(vsub(vload(x + i), mv));
        vstore(x + i, e);
        s = vadd(s, e);
    }
    float sum = vhsum(s);
    if (nv < n) {
        vstoren(x + nv, vexp(vsub(vloadn(x + nv, n - nv), mv)), n - nv);
        for (i = nv; i < n; i++)
            sum += x[i];
    }
    vf d = vset1(sum);
    for (i = 0; i < nv; i += VW)
        vstore(x + i, vdiv(vload(x + i), d));
    if (nv < n)
        vstoren(x + nv, vdiv(vloadn(x + nv, n - nv), d), n - nv);
}

static inline vf simd_silu1(vf g, vf u)
{
    vf one = vset1(1.0f);
    vf sig = vdiv(one, vadd(one, vexp(vsub(vzero(), g))));
    return vmul(vmul(g, sig), u);
}

static inline void simd_silu_mul(float *gate, const float *up, int64_t n)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        vstore(gate + i, simd_silu1(vload(gate + i), vload(up + i)));
    if (i < n)
        vstoren(gate + i, simd_silu1(vloadn(gate + i, n - i), vloadn(up + i, n - i)),
                n - i);
}

static inline void simd_add(float *y, const float *x, int64_t n)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        vstore(y + i, vadd(vload(y + i), vload(x + i)));
    if (i < n)
        vstoren(y + i, vadd(vloadn(y + i, n - i), vloadn(x + i, n - i)), n - i);
}

/* out = x * cos + swap(x) * (-sin, sin): (x0 c - x1 s, x1 c + x0 s), as the reference. */
static inline void simd_rope(float *x, int n_heads, int head_dim, const float *cs,
                             int32_t pos, float theta)
{
    (void)pos;
    (void)theta;
    const float *cc = cs, *ss = cs + head_dim;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (int64_t)h * head_dim;
        int i = 0;
        for (; i + VW <= head_dim; i += VW) {
            vf a = vload(v + i);
            vstore(v + i,
                   vadd(vmul(a, vload(cc + i)), vmul(vswap_pairs(a), vload(ss + i))));
        }
        for (; i < head_dim; i += 2) {
            float v0 = v[i], v1 = v[i + 1];
            v[i] = v0 * cc[i] + v1 * ss[i];
            v[i + 1] = v1 * cc[i + 1] + v0 * ss[i + 1];
        }
    }
}

static inline void simd_f32_to_f16(const float *src, uint16_t *dst, int64_t n)
{
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        vstore_h(dst + i, vload(src + i));
    if (i < n)
        vstoren_h(dst + i, vloadn(src + i, n - i), n - i);
}

/* Q8 blocks of x with f32 scales d = amax / 127 (llama.cpp's q8_0, unrounded scale). */
static inline void simd_quantize_x(const float *x, int64_t n, int8_t *qs, float *d,
                                   int add128)
{
    for (int64_t b = 0; b < n / PD_QK; b++) {
        float amax = vamax32(x + b * PD_QK);
        float db = amax / 127.0f;
        d[b] = db;
        vquant32(x + b * PD_QK, db != 0.0f ? 1.0f / db : 0.0f, qs + b * PD_QK, add128);
    }
}

/* ---- attention ------------------------------------------------------------------- */

/* The cache is walked block by block, so the block table is read once per block and
 * no division happens per position. kvh's vector of position p is at
 * base(p's block) + (p % block_size) * row_bytes. */
typedef struct attn_walk {
    const uint8_t *k_cache, *v_cache;
    size_t row_bytes, block_bytes, head_off; /* bytes */
} attn_walk_t;

static inline attn_walk_t attn_walk(const pd_attn_args_t *a, int kvh, size_t es)
{
    attn_walk_t w;
    w.k_cache = a->k_cache;
    w.v_cache = a->v_cache;
    w.row_bytes = (size_t)a->n_kv_heads * (size_t)a->head_dim * es;
    w.block_bytes = w.row_bytes * (size_t)a->block_size;
    w.head_off = (size_t)kvh * (size_t)a->head_dim * es;
    return w;
}

static inline __attribute__((always_inline)) vf kvload(const uint8_t *r, int j,
                                                       const int f16)
{
    return f16 ? vload_h((const uint16_t *)r + j * VW) : vload((const float *)r + j * VW);
}

/* Query block of QB queries of one head (QB * NV <= 16 accumulators). scores: QB rows
 * of ld floats. Keys p < n_max are scored for every query of the block; query i then
 * takes softmax over its own p < n[i] and zero weight past it. */

/* scores[i][p] = q_i . k_p * scale for p < n_max, four positions at a time. */
static inline __attribute__((always_inline)) void
attn_scores(const pd_attn_args_t *a, const attn_walk_t *w, const float *const *q,
            int64_t n_max, float *scores, int64_t ld, const int QB, const int NV,
            const int f16)
{
    __m128 scale = _mm_set1_ps(a->scale);
    for (int64_t p0 = 0; p0 < n_max; p0 += a->block_size) {
        const uint8_t *base =
            w->k_cache + (size_t)a->block_table[p0 / a->block_size] * w->block_bytes +
            w->head_off;
        int64_t m = pd_cpu_min64(a->block_size, n_max - p0), i = 0;
        for (; i + 4 <= m; i += 4) {
            const uint8_t *r = base + (size_t)i * w->row_bytes;
            vf s[4][4];
#pragma GCC unroll 4
            for (int qi = 0; qi < QB; qi++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    s[qi][c] = vzero();
#pragma GCC unroll 8
            for (int j = 0; j < NV; j++) {
                vf k0 = kvload(r, j, f16), k1 = kvload(r + w->row_bytes, j, f16);
                vf k2 = kvload(r + 2 * w->row_bytes, j, f16);
                vf k3 = kvload(r + 3 * w->row_bytes, j, f16);
#pragma GCC unroll 4
                for (int qi = 0; qi < QB; qi++) {
                    vf qv = vload(q[qi] + j * VW);
                    s[qi][0] = vfma(qv, k0, s[qi][0]);
                    s[qi][1] = vfma(qv, k1, s[qi][1]);
                    s[qi][2] = vfma(qv, k2, s[qi][2]);
                    s[qi][3] = vfma(qv, k3, s[qi][3]);
                }
            }
#pragma GCC unroll 4
            for (int qi = 0; qi < QB; qi++)
                _mm_storeu_ps(
                    scores + qi * ld + p0 + i,
                    _mm_mul_ps(vhsum4(s[qi][0], s[qi][1], s[qi][2], s[qi][3]), scale));
        }
        for (; i < m; i++) {
            const uint8_t *r = base + (size_t)i * w->row_bytes;
#pragma GCC unroll 4
            for (int qi = 0; qi < QB; qi++) {
                vf s0 = vzero();
#pragma GCC unroll 8
                for (int j = 0; j < NV; j++)
                    s0 = vfma(vload(q[qi] + j * VW), kvload(r, j, f16), s0);
                scores[qi * ld + p0 + i] = vhsum(s0) * a->scale;
            }
        }
    }
}

/* out_i = sum_p scores[i][p] * v_p for p < n_max, accumulators in registers. */
static inline __attribute__((always_inline)) void
attn_values(const pd_attn_args_t *a, const attn_walk_t *w, const float *scores,
            int64_t ld, int64_t n_max, float *const *out, const int QB, const int NV,
            const int f16)
{
    vf acc[4][8];
#pragma GCC unroll 4
    for (int qi = 0; qi < QB; qi++)
#pragma GCC unroll 8
        for (int j = 0; j < NV; j++)
            acc[qi][j] = vzero();
    for (int64_t p0 = 0; p0 < n_max; p0 += a->block_size) {
        const uint8_t *base =
            w->v_cache + (size_t)a->block_table[p0 / a->block_size] * w->block_bytes +
            w->head_off;
        int64_t m = pd_cpu_min64(a->block_size, n_max - p0);
        for (int64_t i = 0; i < m; i++) {
            const uint8_t *r = base + (size_t)i * w->row_bytes;
            vf v[8];
#pragma GCC unroll 8
            for (int j = 0; j < NV; j++)
                v[j] = kvload(r, j, f16);
#pragma GCC unroll 4
            for (int qi = 0; qi < QB; qi++) {
                vf s = vset1(scores[qi * ld + p0 + i]);
#pragma GCC unroll 8
                for (int j = 0; j < NV; j++)
                    acc[qi][j] = vfma(s, v[j], acc[qi][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int qi = 0; qi < QB; qi++)
#pragma GCC unroll 8
        for (int j = 0; j < NV; j++)
            vstore(out[qi] + j * VW, acc[qi][j]);
}

static inline __attribute__((always_inline)) void
attn_block(const pd_attn_args_t *a, const attn_walk_t *w, int h, int64_t t0,
           float *scores, const int QB, const int NV, const int f16)
{
    const float *q[4];
    float *out[4];
    int64_t n[4], n_max = 0;
#pragma GCC unroll 4
    for (int qi = 0; qi < QB; qi++) {
        q[qi] = a->q + ((t0 + qi) * a->n_heads + h) * a->head_dim;
        out[qi] = a->out + ((t0 + qi) * a->n_heads + h) * a->head_dim;
        n[qi] = (int64_t)a->pos[t0 + qi] + 1;
        n_max = n[qi] > n_max ? n[qi] : n_max;
    }
    int64_t ld = (n_max + 15) / 16 * 16;
    attn_scores(a, w, q, n_max, scores, ld, QB, NV, f16);
    for (int qi = 0; qi < QB; qi++) {
        simd_softmax(scores + qi * ld, n[qi]);
        for (int64_t p = n[qi]; p < n_max; p++)
            scores[qi * ld + p] = 0.0f;
    }
    attn_values(a, w, scores, ld, n_max, out, QB, NV, f16);
}

/* Any head_dim: the generic dot products and a masked tail. */
static inline void attn_head_any(const pd_attn_args_t *a, const attn_walk_t *w,
                                 const float *q, int64_t n, float *scores, float *out,
                                 int f16)
{
    int hd = a->head_dim;
    for (int64_t p = 0; p < n; p++) {
        const uint8_t *r = w->k_cache +
                           (size_t)a->block_table[p / a->block_size] * w->block_bytes +
                           (size_t)(p % a->block_size) * w->row_bytes + w->head_off;
        float s = f16 ? simd_dot_h(q, (const uint16_t *)r, hd)
                      : simd_dot(q, (const float *)r, hd);
        scores[p] = s * a->scale;
    }
    simd_softmax(scores, n);
    size_t es = f16 ? 2 : 4;
    for (int i = 0; i < hd; i += VW) {
        int64_t m = pd_cpu_min64(VW, hd - i);
        vf acc = vzero();
        for (int64_t p = 0; p < n; p++) {
            const uint8_t *r =
                w->v_cache + (size_t)a->block_table[p / a->block_size] * w->block_bytes +
                (size_t)(p % a->block_size) * w->row_bytes + w->head_off + (size_t)i * es;
            vf v = f16 ? vloadn_h((const uint16_t *)r, m) : vloadn((const float *)r, m);
            acc = vfma(vset1(scores[p]), v, acc);
        }
        vstoren(out + i, acc, m);
    }
}

/* One kv-type specialisation: blocks of up to QB queries (QB * NV <= 16). */
static inline __attribute__((always_inline)) void
attn_queries(const pd_attn_args_t *a, const attn_walk_t *w, int h, int64_t t0, int nq,
             float *scores, const int NV, const int f16)
{
    const int QB = NV <= 4 ? 4 : 2;
    for (int done = 0; done < nq;) {
        int b = nq - done < QB ? nq - done : QB;
        switch (b) {
        case 1:
            attn_block(a, w, h, t0 + done, scores, 1, NV, f16);
            break;
        case 2:
            attn_block(a, w, h, t0 + done, scores, 2, NV, f16);
            break;
        case 3:
            attn_block(a, w, h, t0 + done, scores, 3, NV, f16);
            break;
        default:
            attn_block(a, w, h, t0 + done, scores, 4, NV, f16);
            break;
        }
        done += b;
    }
}

/* Queries t0 .. t0 + nq - 1 (nq <= 4) of head h; scores: 4 * (max pos + 17) floats. */
static inline void simd_attn_block(const pd_attn_args_t *a, int h, int64_t t0, int nq,
                                   float *scores)
{
    int hd = a->head_dim;
    int kvh = h / (a->n_heads / a->n_kv_heads);
    int f16 = a->kv_dtype == PD_DTYPE_F16;
    attn_walk_t w = attn_walk(a, kvh, f16 ? 2 : 4);
    if (hd % VW != 0 || hd > 8 * VW) {
        for (int qi = 0; qi < nq; qi++) {
            int64_t t = t0 + qi;
            attn_head_any(a, &w, a->q + (t * a->n_heads + h) * hd, (int64_t)a->pos[t] + 1,
                          scores, a->out + (t * a->n_heads + h) * hd, f16);
        }
        return;
    }
#define PD_ATTN_NV_(nv)                                                                  \
    case nv:                                                                             \
        if (f16)                                                                         \
            attn_queries(a, &w, h, t0, nq, scores, nv, 1);                               \
        else                                                                             \
            attn_queries(a, &w, h, t0, nq, scores, nv, 0);                               \
        return;
    switch (hd / VW) {
        PD_ATTN_NV_(1)
        PD_ATTN_NV_(2)
        PD_ATTN_NV_(3)
        PD_ATTN_NV_(4)
        PD_ATTN_NV_(5)
        PD_ATTN_NV_(6)
        PD_ATTN_NV_(7)
        PD_ATTN_NV_(8)
    }
#undef PD_ATTN_NV_
}

/* ---- attention, one query: flash-decoding over position chunks ----------------------
 */

/* Positions [p0, p1) of query 0 for every head, rows read in order (a sequential
 * stream through the paged cache). part: [n_heads][head_dim + 2] = the unnormalised
 * sum_p e^(s_p - m) v_p, then m = max s_p and l = sum_p e^(s_p - m).
 * scores: n_heads * (p1 - p0) floats. head_dim % VW == 0, <= 8 * VW. */
static inline __attribute__((always_inline)) void attn_chunk(const pd_attn_args_t *a,
                                                             int64_t p0, int64_t p1,
                                                             float *part, float *scores,
                                                             const int NV, const int f16)
{
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    const size_t es = f16 ? 2 : 4;
    const size_t row_bytes = (size_t)a->n_kv_heads * (size_t)hd * es;
    const size_t block_bytes = row_bytes * (size_t)a->block_size;
    const int64_t n = p1 - p0;
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *row = (const uint8_t *)a->k_cache +
                             (size_t)a->block_table[p / a->block_size] * block_bytes +
                             (size_t)(p % a->block_size) * row_bytes;
        for (size_t off = 0; off < row_bytes; off += 64)
            _mm_prefetch((const char *)row + 4 * row_bytes + off, _MM_HINT_T0);
        for (int h = 0; h < a->n_heads; h++) {
            const uint8_t *kr = row + (size_t)(h / group) * (size_t)hd * es;
            const float *q = a->q + (size_t)h * (size_t)hd;
            vf s0 = vzero();
#pragma GCC unroll 8
            for (int j = 0; j < NV; j++)
                s0 = vfma(vload(q + j * VW), kvload(kr, j, f16), s0);
            scores[h * n + (p - p0)] = vhsum(s0) * a->scale;
        }
    }
    for (int h = 0; h < a->n_heads; h++) {
        float *sc = scores + h * n, *ph = part + (size_t)h * (size_t)(hd + 2);
        vf mx = vset1(sc[0]);
        int64_t i = 0;
        for (; i + VW <= n; i += VW)
            mx = vmax(mx, vload(sc + i));
        float m = vhmax(mx);
        for (; i < n; i++)
            m = sc[i] > m ? sc[i] : m;
        vf mv = vset1(m), sum = vzero();
        i = 0;
        for (; i + VW <= n; i += VW) {
            vf e = vexp(vsub(vload(sc + i), mv));
            vstore(sc + i, e);
            sum = vadd(sum, e);
        }
        float l = vhsum(sum);
        for (; i < n; i++) {
            sc[i] = expf(sc[i] - m);
            l += sc[i];
        }
        memset(ph, 0, (size_t)hd * sizeof(float));
        ph[hd] = m;
        ph[hd + 1] = l;
    }
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *row = (const uint8_t *)a->v_cache +
                             (size_t)a->block_table[p / a->block_size] * block_bytes +
                             (size_t)(p % a->block_size) * row_bytes;
        for (size_t off = 0; off < row_bytes; off += 64)
            _mm_prefetch((const char *)row + 4 * row_bytes + off, _MM_HINT_T0);
        for (int h = 0; h < a->n_heads; h++) {
            const uint8_t *vr = row + (size_t)(h / group) * (size_t)hd * es;
            float *o = part + (size_t)h * (size_t)(hd + 2);
            vf e = vset1(scores[h * n + (p - p0)]);
#pragma GCC unroll 8
            for (int j = 0; j < NV; j++)
                vstore(o + j * VW, vfma(e, kvload(vr, j, f16), vload(o + j * VW)));
        }
    }
}

/* 0 when head_dim does not suit the vector kernels (the caller uses attn_block). */
static inline int simd_attn_chunk(const pd_attn_args_t *a, int64_t p0, int64_t p1,
                                  float *part, float *scores)
{
    int hd = a->head_dim, f16 = a->kv_dtype == PD_DTYPE_F16;
    if (hd % VW != 0 || hd > 8 * VW)
        return 0;
#define PD_CHUNK_NV_(nv)                                                                 \
    case nv:                                                                             \
        if (f16)                                                                         \
            attn_chunk(a, p0, p1, part, scores, nv, 1);                                  \
        else                                                                             \
            attn_chunk(a, p0, p1, part, scores, nv, 0);                                  \
        return 1;
    switch (hd / VW) {
        PD_CHUNK_NV_(1)
        PD_CHUNK_NV_(2)
        PD_CHUNK_NV_(3)
        PD_CHUNK_NV_(4)
        PD_CHUNK_NV_(5)
        PD_CHUNK_NV_(6)
        PD_CHUNK_NV_(7)
        PD_CHUNK_NV_(8)
    }
#undef PD_CHUNK_NV_
    return 0;
}

/* ---- matrix-vector: f32, f16, bf16 weights ---------------------------------------- */

/* Weights stream from DRAM once per token. One row at a time keeps the stream
 * strictly sequential (rows are contiguous), which the hardware prefetcher follows far
 * better than several interleaved row streams; on top of that the kernels prefetch
 * PD_MV_PREFETCH bytes ahead. */
#ifndef PD_MV_PREFETCH
#define PD_MV_PREFETCH 512
#endif
#define PD_MV_PREFETCH_HINT _MM_HINT_T0

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

/* y[t..t+TT)[o..o+R) for R weight rows and TT tokens: each weight vector is loaded once
 * and used for all TT tokens. */
static inline __attribute__((always_inline)) void mv_tile(const pd_cpu_mm_t *mm,
                                                          int64_t o, int64_t t,
                                                          const int R, const int TT,
                                                          const int dt)
{
    const int64_t K = mm->n_in;
    const uint8_t *w[8];
    const float *x[4];
    vf acc[8][4];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
        w[r] = mm->w + (size_t)(o + r) * mm->row_bytes;
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            acc[r][j] = vzero();
    }
#pragma GCC unroll 16
    for (int j = 0; j < TT; j++)
        x[j] = mm->x + (t + j) * K;
    const size_t es = dt == PD_CPU_DT_F32 ? 4 : 2;
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[4];
        if ((k * (int64_t)es) % 64 == 0)
#pragma GCC unroll 16
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)w[r] + PD_MV_PREFETCH + (size_t)k * es,
                             PD_MV_PREFETCH_HINT);
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            xv[j] = vload(x[j] + k);
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            vf wv = wload(w[r], k, dt);
#pragma GCC unroll 16
            for (int j = 0; j < TT; j++)
                acc[r][j] = vfma(wv, xv[j], acc[r][j]);
        }
    }
    if (k < K) {
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            vf wv = wloadn(w[r], k, K - k, dt);
#pragma GCC unroll 16
            for (int j = 0; j < TT; j++)
                acc[r][j] = vfma(wv, vloadn(x[j] + k, K - k), acc[r][j]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            mm->y[(t + j) * mm->n_out + o + r] = vhsum(acc[r][j]);
}

/* y[t][o] for one row and one token: four accumulators over k. */
static inline __attribute__((always_inline)) void mv_row(const pd_cpu_mm_t *mm, int64_t o,
                                                         int64_t t, const int dt)
{
    const int64_t K = mm->n_in;
    const uint8_t *w = mm->w + (size_t)o * mm->row_bytes;
    const float *x = mm->x + t * K;
    const size_t es = dt == PD_CPU_DT_F32 ? 4 : 2;
    vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t k = 0;
    for (; k + 4 * VW <= K; k += 4 * VW) {
        _mm_prefetch((const char *)w + PD_MV_PREFETCH + (size_t)k * es,
                     PD_MV_PREFETCH_HINT);
        if (4 * VW * es > 64)
            _mm_prefetch((const char *)w + PD_MV_PREFETCH + 64 + (size_t)k * es,
                         PD_MV_PREFETCH_HINT);
        if (4 * VW * es > 128) {
            _mm_prefetch((const char *)w + PD_MV_PREFETCH + 128 + (size_t)k * es,
                         PD_MV_PREFETCH_HINT);
            _mm_prefetch((const char *)w + PD_MV_PREFETCH + 192 + (size_t)k * es,
                         PD_MV_PREFETCH_HINT);
        }
        a0 = vfma(wload(w, k, dt), vload(x + k), a0);
        a1 = vfma(wload(w, k + VW, dt), vload(x + k + VW), a1);
        a2 = vfma(wload(w, k + 2 * VW, dt), vload(x + k + 2 * VW), a2);
        a3 = vfma(wload(w, k + 3 * VW, dt), vload(x + k + 3 * VW), a3);
    }
    for (; k + VW <= K; k += VW)
        a0 = vfma(wload(w, k, dt), vload(x + k), a0);
    if (k < K)
        a1 = vfma(wloadn(w, k, K - k, dt), vloadn(x + k, K - k), a1);
    mm->y[t * mm->n_out + o] = vhsum(vadd(vadd(a0, a1), vadd(a2, a3)));
}

/* One row at a time (a sequential weight stream), for up to 4 tokens per pass; the
 * row is re-read from L1 for further groups of tokens. */
static inline __attribute__((always_inline)) void
mv_float(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, const int dt)
{
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t t = 0; t < mm->T; t += 4) {
            switch (pd_cpu_min64(4, mm->T - t)) {
            case 1:
                mv_row(mm, o, t, dt);
                break;
            case 2:
                mv_tile(mm, o, t, 1, 2, dt);
                break;
            case 3:
                mv_tile(mm, o, t, 1, 3, dt);
                break;
            default:
                mv_tile(mm, o, t, 1, 4, dt);
                break;
            }
        }
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

/* ---- matrix-vector: Q8_0 / Q4_0 weights x Q8 activations -----------------------------
 */

static inline __m256i q4_unpack(const uint8_t *qs)
{
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i m = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b, m);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

/* 8 int32 partial sums of |w| * sign(x, w) = w * x over 32 bytes. */
static inline __m256i dot_i8(__m256i aw, __m256i w, __m256i x)
{
    __m256i sx = _mm256_sign_epi8(x, w);
#if defined(PD_SIMD_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void mvq_tile(const pd_cpu_mm_t *mm,
                                                           int64_t o, int64_t t,
                                                           const int R, const int TT,
                                                           const int dt)
{
    const int64_t K = mm->n_in, nb = K / PD_QK;
    const uint8_t *w[8];
    const int8_t *xq[4];
    const float *xd[4];
    __m256 acc[8][4];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
        w[r] = mm->w + (size_t)(o + r) * mm->row_bytes;
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            acc[r][j] = _mm256_setzero_ps();
    }
#pragma GCC unroll 16
    for (int j = 0; j < TT; j++) {
        xq[j] = mm->xq + (t + j) * K;
        xd[j] = mm->xd + (t + j) * nb;
    }
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv[4];
        if (b % 2 == 0)
#pragma GCC unroll 16
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)w[r] + PD_MV_PREFETCH + (size_t)b * bs,
                             PD_MV_PREFETCH_HINT);
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            xv[j] = _mm256_loadu_si256((const __m256i *)(xq[j] + b * PD_QK));
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w[r] + (size_t)b * bs;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            float dw = _cvtsh_ss(dh);
            __m256i wv = dt == PD_CPU_DT_Q8_0
                             ? _mm256_loadu_si256((const __m256i *)(blk + 2))
                             : q4_unpack(blk + 2);
            __m256i aw = _mm256_sign_epi8(wv, wv);
#pragma GCC unroll 16
            for (int j = 0; j < TT; j++) {
                __m256 p = _mm256_cvtepi32_ps(dot_i8(aw, wv, xv[j]));
                acc[r][j] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * xd[j][b]), acc[r][j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++)
#pragma GCC unroll 16
        for (int j = 0; j < TT; j++)
            mm->y[(t + j) * mm->n_out + o + r] = hsum256(acc[r][j]);
}

#if VW == 16
/* One token, two blocks per zmm: |w| and x negated where w < 0 (there is no 512-bit
 * vpsignb), one integer dot for both, each half scaled by its block's d_w * d_x. */
static inline __attribute__((always_inline)) __m512i
mvq_pair_dot(const uint8_t *b0, size_t bs, const int8_t *xq, const int dt)
{
    const uint8_t *b1 = b0 + bs;
    __m512i wv;
    if (dt == PD_CPU_DT_Q8_0)
        wv = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
            _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
    else
        wv = _mm512_inserti64x4(_mm512_castsi256_si512(q4_unpack(b0 + 2)),
                                q4_unpack(b1 + 2), 1);
    __m512i xv = _mm512_loadu_si512(xq);
    __m512i aw = _mm512_abs_epi8(wv);
    __m512i sx =
        _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
#if defined(PD_SIMD_VNNI)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), _mm512_set1_epi16(1));
#endif
}

/* The f32 scales d_w[b + i] * d_x[b + i] of four blocks. */
static inline __attribute__((always_inline)) __m128
mvq_scales4(const uint8_t *blk, size_t bs, const float *xd)
{
    uint16_t d[4];
    for (int i = 0; i < 4; i++)
        memcpy(&d[i], blk + (size_t)i * bs, 2);
    __m128i h = _mm_loadl_epi64((const __m128i *)d);
    return _mm_mul_ps(_mm_cvtph_ps(h), _mm_loadu_ps(xd));
}

/* sum_b (w_b . x_b) d_w d_x of one row as 16 partial sums. */
static inline __attribute__((always_inline)) __m512
mvq_row_acc(const uint8_t *w, const int8_t *xq, const float *xd, int64_t nb, const int dt)
{
    const size_t bs =
        dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    const __m512i lo = _mm512_set1_epi32(0), hi = _mm512_set1_epi32(1);
    const __m512i lo2 = _mm512_set1_epi32(2), hi2 = _mm512_set1_epi32(3);
    const __m512i idx01 = _mm512_mask_blend_epi32(0xff00, lo, hi);
    const __m512i idx23 = _mm512_mask_blend_epi32(0xff00, lo2, hi2);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t *blk = w + (size_t)b * bs;
        _mm_prefetch((const char *)blk + PD_MV_PREFETCH, PD_MV_PREFETCH_HINT);
        _mm_prefetch((const char *)blk + PD_MV_PREFETCH + 64, PD_MV_PREFETCH_HINT);
        if (4 * bs > 128)
            _mm_prefetch((const char *)blk + PD_MV_PREFETCH + 128, PD_MV_PREFETCH_HINT);
        __m512 s4 = _mm512_castps128_ps512(mvq_scales4(blk, bs, xd + b));
        __m512i p0 = mvq_pair_dot(blk, bs, xq + b * PD_QK, dt);
        __m512i p1 = mvq_pair_dot(blk + 2 * bs, bs, xq + (b + 2) * PD_QK, dt);
        a0 =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(idx01, s4), a0);
        a1 =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(idx23, s4), a1);
    }
    for (; b < nb; b++) { /* the last blocks: the 256-bit form */
        const uint8_t *blk = w + (size_t)b * bs;
        uint16_t dh;
        memcpy(&dh, blk, 2);
        __m256i wv = dt == PD_CPU_DT_Q8_0 ? _mm256_loadu_si256((const __m256i *)(blk + 2))
                                          : q4_unpack(blk + 2);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * PD_QK));
        __m256 p = _mm256_cvtepi32_ps(dot_i8(_mm256_sign_epi8(wv, wv), wv, xv));
        a1 = _mm512_fmadd_ps(
            _mm512_castps256_ps512(p) /* upper lanes unused: zeroed */,
            _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(_cvtsh_ss(dh) * xd[b])), a1);
    }
    return _mm512_add_ps(a0, a1);
}

/* Rows o0..o1 for one token: rows one after another (a sequential stream), reduced
 * four at a time. */
static inline __attribute__((always_inline)) void
mvq_rows(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, int64_t t, const int dt)
{
    const int64_t K = mm->n_in, nb = K / PD_QK;
    const int8_t *xq = mm->xq + t * K;
    const float *xd = mm->xd + t * nb;
    float *y = mm->y + t * mm->n_out;
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        __m512 r0 = mvq_row_acc(mm->w + (size_t)o * mm->row_bytes, xq, xd, nb, dt);
        __m512 r1 = mvq_row_acc(mm->w + (size_t)(o + 1) * mm->row_bytes, xq, xd, nb, dt);
        __m512 r2 = mvq_row_acc(mm->w + (size_t)(o + 2) * mm->row_bytes, xq, xd, nb, dt);
        __m512 r3 = mvq_row_acc(mm->w + (size_t)(o + 3) * mm->row_bytes, xq, xd, nb, dt);
        _mm_storeu_ps(y + o, vhsum4(r0, r1, r2, r3));
    }
    for (; o < o1; o++)
        y[o] = _mm512_reduce_add_ps(
            mvq_row_acc(mm->w + (size_t)o * mm->row_bytes, xq, xd, nb, dt));
}
#endif

static inline __attribute__((always_inline)) void
mv_quant(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, const int dt)
{
#if VW == 16
    if (mm->T == 1) {
        mvq_rows(mm, o0, o1, 0, dt);
        return;
    }
#endif
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t t = 0; t < mm->T; t += 4) {
            switch (pd_cpu_min64(4, mm->T - t)) {
            case 1:
                mvq_tile(mm, o, t, 1, 1, dt);
                break;
            case 2:
                mvq_tile(mm, o, t, 1, 2, dt);
                break;
            case 3:
                mvq_tile(mm, o, t, 1, 3, dt);
                break;
            default:
                mvq_tile(mm, o, t, 1, 4, dt);
                break;
            }
        }
    }
}

static inline void simd_mv_q8_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                void *scratch)
{
    (void)scratch;
    mv_quant(mm, o0, o1, PD_CPU_DT_Q8_0);
}

static inline void simd_mv_q4_0(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                                void *scratch)
{
    (void)scratch;
    mv_quant(mm, o0, o1, PD_CPU_DT_Q4_0);
}

#endif
