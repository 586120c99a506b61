/* simd_ops.h - ISA-neutral bodies of the element-wise and attention kernels, compiled
 * once per ISA (the matmul kernels are in simd_matmul.h).
 *
 * Design: an ISA file includes simd_avx2.h or simd_avx512.h (VW lanes of vf and the
 * v*() operations), optionally defines PD_SIMD_VNNI, then includes this file and
 * simd_matmul.h and puts the functions into its pd_cpu_isa_t. Numerics follow the
 * scalar reference: the same formulas, with sums in VW-lane partial order and
 * multiply-adds fused where marked; element-wise products (rope, rmsnorm scaling)
 * round exactly as the reference.
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

static inline __attribute__((always_inline)) vf kvload(const uint8_t *r, int j,
                                                       const int f16)
{
    return f16 ? vload_h((const uint16_t *)r + j * VW) : vload((const float *)r + j * VW);
}

/* ---- attention: one query over one chunk of positions ---------------------------- */

/* Positions [p0, p1) of query t for every head, rows read in order (a sequential
 * stream through the paged cache). part: [n_heads][head_dim + 2] = the unnormalised
 * sum_p e^(s_p - m) v_p, then m = max s_p and l = sum_p e^(s_p - m).
 * scores: n_heads * (p1 - p0) floats. head_dim % VW == 0, <= 8 * VW. */
static inline __attribute__((always_inline)) void
attn_chunk(const pd_attn_args_t *a, int64_t t, int64_t p0, int64_t p1, float *part,
           float *scores, const int NV, const int f16)
{
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    const int32_t *table = pd_cpu_attn_table(a, t);
    const float *qt = a->q + t * a->n_heads * hd;
    const size_t es = f16 ? 2 : 4;
    const size_t row_bytes = (size_t)a->n_kv_heads * (size_t)hd * es;
    const size_t block_bytes = row_bytes * (size_t)a->block_size;
    const int64_t n = p1 - p0;
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *row = (const uint8_t *)a->k_cache +
                             (size_t)table[p / a->block_size] * block_bytes +
                             (size_t)(p % a->block_size) * row_bytes;
        for (size_t off = 0; off < row_bytes; off += 64)
            _mm_prefetch((const char *)row + 4 * row_bytes + off, _MM_HINT_T0);
        for (int h = 0; h < a->n_heads; h++) {
            const uint8_t *kr = row + (size_t)(h / group) * (size_t)hd * es;
            const float *q = qt + (size_t)h * (size_t)hd;
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
                             (size_t)table[p / a->block_size] * block_bytes +
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

/* 0 when head_dim does not suit the vector kernels (dispatch.c then uses
 * pd_cpu_attn_chunk_any). */
static inline int simd_attn_chunk(const pd_attn_args_t *a, int64_t t, int64_t p0,
                                  int64_t p1, float *part, float *scores)
{
    int hd = a->head_dim, f16 = a->kv_dtype == PD_DTYPE_F16;
    if (hd % VW != 0 || hd > 8 * VW)
        return 0;
#define PD_CHUNK_NV_(nv)                                                                 \
    case nv:                                                                             \
        if (f16)                                                                         \
            attn_chunk(a, t, p0, p1, part, scores, nv, 1);                               \
        else                                                                             \
            attn_chunk(a, t, p0, p1, part, scores, nv, 0);                               \
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

#endif
