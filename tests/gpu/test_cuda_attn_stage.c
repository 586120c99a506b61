/* test_cuda_attn_stage.c - the decode attention's VSTAGE variant against REGS, on a GPU.
 *
 * Built only with the CUDA backend and run by tests/gpu/run.sh (not by CTest: CI has
 * no GPU). pdc_attn_decode_variant promises that PDC_ATTN_DEC_VSTAGE (V rows staged in
 * shared memory with cp.async) gives the same bits as PDC_ATTN_DEC_REGS, and that the
 * shapes whose stage does not fit fall back to REGS. For F32 and F16 caches, head_dim
 * 32, 64, 128, 256 (VSTAGE or its fallback) and the odd 8 and 40, groups 1, 2, 3, 4,
 * 6, 8, 16 (2 kv heads), a batch of six queries whose contexts (1, 255, 256, 257, 1000,
 * 4100) cross the 256-position split boundaries, over shuffled physical blocks:
 *   - the whole output of VSTAGE equals REGS's, bit for bit (memcmp), both launches
 *     returning cudaSuccess with a clean cudaStreamSynchronize and cudaGetLastError;
 *   - the same for a q_idx subset of three queries (out pre-filled with a NaN pattern,
 *     so rows outside the subset must keep it), whose rows also equal the full batch's;
 *   - pdc_attn_decode gives PDC_ATTN_DEC_DEFAULT's bits;
 *   - VSTAGE really runs where its stage fits (pdc_attn_decode_vstage_runs), REGS
 *     elsewhere;
 *   - REGS within 1e-4 (of the query's largest |out|) of a double-precision host
 *     reference on the same cache values, so both variants cannot be wrong alike;
 * and an unknown variant returns cudaErrorInvalidValue. Scratch is filled with NaNs
 * before every launch, so a partial read before it is written shows.
 * Prints one line per failure and "test_cuda_attn_stage: N checks, F failures"; exit
 * status 1 on a failure or when there is no GPU. Single-threaded; every loop bounded. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/tensor.h"
#include "kernels/cuda/cuda_internal.h"
#include "kernels/ops.h"

#define BS     16 /* positions per block */
#define N_KV   2  /* kv heads of every shape; n_heads = group * N_KV */
#define NQ     6  /* queries of the batch, one sequence each */
#define NSUB   3  /* queries of the q_idx subset */
#define REL_OK 1e-4

/* Contexts of the batch's queries, in batch order (not sorted), and the subset. */
static const int32_t ctx_of[NQ] = {1000, 1, 4100, 256, 257, 255};
static const int32_t sub_idx[NSUB] = {4, 1, 3}; /* contexts 257, 1, 256 */
#define MAX_CTX     4100
#define SUB_MAX_CTX 257

static int n_checks, n_fail;
static uint64_t rng = 0x9e3779b97f4a7c15ull;

