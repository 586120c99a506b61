/* scalar.c - the scalar reference kernels: plain C, the numerics of llama2.c.
 *
 * Design: every op is written the obvious way, with float accumulation in the natural
 * order (matmul: sum over i of w[i] * x[i] in order; rmsnorm, softmax, rope and silu
 * exactly as llama2.c's run.c writes them; attention as run.c's within each chunk of
 * PD_ATTN_CHUNK positions, whose partials dispatch.c folds). Weights of any dtype are
 * converted to f32 one row at a time with pd_dequantize_row(). The SIMD variants are
 * tested against these functions; they also run on any CPU, x86 or not.
 * Threading: pure functions over the rows they are given; scratch is per thread. */
#include <math.h>
#include <string.h>

#include "common/tensor.h"
#include "kernels/cpu/cpu_internal.h"

static float dot_f32(const float *a, const float *b, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* scratch: n_in floats for the converted weight row. */
static void mv_any(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, void *scratch)
{
    float *row = scratch; /* [n_in] */
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *w = mm->w + (size_t)o * mm->row_bytes;
        const float *wf = (const float *)w;
        if (mm->dtype != PD_DTYPE_F32) {
            pd_dequantize_row(mm->dtype, w, mm->n_in, row);
            wf = row;
        }
        for (int64_t t = 0; t < mm->T; t++)
            mm->y[t * mm->n_out + o] = dot_f32(wf, mm->x + t * mm->n_in, mm->n_in);
    }
}

static size_t mm_scratch(int dt, int64_t n_in, int gemm)
{
    (void)dt;
    (void)gemm;
    return (size_t)n_in * sizeof(float);
}

static void quantize_x(const float *x, int64_t n, int8_t *qs, float *d, int add128)
{
    for (int64_t b = 0; b < n / PD_QK; b++) {
        const float *xb = x + b * PD_QK;
        float amax = 0.0f;
        for (int j = 0; j < PD_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int j = 0; j < PD_QK; j++) {
            int q = (int)roundf(xb[j] * id);
            qs[b * PD_QK + j] = (int8_t)(add128 ? (uint8_t)(q + 128) : q);
        }
    }
}

static void rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps)
{
    float ss = 0.0f;
    for (int64_t j = 0; j < n; j++)
        ss += x[j] * x[j];
    ss /= (float)n;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int64_t j = 0; j < n; j++)
        out[j] = w[j] * (ss * x[j]);
}

static void softmax(float *x, int64_t n)
{
    float max = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int64_t i = 0; i < n; i++)
        x[i] /= sum;
}

static void silu_mul(float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float v = gate[i];
        v *= 1.0f / (1.0f + expf(-v));
        gate[i] = v * up[i];
    }
}

static void add(float *y, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += x[i];
}

/* Computes the rotation itself (the table cs is for the SIMD variants). */
static void rope(float *x, int n_heads, int head_dim, const float *cs, int32_t pos,
                 float theta)
{
    (void)cs;
    for (int i = 0; i < head_dim; i += 2) {
        float freq = 1.0f / powf(theta, (float)i / (float)head_dim);
        float val = (float)pos * freq;
        float fcr = cosf(val), fci = sinf(val);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (int64_t)h * head_dim + i;
            float v0 = v[0], v1 = v[1];
            v[0] = v0 * fcr - v1 * fci;
            v[1] = v0 * fci + v1 * fcr;
        }
    }
}

static void f32_to_f16(const float *src, uint16_t *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = pd_f32_to_fp16(src[i]);
}

/* One KV vector (kv head kvh of position p of query t's sequence) as f32 into buf, or
 * in place for F32. */
static const float *kv_vec(const pd_attn_args_t *a, const void *cache, int64_t t,
                           int64_t p, int kvh, float *buf)
{
    size_t es = a->kv_dtype == PD_DTYPE_F16 ? 2 : 4;
    int64_t row_elems = (int64_t)a->n_kv_heads * a->head_dim;
    int64_t row = (int64_t)pd_cpu_attn_table(a, t)[p / a->block_size] * a->block_size +
                  p % a->block_size;
    const uint8_t *r = (const uint8_t *)cache + (size_t)row * (size_t)row_elems * es +
                       (size_t)kvh * (size_t)a->head_dim * es;
    if (a->kv_dtype == PD_DTYPE_F32)
        return (const float *)r;
    pd_dequantize_row(PD_DTYPE_F16, r, a->head_dim, buf);
    return buf;
}

int pd_cpu_attn_chunk_any(const pd_attn_args_t *a, int64_t t, int64_t p0, int64_t p1,
                          float *part, float *scores)
{
    int hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    int64_t n = p1 - p0;
    float buf[512]; /* head_dim <= 512, checked by dispatch.c */
    for (int h = 0; h < a->n_heads; h++) {
        const float *q = a->q + (t * a->n_heads + h) * hd;
        float *sc = scores + h * n, *ph = part + (size_t)h * (size_t)(hd + 2);
        float m = -INFINITY, l = 0.0f;
        for (int64_t p = p0; p < p1; p++) {
            sc[p - p0] = dot_f32(q, kv_vec(a, a->k_cache, t, p, h / group, buf), hd) *
                         a->scale;
            m = sc[p - p0] > m ? sc[p - p0] : m;
        }
        memset(ph, 0, (size_t)hd * sizeof(float));
        for (int64_t p = p0; p < p1; p++) {
            float e = expf(sc[p - p0] - m);
            const float *v = kv_vec(a, a->v_cache, t, p, h / group, buf);
            for (int i = 0; i < hd; i++)
                ph[i] += e * v[i];
            l += e;
        }
        ph[hd] = m;
        ph[hd + 1] = l;
    }
    return 1;
}

const pd_cpu_isa_t pd_cpu_isa_scalar = {
    .name = "scalar",
    .mv = {mv_any, mv_any, mv_any, mv_any, mv_any},
    .mm_scratch = mm_scratch,
    .quantize_x = quantize_x,
    .rmsnorm = rmsnorm,
    .softmax = softmax,
    .silu_mul = silu_mul,
    .add = add,
    .rope = rope,
    .f32_to_f16 = f32_to_f16,
    .attn_chunk = pd_cpu_attn_chunk_any,
};