static void check(bool ok, const char *fmt, ...)
{
    n_checks++;
    if (ok)
        return;
    n_fail++;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

static float frand(void) /* uniform in [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / (1 << 23))) - 1.0f;
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        printf("FAIL out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static void *dev_alloc(size_t bytes)
{
    void *d = NULL;
    cudaError_t e = cudaMalloc(&d, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        printf("FAIL cudaMalloc %zu: %s\n", bytes, cudaGetErrorString(e));
        exit(1);
    }
    return d;
}

static void *dev_put(const void *h, size_t bytes)
{
    void *d = dev_alloc(bytes);
    cudaError_t e = cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        printf("FAIL cudaMemcpy to the device: %s\n", cudaGetErrorString(e));
        exit(1);
    }
    return d;
}

/* The paged caches of one (dtype, head_dim): NQ sequences, sequence s holding ctx_of[s]
 * positions in blocks taken from a shuffled permutation, so no sequence's blocks are in
 * order or adjacent. Host copies as floats (the values the kernel reads: F16 rounded)
 * for the reference. */
typedef struct cache_set {
    pd_dtype_t dt;
    int hd;
    int64_t n_blocks, bt_stride;
    int32_t *tables; /* [NQ][bt_stride] */
    float *kf, *vf;  /* [n_blocks * BS][N_KV][hd], as read */
    void *dk, *dv;   /* device caches of dt */
    int32_t *d_tables;
} cache_set_t;

static void cache_make(cache_set_t *c, pd_dtype_t dt, int hd)
{
    c->dt = dt;
    c->hd = hd;
    c->bt_stride = (MAX_CTX + BS - 1) / BS + 1;
    int64_t need = 0;
    for (int s = 0; s < NQ; s++)
        need += (ctx_of[s] + BS - 1) / BS;
    c->n_blocks = need + 7; /* some blocks nobody uses */
    int32_t *perm = xmalloc((size_t)c->n_blocks * sizeof *perm);
    for (int64_t i = 0; i < c->n_blocks; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = c->n_blocks - 1; i > 0; i--) {
        int64_t j = (int64_t)((frand() + 1.0f) * 0.5f * (float)(i + 1)) % (i + 1);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    c->tables = xmalloc((size_t)(NQ * c->bt_stride) * sizeof *c->tables);
    int64_t next = 0;
    for (int s = 0; s < NQ; s++)
        for (int64_t b = 0; b < c->bt_stride; b++) /* entries past the context: unread */
            c->tables[s * c->bt_stride + b] =
                b < (ctx_of[s] + BS - 1) / BS ? perm[next++] : perm[b % c->n_blocks];
    free(perm);
    const int64_t n = c->n_blocks * BS * N_KV * hd;
    const size_t es = dt == PD_DTYPE_F16 ? 2 : 4;
    c->kf = xmalloc((size_t)n * sizeof(float));
    c->vf = xmalloc((size_t)n * sizeof(float));
    void *kraw = xmalloc((size_t)n * es), *vraw = xmalloc((size_t)n * es);
    for (int64_t i = 0; i < n; i++) {
        float k = frand(), v = frand();
        if (dt == PD_DTYPE_F16) {
            uint16_t hk = pd_f32_to_fp16(k), hv = pd_f32_to_fp16(v);
            ((uint16_t *)kraw)[i] = hk;
            ((uint16_t *)vraw)[i] = hv;
            k = pd_fp16_to_f32(hk);
            v = pd_fp16_to_f32(hv);
        } else {
            ((float *)kraw)[i] = k;
            ((float *)vraw)[i] = v;
        }
        c->kf[i] = k;
        c->vf[i] = v;
    }
    c->dk = dev_put(kraw, (size_t)n * es); /* cudaMalloc: 256-byte aligned */
    c->dv = dev_put(vraw, (size_t)n * es);
    c->d_tables = dev_put(c->tables, (size_t)(NQ * c->bt_stride) * sizeof(int32_t));
    free(kraw);
    free(vraw);
}

static void cache_free(cache_set_t *c)
{
    cudaFree(c->dk);
    cudaFree(c->dv);
    cudaFree(c->d_tables);
    free(c->tables);
    free(c->kf);
    free(c->vf);
}

/* out of query t (every head) in double precision: softmax(q k^T * scale) V over
 * positions 0..pos[t] of sequence t, kv head h / G. */
static void reference(const cache_set_t *c, const float *q, int n_heads, int t,
                      float scale, double *w, float *out)
{
    const int hd = c->hd, G = n_heads / N_KV, n = ctx_of[t];
    for (int h = 0; h < n_heads; h++) {
        const float *qh = q + ((int64_t)t * n_heads + h) * hd;
        const int g = h / G;
        double m = -INFINITY, l = 0;
        for (int j = 0; j < n; j++) {
            const int64_t slot =
                (int64_t)c->tables[t * c->bt_stride + j / BS] * BS + j % BS;
            const float *k = c->kf + (slot * N_KV + g) * hd;
            double s = 0;
            for (int e = 0; e < hd; e++)
                s += (double)qh[e] * k[e];
            w[j] = s * scale;
            m = w[j] > m ? w[j] : m;
        }
        for (int j = 0; j < n; j++)
            l += w[j] = exp(w[j] - m);
        for (int e = 0; e < hd; e++) {
            double acc = 0;
            for (int j = 0; j < n; j++) {
                const int64_t slot =
                    (int64_t)c->tables[t * c->bt_stride + j / BS] * BS + j % BS;
                acc += w[j] * c->vf[(slot * N_KV + g) * hd + e];
            }
            out[((int64_t)t * n_heads + h) * hd + e] = (float)(acc / l);
        }
    }
}

/* One launch of a variant (variant < 0: pdc_attn_decode) into d_out, pre-filled with
 * the 0xff pattern (a NaN), with scratch full of NaNs; out copied back to host_out.
 * Returns whether the launch, the synchronisation and the last error were clean. */
static bool run_variant(const pd_attn_args_t *a, const int32_t *d_q_idx, int64_t n_q,
                        int64_t max_ctx, float *d_scratch, size_t scratch_bytes,
                        int variant, float *host_out, size_t out_bytes, const char *what)
{
    cudaMemset(a->out, 0xff, out_bytes);
    cudaMemset(d_scratch, 0xff, scratch_bytes);
    cudaError_t e = variant < 0 ? pdc_attn_decode(0, a, d_q_idx, n_q, max_ctx, d_scratch)
                                : pdc_attn_decode_variant(0, a, d_q_idx, n_q, max_ctx,
                                                          d_scratch, variant);
    check(e == cudaSuccess, "%s: launch: %s", what, cudaGetErrorString(e));
    cudaError_t es = cudaStreamSynchronize(0);
    check(es == cudaSuccess, "%s: cudaStreamSynchronize: %s", what,
          cudaGetErrorString(es));
    cudaError_t el = cudaGetLastError();
    check(el == cudaSuccess, "%s: cudaGetLastError: %s", what, cudaGetErrorString(el));
    memset(host_out, 0, out_bytes);
    cudaError_t ec = cudaMemcpy(host_out, a->out, out_bytes, cudaMemcpyDeviceToHost);
    check(ec == cudaSuccess, "%s: copy back: %s", what, cudaGetErrorString(ec));
    return e == cudaSuccess && es == cudaSuccess && el == cudaSuccess &&
           ec == cudaSuccess;
}

static bool all_ff(const float *x, int64_t n)
{
    const uint8_t *b = (const uint8_t *)x;
    for (int64_t i = 0; i < n * (int64_t)sizeof(float); i++)
        if (b[i] != 0xff)
            return false;
    return true;
}

/* The batch's attention over the cache set c: the NQ queries q (device memory), their
 * output in out, n_heads query heads over the set's N_KV. */
static pd_attn_args_t batch_args(const cache_set_t *c, const float *q, float *out,
                                 int n_heads, float scale, const int32_t *d_pos,
                                 const int32_t *d_seq)
{
    return (pd_attn_args_t){.q = q,
                            .out = out,
                            .T = NQ,
                            .pos = d_pos,
                            .seq = d_seq,
                            .k_cache = c->dk,
                            .v_cache = c->dv,
                            .kv_dtype = c->dt,
                            .block_tables = c->d_tables,
                            .n_seqs = NQ,
                            .bt_stride = c->bt_stride,
                            .block_size = BS,
                            .n_heads = n_heads,
                            .n_kv_heads = N_KV,
                            .head_dim = c->hd,
                            .scale = scale};
}

static void test_shape(const cache_set_t *c, int group, const int32_t *d_pos,
                       const int32_t *d_seq, const int32_t *d_sub)
{
    const int hd = c->hd, n_heads = group * N_KV;
    const char *dn = pd_dtype_name(c->dt);
    const int64_t per_q = (int64_t)n_heads * hd, qn = NQ * per_q;
    const size_t out_bytes = (size_t)qn * sizeof(float);
    float *q = xmalloc(out_bytes);
    for (int64_t i = 0; i < qn; i++)
        q[i] = 3.0f * frand(); /* scores spread over a few units: a peaked softmax */
    pd_attn_args_t a = batch_args(c, dev_put(q, out_bytes), dev_alloc(out_bytes), n_heads,
                                  1.0f / sqrtf((float)hd), d_pos, d_seq);
    const int64_t scratch_n = pdc_attn_decode_scratch(&a, NQ, MAX_CTX);
    const size_t scratch_bytes = (size_t)scratch_n * sizeof(float);
    float *d_scratch = dev_alloc(scratch_bytes);
    float *regs = xmalloc(out_bytes), *vst = xmalloc(out_bytes),
          *dflt = xmalloc(out_bytes);
    float *sregs = xmalloc(out_bytes), *svst = xmalloc(out_bytes);
    char what[128];

    /* VSTAGE must really run where its stage fits (every GPU this backend builds for,
     * sm_80 and up, gives a block the largest one), or the bit checks below would
     * compare REGS with itself */
    const int fits =
        (int64_t)PDC_ATTN_SPLIT * hd * (c->dt == PD_DTYPE_F16 ? 2 : 4) <= 64 * 1024;
    const int runs = pdc_attn_decode_vstage_runs(&a);
    check(runs == fits, "%s hd %d group %d: VSTAGE runs %d, expected %d", dn, hd, group,
          runs, fits);

    /* the whole batch */
    snprintf(what, sizeof what, "%s hd %d group %d batch REGS", dn, hd, group);
    bool ok = run_variant(&a, NULL, NQ, MAX_CTX, d_scratch, scratch_bytes,
                          PDC_ATTN_DEC_REGS, regs, out_bytes, what);
    snprintf(what, sizeof what, "%s hd %d group %d batch VSTAGE", dn, hd, group);
    ok &= run_variant(&a, NULL, NQ, MAX_CTX, d_scratch, scratch_bytes,
                      PDC_ATTN_DEC_VSTAGE, vst, out_bytes, what);
    check(ok && !memcmp(regs, vst, out_bytes), "%s hd %d group %d: VSTAGE != REGS (bits)",
          dn, hd, group);
    snprintf(what, sizeof what, "%s hd %d group %d batch default", dn, hd, group);
    ok = run_variant(&a, NULL, NQ, MAX_CTX, d_scratch, scratch_bytes, -1, dflt, out_bytes,
                     what);
    check(ok && !memcmp(dflt, PDC_ATTN_DEC_DEFAULT == PDC_ATTN_DEC_REGS ? regs : vst,
                        out_bytes),
          "%s hd %d group %d: pdc_attn_decode != PDC_ATTN_DEC_DEFAULT (bits)", dn, hd,
          group);

    /* the host reference, query by query (relative to the query's largest |out|) */
    float *ref = xmalloc(out_bytes);
    double *w = xmalloc((size_t)MAX_CTX * sizeof *w);
    for (int t = 0; t < NQ; t++) {
        reference(c, q, n_heads, t, a.scale, w, ref);
        double mx = 0, err = 0;
        for (int64_t i = t * per_q; i < (t + 1) * per_q; i++) {
            const double d = fabs((double)regs[i] - (double)ref[i]);
            mx = fabs((double)ref[i]) > mx ? fabs((double)ref[i]) : mx;
            if (!(d <= err)) /* NaN counts as infinite */
                err = isnan(d) ? INFINITY : d;
        }
        const double rel = mx > 0 ? err / mx : err;
        check(rel <= REL_OK, "%s hd %d group %d ctx %d: REGS against the reference: %.3g",
              dn, hd, group, ctx_of[t], rel);
    }
    free(w);
    free(ref);

    /* the q_idx subset */
    snprintf(what, sizeof what, "%s hd %d group %d subset REGS", dn, hd, group);
    ok = run_variant(&a, d_sub, NSUB, SUB_MAX_CTX, d_scratch, scratch_bytes,
                     PDC_ATTN_DEC_REGS, sregs, out_bytes, what);
    snprintf(what, sizeof what, "%s hd %d group %d subset VSTAGE", dn, hd, group);
    ok &= run_variant(&a, d_sub, NSUB, SUB_MAX_CTX, d_scratch, scratch_bytes,
                      PDC_ATTN_DEC_VSTAGE, svst, out_bytes, what);
    check(ok && !memcmp(sregs, svst, out_bytes),
          "%s hd %d group %d: q_idx subset VSTAGE != REGS (bits)", dn, hd, group);
    bool same_rows = true, others_kept = true;
    for (int t = 0; t < NQ; t++) {
        bool listed = false;
        for (int i = 0; i < NSUB; i++)
            listed |= sub_idx[i] == t;
        if (listed)
            same_rows &= !memcmp(svst + t * per_q, regs + t * per_q,
                                 (size_t)per_q * sizeof(float));
        else
            others_kept &= all_ff(svst + t * per_q, per_q);
    }
    check(same_rows, "%s hd %d group %d: q_idx subset rows != the full batch's (bits)",
          dn, hd, group);
    check(others_kept, "%s hd %d group %d: q_idx subset wrote rows outside it", dn, hd,
          group);

    cudaFree((void *)a.q);
    cudaFree(a.out);
    cudaFree(d_scratch);
    free(q);
    free(regs);
    free(vst);
    free(dflt);
    free(sregs);
    free(svst);
}

/* Unknown variants fail before anything runs, with or without queries. */
static void test_bad_variant(const cache_set_t *c, const int32_t *d_pos,
                             const int32_t *d_seq)
{
    const int hd = c->hd;
    const size_t out_bytes = (size_t)NQ * N_KV * hd * sizeof(float);
    float *zeros = calloc(1, out_bytes);
    if (!zeros) {
        printf("FAIL out of host memory\n");
        exit(1);
    }
    pd_attn_args_t a = batch_args(c, dev_put(zeros, out_bytes), dev_alloc(out_bytes),
                                  N_KV, 1.0f, d_pos, d_seq);
    float *d_scratch = dev_alloc((size_t)pdc_attn_decode_scratch(&a, NQ, MAX_CTX) * 4);
    const int bad[] = {2, -1, 1000};
    for (int i = 0; i < 3; i++) {
        cudaError_t e =
            pdc_attn_decode_variant(0, &a, NULL, NQ, MAX_CTX, d_scratch, bad[i]);
        check(e == cudaErrorInvalidValue, "variant %d: %s, not cudaErrorInvalidValue",
              bad[i], cudaGetErrorString(e));
        e = pdc_attn_decode_variant(0, &a, NULL, 0, MAX_CTX, d_scratch, bad[i]);
        check(e == cudaErrorInvalidValue,
              "variant %d with no queries: %s, not cudaErrorInvalidValue", bad[i],
              cudaGetErrorString(e));
    }
    cudaError_t es = cudaStreamSynchronize(0), el = cudaGetLastError();
    check(es == cudaSuccess && el == cudaSuccess, "after bad variants: %s / %s",
          cudaGetErrorString(es), cudaGetErrorString(el));
    cudaFree((void *)a.q);
    cudaFree(a.out);
    cudaFree(d_scratch);
    free(zeros);
}

int main(void)
{
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev <= 0) {
        printf("test_cuda_attn_stage: no CUDA device here (%s): this test needs a GPU\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 1;
    }
    int32_t pos[NQ], seq[NQ];
    for (int t = 0; t < NQ; t++) {
        pos[t] = ctx_of[t] - 1;
        seq[t] = t;
    }
    int32_t *d_pos = dev_put(pos, sizeof pos), *d_seq = dev_put(seq, sizeof seq);
    int32_t *d_sub = dev_put(sub_idx, sizeof sub_idx);
    /* head_dim 32..256 with every group; 8 and 40 (partial lanes, 16-byte units per
     * row not a power of two) with a few */
    const int hds[] = {32, 64, 128, 256, 8, 40};
    const int groups[] = {1, 2, 3, 4, 6, 8, 16};
    const int odd_groups[] = {1, 3, 16};
    const pd_dtype_t dts[] = {PD_DTYPE_F32, PD_DTYPE_F16};
    for (int di = 0; di < 2; di++)
        for (int hi = 0; hi < 6; hi++) {
            cache_set_t c;
            cache_make(&c, dts[di], hds[hi]);
            if (di == 0 && hi == 0)
                test_bad_variant(&c, d_pos, d_seq);
            const bool odd = hds[hi] < 32 || hds[hi] == 40;
            const int ng = odd ? 3 : 7;
            for (int gi = 0; gi < ng; gi++)
                test_shape(&c, odd ? odd_groups[gi] : groups[gi], d_pos, d_seq, d_sub);
            cache_free(&c);
        }
    cudaFree(d_pos);
    cudaFree(d_seq);
    cudaFree(d_sub);
    printf("test_cuda_attn_stage: %d checks, %d failures\n", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
