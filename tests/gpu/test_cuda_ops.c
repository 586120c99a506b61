/* test_cuda_ops.c - every op of the CUDA backend against a reference, on a GPU.
 *
 * Built only with the CUDA backend and run by tests/gpu/run.sh (not by CTest: CI has
 * no GPU). For each op: random inputs, the CUDA result against the CPU backend's
 * (scalar ISA) or an exact double reference, and the largest relative error, which
 * must stay under the op's stated bound:
 *   matmul (pdc_matvec: F32/F16/BF16/Q8_0/Q4_0 weights, F32 x) 2e-5 of max|y|, the
 *     cuBLAS path (F16/BF16 weights, more than 8 rows: x rounded to the weights'
 *     dtype) 4e-3 (F16) and 3e-2 (BF16) of max|y|; matmul_multi (pdc_matvec_multi)
 *     the same bits as matmul of each matrix alone;
 *   get_rows, kv_write, kv gather/scatter, argmax: exact;
 *   rmsnorm, softmax, silu_mul, add: 2e-6 of the row's max; rope 3e-5 (CUDA's
 *     powf/cosf/sinf differ from glibc's by an ulp or two, times angles up to ~4000);
 *   attention (decode splits and prefill tiles, F32 and F16 caches, grouped-query,
 *     shuffled block tables): 2e-5 of max|out|;
 *   top-p sampling: the drawn token lies in the nucleus, and matches a host draw by
 *     the same rule for at least 97% of rows (float sums in another order may move a
 *     boundary).
 * Prints one line per case and "N checks, M failures"; exit status 1 on a failure. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/tensor.h"
#include "kernels/cuda/cuda_internal.h"
#include "kernels/ops.h"

static int n_checks, n_fail;
static uint64_t rng = 0x9e3779b97f4a7c15ull;

static void check(int ok, const char *what, double err, double bound)
{
    n_checks++;
    if (!ok)
        n_fail++;
    printf("%-4s %-58s err %.3g (bound %.3g)\n", ok ? "ok" : "FAIL", what, err, bound);
}

static float frand(void) /* uniform in [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / (1 << 23))) - 1.0f;
}

static float *rand_vec(int64_t n, float scale)
{
    float *v = malloc((size_t)n * sizeof *v);
    for (int64_t i = 0; i < n; i++)
        v[i] = frand() * scale;
    return v;
}

static void *dev_put(const void *h, size_t bytes)
{
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 1) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc %zu failed\n", bytes);
        exit(2);
    }
    if (h)
        cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    /* the backend's stream does not wait for the legacy one: finish the copy first */
    cudaDeviceSynchronize();
    return d;
}

static void h2d(void *d, const void *h, size_t bytes)
{
    cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
}

static void dev_get(void *h, const void *d, size_t bytes)
{
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess)
        e = cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        fprintf(stderr, "device error: %s\n", cudaGetErrorString(e));
        exit(2);
    }
}

static double max_abs(const float *a, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++)
        m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

static double rel_err(const float *got, const float *want, int64_t n)
{
    double m = max_abs(want, n), e = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= e)) /* NaN counts as infinite */
            e = isnan(d) ? INFINITY : d;
    }
    return m > 0 ? e / m : e;
}

/* ---- weights ---- */

static void make_weight(pd_dtype_t dt, int64_t n_out, int64_t n_in, pd_tensor_t *t,
                        float **deq)
{
    float *src = rand_vec(n_out * n_in, 1.0f);
    size_t rb = 0;
    pd_dtype_row_bytes(dt, n_in, &rb);
    uint8_t *data = malloc(rb * (size_t)n_out);
    *deq = malloc((size_t)(n_out * n_in) * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        const float *s = src + o * n_in;
        uint8_t *d = data + (size_t)o * rb;
        for (int64_t i = 0; i < n_in; i++) {
            if (dt == PD_DTYPE_F32)
                memcpy(d + 4 * i, &s[i], 4);
            else if (dt == PD_DTYPE_F16) {
                uint16_t h = pd_f32_to_fp16(s[i]);
                memcpy(d + 2 * i, &h, 2);
            } else if (dt == PD_DTYPE_BF16) {
                uint16_t h = pd_f32_to_bf16(s[i]);
                memcpy(d + 2 * i, &h, 2);
            }
        }
        if (dt == PD_DTYPE_Q8_0)
            pd_quantize_q8_0(s, n_in, (pd_block_q8_0_t *)d);
        if (dt == PD_DTYPE_Q4_0)
            pd_quantize_q4_0(s, n_in, (pd_block_q4_0_t *)d);
        pd_dequantize_row(dt, d, n_in, *deq + o * n_in);
    }
    free(src);
    *t = (pd_tensor_t){.dtype = dt,
                       .n_dims = 2,
                       .ne = {n_in, n_out, 1, 1},
                       .data = data,
                       .nbytes = rb * (size_t)n_out};
}

static void test_matmul(pd_kernels_t *k)
{
    const pd_dtype_t dts[] = {PD_DTYPE_F32, PD_DTYPE_F16, PD_DTYPE_BF16, PD_DTYPE_Q8_0,
                              PD_DTYPE_Q4_0};
    const int64_t shapes[][2] = {{384, 512}, {100, 96}, {1000, 2048}};
    const int64_t Ts[] = {1, 3, 8, 9, 64};
    for (size_t di = 0; di < 5; di++)
        for (size_t si = 0; si < 3; si++) {
            pd_dtype_t dt = dts[di];
            int64_t n_out = shapes[si][0], n_in = shapes[si][1];
            if ((dt == PD_DTYPE_Q8_0 || dt == PD_DTYPE_Q4_0) && n_in % 32)
                continue;
            pd_tensor_t w, dw;
            float *deq;
            make_weight(dt, n_out, n_in, &w, &deq);
            if (k->upload_tensor(k, &w, &dw) != PD_OK) {
                check(0, "upload_tensor", 0, 0);
                continue;
            }
            for (size_t ti = 0; ti < 5; ti++) {
                int64_t T = Ts[ti];
                float *x = rand_vec(T * n_in, 1.0f), *y = malloc(T * n_out * 4);
                float *ref = malloc(T * n_out * 4);
                for (int64_t t = 0; t < T; t++)
                    for (int64_t o = 0; o < n_out; o++) {
                        double s = 0;
                        for (int64_t i = 0; i < n_in; i++)
                            s += (double)deq[o * n_in + i] * x[t * n_in + i];
                        ref[t * n_out + o] = (float)s;
                    }
                float *dx = dev_put(x, T * n_in * 4), *dy = dev_put(NULL, T * n_out * 4);
                k->matmul(k, &dw, dx, T, dy);
                dev_get(y, dy, T * n_out * 4);
                bool half = dt == PD_DTYPE_F16 || dt == PD_DTYPE_BF16;
                double bound = !half || T <= 8 ? 2e-5 : dt == PD_DTYPE_F16 ? 4e-3 : 3e-2;
                char what[96];
                snprintf(what, sizeof what, "matmul %s %lldx%lld T=%lld",
                         pd_dtype_name(dt), (long long)n_out, (long long)n_in,
                         (long long)T);
                double e = rel_err(y, ref, T * n_out);
                check(e <= bound, what, e, bound);
                /* batch invariance of the matvec path: row 0 alone equals row 0 here */
                if (!half || T <= 8) {
                    float *y1 = malloc(n_out * 4);
                    k->matmul(k, &dw, dx, 1, dy);
                    dev_get(y1, dy, n_out * 4);
                    snprintf(what, sizeof what, "matmul %s T=%lld row 0 == T=1 (bits)",
                             pd_dtype_name(dt), (long long)T);
                    check(!memcmp(y1, y, n_out * 4), what, 0, 0);
                    free(y1);
                }
                cudaFree(dx);
                cudaFree(dy);
                free(x);
                free(y);
                free(ref);
            }
            /* get_rows of the same tensor: exact */
            int32_t ids[5] = {0, 3, (int32_t)n_out - 1, 7, 3};
            int32_t *dids = dev_put(ids, sizeof ids);
            float *dout = dev_put(NULL, 5 * n_in * 4), *out = malloc(5 * n_in * 4);
            k->get_rows(k, &dw, dids, 5, dout);
            dev_get(out, dout, 5 * n_in * 4);
            int same = 1;
            for (int r = 0; r < 5; r++)
                same &= !memcmp(out + r * n_in, deq + (int64_t)ids[r] * n_in, n_in * 4);
            char what[96];
            snprintf(what, sizeof what, "get_rows %s (exact)", pd_dtype_name(dt));
            check(same, what, 0, 0);
            cudaFree(dids);
            cudaFree(dout);
            free(out);
            k->free(k, (void *)dw.data);
            free((void *)w.data);
            free(deq);
        }
}

/* matmul_multi (pdc_matvec_multi for matvec sizes): each output the same bits as a
 * matmul of its matrix alone, for matrices of different heights sharing one launch,
 * a matrix whose rows are not 16-byte aligned beside aligned ones (the launch splits:
 * the two paths sum in different orders), and GEMM sizes. */
static void test_matmul_multi(pd_kernels_t *k)
{
    const pd_dtype_t dts[] = {PD_DTYPE_F32, PD_DTYPE_F16, PD_DTYPE_BF16, PD_DTYPE_Q8_0,
                              PD_DTYPE_Q4_0};
    /* heights of up to four matrices (0: fewer), the input width. Rows of 98 floats
     * (392 bytes) or halves (196), and of 96 quantized elements (102 or 54 bytes), are
     * not multiples of 16 bytes: several matrices in one launch on the scalar path */
    const int64_t sets[][5] = {{2048, 512, 512, 0, 2048}, {100, 8, 257, 3, 512},
                               {384, 0, 0, 0, 96},        {40, 1000, 0, 0, 1024},
                               {100, 40, 3, 0, 98},       {64, 30, 7, 0, 96}};
    const int64_t Ts[] = {1, 2, 5, 8, 9};
    for (size_t di = 0; di < 5; di++)
        for (size_t si = 0; si < sizeof sets / sizeof *sets; si++)
            for (int shift = 0; shift < 2; shift++) {
                pd_dtype_t dt = dts[di];
                int64_t n_in = sets[si][4];
                bool quant = dt == PD_DTYPE_Q8_0 || dt == PD_DTYPE_Q4_0;
                if (quant && n_in % 32)
                    continue;
                /* shift: matrix 1 placed one element past an aligned address (2 bytes
                 * for halves, 4 for floats; not for quantized rows, whose 2-byte block
                 * scales it would misalign) */
                if (shift && (quant || !sets[si][1]))
                    continue;
                int n = 0;
                pd_tensor_t w[4], dw[4];
                void *base[4] = {NULL};
                float *deq[4];
                int ok = 1;
                for (; n < 4 && sets[si][n]; n++) {
                    make_weight(dt, sets[si][n], n_in, &w[n], &deq[n]);
                    size_t off = shift && n == 1 ? (dt == PD_DTYPE_F32 ? 4 : 2) : 0;
                    base[n] = k->alloc(k, w[n].nbytes + 16);
                    dw[n] = w[n];
                    dw[n].data = (uint8_t *)base[n] + off;
                    ok &= base[n] && k->to_device(k, (void *)dw[n].data, w[n].data,
                                                  w[n].nbytes) == PD_OK;
                }
                if (!ok) {
                    check(0, "multi: upload", 0, 0);
                    n = 0; /* nothing below runs; the frees do */
                }
                for (size_t ti = 0; n && ti < 5; ti++) {
                    int64_t T = Ts[ti];
                    float *x = rand_vec(T * n_in, 1.0f), *dx = dev_put(x, T * n_in * 4);
                    float *dy[4], *dref[4];
                    const pd_tensor_t *wp[4];
                    for (int m = 0; m < n; m++) {
                        size_t bytes = (size_t)(T * dw[m].ne[1] * 4);
                        dy[m] = dev_put(NULL, bytes);
                        dref[m] = dev_put(NULL, bytes);
                        /* unlike fills, so an output neither call writes cannot
                         * match; synced before the backend's stream uses them */
                        cudaMemset(dy[m], 0xff, bytes);
                        cudaMemset(dref[m], 0, bytes);
                        cudaDeviceSynchronize();
                        wp[m] = &dw[m];
                        k->matmul(k, &dw[m], dx, T, dref[m]);
                    }
                    k->matmul_multi(k, wp, dy, n, dx, T);
                    int same = 1;
                    for (int m = 0; m < n; m++) {
                        size_t bytes = (size_t)(T * dw[m].ne[1] * 4);
                        float *a = malloc(bytes), *b = malloc(bytes);
                        dev_get(a, dy[m], bytes);
                        dev_get(b, dref[m], bytes);
                        same &= !memcmp(a, b, bytes);
                        if (m == 0 && T == 1) { /* and right, not just equal */
                            float *ref = malloc(bytes);
                            for (int64_t o = 0; o < dw[0].ne[1]; o++) {
                                double acc = 0;
                                for (int64_t i = 0; i < n_in; i++)
                                    acc += (double)deq[0][o * n_in + i] * x[i];
                                ref[o] = (float)acc;
                            }
                            double e = rel_err(a, ref, dw[0].ne[1]);
                            check(e <= 2e-5, "matmul_multi matrix 0 against double", e,
                                  2e-5);
                            free(ref);
                        }
                        free(a);
                        free(b);
                        cudaFree(dy[m]);
                        cudaFree(dref[m]);
                    }
                    char what[128];
                    snprintf(what, sizeof what,
                             "matmul_multi %s set %zu (%d matrices)%s T=%lld == matmul "
                             "(bits)",
                             pd_dtype_name(dt), si, n, shift ? " unaligned" : "",
                             (long long)T);
                    check(same, what, 0, 0);
                    cudaFree(dx);
                    free(x);
                }
                for (int m = 0; m < 4 && sets[si][m]; m++) {
                    k->free(k, base[m]);
                    free((void *)w[m].data);
                    free(deq[m]);
                }
            }

    /* pdc_matvec_multi directly: an empty matrix first, between the two others and
     * last, at T = 1 and 3; then bad arguments */
    pd_tensor_t w0, w2;
    float *q0, *q2;
    make_weight(PD_DTYPE_BF16, 64, 256, &w0, &q0);
    make_weight(PD_DTYPE_BF16, 96, 256, &w2, &q2);
    void *d0 = dev_put(w0.data, w0.nbytes), *d2 = dev_put(w2.data, w2.nbytes);
    float *x = rand_vec(3 * 256, 1.0f), *dx = dev_put(x, 3 * 256 * 4);
    float *dy0 = dev_put(NULL, 3 * 64 * 4), *dy2 = dev_put(NULL, 3 * 96 * 4);
    float *r0 = dev_put(NULL, 3 * 64 * 4), *r2 = dev_put(NULL, 3 * 96 * 4);
    float a[3 * 96], b[3 * 96];
    for (int place = 0; place < 3; place++)
        for (int64_t T = 1; T <= 3; T += 2) {
            /* matrices 0 and 2 in order, the empty one (no rows) at `place` */
            const void *wl[3];
            int64_t hl[3];
            float *yl[3];
            for (int m = 0, j = 0; m < 3; m++) {
                if (m == place) {
                    wl[m] = d2, hl[m] = 0, yl[m] = dy2;
                    continue;
                }
                wl[m] = j ? d2 : d0, hl[m] = j ? 96 : 64, yl[m] = j ? dy2 : dy0;
                j++;
            }
            /* unlike fills, fresh each round: an output left unwritten cannot match
             * the other call's, nor an earlier round's */
            cudaMemset(dy0, 0xff, 3 * 64 * 4);
            cudaMemset(dy2, 0xff, 3 * 96 * 4);
            cudaMemset(r0, 0, 3 * 64 * 4);
            cudaMemset(r2, 0, 3 * 96 * 4);
            cudaDeviceSynchronize();
            cudaError_t e1 =
                pdc_matvec_multi(0, PD_DTYPE_BF16, wl, hl, yl, 3, 256, dx, T);
            cudaError_t e2 = pdc_matvec(0, PD_DTYPE_BF16, d0, 256, 64, dx, T, r0);
            cudaError_t e3 = pdc_matvec(0, PD_DTYPE_BF16, d2, 256, 96, dx, T, r2);
            dev_get(a, dy0, (size_t)T * 64 * 4);
            dev_get(b, r0, (size_t)T * 64 * 4);
            int same = e1 == cudaSuccess && e2 == cudaSuccess && e3 == cudaSuccess &&
                       !memcmp(a, b, (size_t)T * 64 * 4);
            dev_get(a, dy2, (size_t)T * 96 * 4);
            dev_get(b, r2, (size_t)T * 96 * 4);
            same &= !memcmp(a, b, (size_t)T * 96 * 4);
            char what[96];
            snprintf(what, sizeof what,
                     "pdc_matvec_multi, an empty matrix at %d of 3, T=%lld (bits)", place,
                     (long long)T);
            check(same, what, 0, 0);
        }
    const void *ws[3] = {d0, d2, d2};
    int64_t n_outs[3] = {64, 0, 96};
    float *ys[3] = {dy0, dy2, dy2};
    n_outs[1] = -1;
    check(pdc_matvec_multi(0, PD_DTYPE_BF16, ws, n_outs, ys, 3, 256, dx, 1) ==
              cudaErrorInvalidValue,
          "pdc_matvec_multi refuses a negative height", 0, 0);
    n_outs[1] = 0;
    check(pdc_matvec_multi(0, PD_DTYPE_BF16, ws, n_outs, ys, 5, 256, dx, 1) ==
              cudaErrorInvalidValue,
          "pdc_matvec_multi refuses 5 matrices", 0, 0);
    check(pdc_matvec_multi(0, PD_DTYPE_Q8_0, ws, n_outs, ys, 2, 250, dx, 1) ==
              cudaErrorInvalidValue,
          "pdc_matvec_multi refuses Q8_0 rows of 250", 0, 0);
    check(pdc_matvec(0, PD_DTYPE_BF16, d0, 256, -1, dx, 1, dy0) == cudaErrorInvalidValue,
          "pdc_matvec refuses a negative height", 0, 0);
    check(pdc_matvec(0, PD_DTYPE_BF16, d0, 256, 0, dx, 1, dy0) == cudaSuccess,
          "pdc_matvec of an empty matrix does nothing", 0, 0);
    cudaFree(d0);
    cudaFree(d2);
    cudaFree(dx);
    cudaFree(dy0);
    cudaFree(dy2);
    cudaFree(r0);
    cudaFree(r2);
    free(x);
    free((void *)w0.data);
    free((void *)w2.data);
    free(q0);
    free(q2);
}

/* A recorded attention call that cannot run (no host copies of pos and seq) fails the
 * recording, so no graph is ever built without the pass's attention, and leaves the
 * backend working (it used to mark the backend failed and end the recording "fine"). */
static void test_graph_refusal(pd_kernels_t *k)
{
    if (!k->graph_begin || !k->graph_end) {
        check(0, "graph members present", 0, 0);
        return;
    }
    float *dq = dev_put(NULL, 64 * 4), *dout = dev_put(NULL, 64 * 4);
    pd_attn_args_t a = {.q = dq,
                        .out = dout,
                        .T = 1,
                        .n_heads = 1,
                        .n_kv_heads = 1,
                        .head_dim = 64,
                        .block_size = 16,
                        .n_seqs = 1,
                        .bt_stride = 1,
                        .kv_dtype = PD_DTYPE_F32,
                        .scale = 0.125f};
    check(k->graph_begin(k) == PD_OK, "graph_begin", 0, 0);
    k->attention(k, &a);
    void *g = NULL;
    pd_status_t st = k->graph_end(k, &g);
    check(st != PD_OK && g == NULL,
          "recording an attention without host pos/seq fails the recording", 0, 0);
    if (g)
        k->graph_destroy(k, g);
    check(k->sync(k) == PD_OK, "the backend works after the failed recording", 0, 0);
    cudaFree(dq);
    cudaFree(dout);
}

/* ---- element-wise ops against the CPU backend ---- */

static void test_elementwise(pd_kernels_t *k, pd_kernels_t *cpu)
{
    const int64_t T = 7, n = 768;
    float *x = rand_vec(T * n, 3.0f), *w = rand_vec(n, 1.0f);
    float *a = malloc(T * n * 4), *b = malloc(T * n * 4);
    float *dx = dev_put(x, T * n * 4), *dw = dev_put(w, n * 4),
          *dout = dev_put(NULL, T * n * 4);
    /* rmsnorm */
    k->rmsnorm(k, dout, dx, dw, T, n, 1e-5f);
    dev_get(a, dout, T * n * 4);
    cpu->rmsnorm(cpu, b, x, w, T, n, 1e-5f);
    double e = rel_err(a, b, T * n);
    check(e <= 2e-6, "rmsnorm", e, 2e-6);
    /* rope: positions up to 4000, 12 heads of 64 */
    int32_t pos[7] = {0, 1, 17, 255, 1024, 3999, 4095};
    int32_t *dpos = dev_put(pos, sizeof pos);
    h2d(dout, x, T * n * 4);
    memcpy(b, x, T * n * 4);
    k->rope(k, dout, dpos, T, 12, 64, 10000.0f);
    cpu->rope(cpu, b, pos, T, 12, 64, 10000.0f);
    dev_get(a, dout, T * n * 4);
    e = rel_err(a, b, T * n);
    /* CUDA's powf/cosf/sinf are within 2 ulp of glibc's (correctly rounded) ones; an
     * angle of pos * freq ~ 4000 carries that to ~1e-5 of the row's largest value */
    check(e <= 3e-5, "rope (12 heads of 64, positions to 4095)", e, 3e-5);
    /* softmax */
    h2d(dout, x, T * n * 4);
    memcpy(b, x, T * n * 4);
    k->softmax(k, dout, T, n);
    cpu->softmax(cpu, b, T, n);
    dev_get(a, dout, T * n * 4);
    e = rel_err(a, b, T * n);
    check(e <= 2e-6, "softmax", e, 2e-6);
    /* silu_mul and add */
    float *up = rand_vec(T * n, 2.0f), *dup = dev_put(up, T * n * 4);
    h2d(dout, x, T * n * 4);
    memcpy(b, x, T * n * 4);
    k->silu_mul(k, dout, dup, T * n);
    cpu->silu_mul(cpu, b, up, T * n);
    dev_get(a, dout, T * n * 4);
    e = rel_err(a, b, T * n);
    check(e <= 2e-6, "silu_mul", e, 2e-6);
    k->add(k, dout, dup, T * n);
    cpu->add(cpu, b, up, T * n);
    dev_get(a, dout, T * n * 4);
    e = rel_err(a, b, T * n);
    check(e <= 2e-6, "add", e, 2e-6);
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dout);
    cudaFree(dpos);
    cudaFree(dup);
    free(x);
    free(w);
    free(a);
    free(b);
    free(up);
}

/* ---- KV rows, attention ---- */

static void test_attention(pd_kernels_t *k, pd_kernels_t *cpu, pd_dtype_t kv_dt, int hd,
                           int n_heads, int n_kv)
{
    const int64_t bs = 16;
    /* sequences: contexts of decode queries, then one prompt run of 40 positions
     * and one of 300 (the tiled kernel), and a speculative run of 5 (decode kernel) */
    const int32_t ctx[] = {1, 17, 300, 1000, 4100};
    const int n_dec = 5;
    const int32_t run_start[] = {0, 700, 50}, run_len[] = {40, 300, 5};
    const int n_run = 3, n_seqs = n_dec + n_run;
    int64_t max_pos = 4100 + 64;
    int64_t bt_stride = (max_pos + bs - 1) / bs + 1;
    int64_t n_blocks = n_seqs * bt_stride;
    int64_t row = (int64_t)n_kv * hd;
    size_t es = kv_dt == PD_DTYPE_F16 ? 2 : 4;
    /* block tables: a shuffled permutation, so no sequence's blocks are in order */
    int32_t *tables = malloc(n_blocks * 4);
    for (int64_t i = 0; i < n_blocks; i++)
        tables[i] = (int32_t)i;
    for (int64_t i = n_blocks - 1; i > 0; i--) {
        int64_t j = (int64_t)((frand() + 1.0f) * 0.5f * (float)(i + 1)) % (i + 1);
        int32_t t = tables[i];
        tables[i] = tables[j];
        tables[j] = t;
    }
    /* the caches, written through kv_write on both backends from the same rows */
    int64_t n_rows = n_blocks * bs;
    float *krows = rand_vec(n_rows * row, 1.0f), *vrows = rand_vec(n_rows * row, 1.0f);
    int32_t *slots = malloc(n_rows * 4);
    for (int64_t i = 0; i < n_rows; i++)
        slots[i] = (int32_t)i;
    void *kc = calloc(n_rows * row, es), *vc = calloc(n_rows * row, es);
    cpu->kv_write(cpu, kc, kv_dt, row, slots, n_rows, krows);
    cpu->kv_write(cpu, vc, kv_dt, row, slots, n_rows, vrows);
    void *dkc = dev_put(NULL, n_rows * row * es), *dvc = dev_put(NULL, n_rows * row * es);
    int32_t *dslots = dev_put(slots, n_rows * 4);
    float *dk = dev_put(krows, n_rows * row * 4), *dv = dev_put(vrows, n_rows * row * 4);
    k->kv_write(k, dkc, kv_dt, row, dslots, n_rows, dk);
    k->kv_write(k, dvc, kv_dt, row, dslots, n_rows, dv);
    void *back = malloc(n_rows * row * es);
    dev_get(back, dkc, n_rows * row * es);
    char what[128];
    snprintf(what, sizeof what, "kv_write %s (exact)", pd_dtype_name(kv_dt));
    check(!memcmp(back, kc, n_rows * row * es), what, 0, 0);
    free(back);
    /* gather and scatter of rows */
    {
        int32_t gs[4] = {5, 0, (int32_t)n_rows - 1, 77};
        int32_t *dgs = dev_put(gs, sizeof gs);
        size_t rb = row * es;
        void *dg = dev_put(NULL, 4 * rb), *g = malloc(4 * rb);
        pdc_kv_gather(0, dkc, (int64_t)rb, dgs, 4, dg);
        dev_get(g, dg, 4 * rb);
        int ok = 1;
        for (int i = 0; i < 4; i++)
            ok &= !memcmp((uint8_t *)g + i * rb, (uint8_t *)kc + gs[i] * rb, rb);
        check(ok, "kv_gather (exact)", 0, 0);
        void *dcopy = dev_put(NULL, n_rows * rb), *copy = malloc(n_rows * rb);
        cudaMemset(dcopy, 0, n_rows * rb);
        cudaDeviceSynchronize();
        pdc_kv_scatter(0, dcopy, (int64_t)rb, dgs, 4, dg);
        dev_get(copy, dcopy, n_rows * rb);
        ok = 1;
        for (int i = 0; i < 4; i++)
            ok &= !memcmp((uint8_t *)copy + gs[i] * rb, (uint8_t *)kc + gs[i] * rb, rb);
        check(ok, "kv_scatter (exact)", 0, 0);
        cudaFree(dgs);
        cudaFree(dg);
        cudaFree(dcopy);
        free(g);
        free(copy);
    }
    /* the batch: decode queries, then the runs */
    int64_t T = n_dec;
    for (int r = 0; r < n_run; r++)
        T += run_len[r];
    int32_t *pos = malloc(T * 4), *seq = malloc(T * 4);
    int64_t t = 0;
    for (int s = 0; s < n_dec; s++, t++) {
        pos[t] = ctx[s] - 1;
        seq[t] = s;
    }
    for (int r = 0; r < n_run; r++)
        for (int i = 0; i < run_len[r]; i++, t++) {
            pos[t] = run_start[r] + i;
            seq[t] = n_dec + r;
        }
    int64_t qn = T * n_heads * hd;
    float *q = rand_vec(qn, 1.0f), *out = malloc(qn * 4), *ref = malloc(qn * 4);
    pd_attn_args_t a = {.q = q,
                        .out = ref,
                        .T = T,
                        .pos = pos,
                        .seq = seq,
                        .k_cache = kc,
                        .v_cache = vc,
                        .kv_dtype = kv_dt,
                        .block_tables = tables,
                        .n_seqs = n_seqs,
                        .bt_stride = bt_stride,
                        .block_size = bs,
                        .n_heads = n_heads,
                        .n_kv_heads = n_kv,
                        .head_dim = hd,
                        .scale = 1.0f / sqrtf((float)hd)};
    cpu->attention(cpu, &a);
    pd_attn_args_t d = a;
    d.q = dev_put(q, qn * 4);
    d.out = dev_put(NULL, qn * 4);
    d.pos = dev_put(pos, T * 4);
    d.seq = dev_put(seq, T * 4);
    d.k_cache = dkc;
    d.v_cache = dvc;
    d.block_tables = dev_put(tables, n_blocks * 4);
    d.pos_host = pos;
    d.seq_host = seq;
    k->attention(k, &d);
    dev_get(out, d.out, qn * 4);
    double e = rel_err(out, ref, qn);
    snprintf(what, sizeof what, "attention %s hd %d, %d/%d heads, ctx to 4100, runs",
             pd_dtype_name(kv_dt), hd, n_heads, n_kv);
    check(e <= 2e-5, what, e, 2e-5);
    /* batch invariance: the longest decode query alone gives the same bits */
    pd_attn_args_t one = d;
    one.T = 1;
    one.q = (float *)d.q + 4 * n_heads * hd;
    one.pos = (int32_t *)d.pos + 4;
    one.seq = (int32_t *)d.seq + 4;
    one.pos_host = pos + 4;
    one.seq_host = seq + 4;
    float *dout1 = dev_put(NULL, n_heads * hd * 4), *out1 = malloc(n_heads * hd * 4);
    one.out = dout1;
    k->attention(k, &one);
    dev_get(out1, dout1, n_heads * hd * 4);
    check(!memcmp(out1, out + 4 * n_heads * hd, n_heads * hd * 4),
          "attention: a decode query alone == in the batch (bits)", 0, 0);
    cudaFree(dout1);
    free(out1);
    cudaFree((void *)d.q);
    cudaFree(d.out);
    cudaFree((void *)d.pos);
    cudaFree((void *)d.seq);
    cudaFree((void *)d.block_tables);
    cudaFree(dkc);
    cudaFree(dvc);
    cudaFree(dslots);
    cudaFree(dk);
    cudaFree(dv);
    free(tables);
    free(krows);
    free(vrows);
    free(slots);
    free(kc);
    free(vc);
    free(pos);
    free(seq);
    free(q);
    free(out);
    free(ref);
}

/* ---- sampling ---- */

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void test_sampling(pd_kernels_t *k)
{
    const int64_t rows = 256, vocab = 32000;
    float *logits = rand_vec(rows * vocab, 4.0f);
    for (int64_t r = 0; r < rows; r++) { /* a clear winner in some rows */
        if (r % 3 == 0)
            logits[r * vocab + (r * 7919) % vocab] = 12.0f;
        if (r % 3 == 1) { /* 48 live tokens spread over the vocabulary: the top-p
                             kernel's candidate compaction, across all its warps */
            for (int64_t i = 0; i < vocab; i++)
                logits[r * vocab + i] = -30.0f;
            for (int j = 0; j < 48; j++)
                logits[r * vocab + (r * 7919 + j * 661) % vocab] = frand() * 2.0f;
        }
    }
    float *dl = dev_put(logits, rows * vocab * 4);
    int32_t *ids = malloc(rows * 4);
    int ok = k->argmax(k, dl, rows, vocab, ids) == PD_OK;
    for (int64_t r = 0; r < rows && ok; r++) {
        int32_t best = 0;
        for (int64_t i = 1; i < vocab; i++)
            if (logits[r * vocab + i] > logits[r * vocab + best])
                best = (int32_t)i;
        ok &= ids[r] == best;
    }
    check(ok, "argmax (exact)", 0, 0);
    /* top-p */
    float *temp = malloc(rows * 4), *top_p = malloc(rows * 4), *u = malloc(rows * 4);
    for (int64_t r = 0; r < rows; r++) {
        temp[r] = r % 4 == 0 ? 0.0f : 0.5f + (float)(r % 5) * 0.3f;
        top_p[r] = r % 7 == 0 ? 1.0f : 0.5f + (float)(r % 9) * 0.05f;
        u[r] = (frand() + 1.0f) * 0.5f * 0.999f;
    }
    float *dt = dev_put(temp, rows * 4), *dp = dev_put(top_p, rows * 4),
          *du = dev_put(u, rows * 4);
    int32_t *dids = dev_put(NULL, rows * 4);
    int32_t *got = malloc(rows * 4);
    if (pdc_sample_top_p(0, dl, rows, vocab, dt, dp, du, dids) != cudaSuccess)
        ok = 0;
    dev_get(got, dids, rows * 4);
    double *p = malloc(vocab * sizeof *p), *sorted = malloc(vocab * sizeof *sorted);
    int in_nucleus = 1, same = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *l = logits + r * vocab;
        int32_t want;
        if (temp[r] <= 0) {
            want = 0;
            for (int64_t i = 1; i < vocab; i++)
                if (l[i] > l[want])
                    want = (int32_t)i;
            in_nucleus &= got[r] == want;
        } else {
            double m = l[0], z = 0;
            for (int64_t i = 1; i < vocab; i++)
                m = l[i] > m ? l[i] : m;
            for (int64_t i = 0; i < vocab; i++)
                z += p[i] = exp(((double)l[i] - m) / temp[r]);
            for (int64_t i = 0; i < vocab; i++)
                sorted[i] = p[i] /= z;
            /* threshold: the smallest p among the largest ones holding top_p */
            double th = 0;
            if (top_p[r] < 1) {
                qsort(sorted, (size_t)vocab, sizeof *sorted, cmp_desc);
                double c = 0;
                for (int64_t i = 0; i < vocab; i++) {
                    c += sorted[i];
                    if (c >= top_p[r]) {
                        th = sorted[i];
                        break;
                    }
                }
            }
            double mass = 0;
            for (int64_t i = 0; i < vocab; i++)
                if (p[i] >= th)
                    mass += p[i];
            double target = u[r] * mass, c = 0;
            want = -1;
            for (int64_t i = 0; i < vocab; i++)
                if (p[i] >= th) {
                    c += p[i];
                    want = (int32_t)i;
                    if (c > target)
                        break;
                }
            in_nucleus &= got[r] >= 0 && got[r] < vocab && p[got[r]] >= th * (1 - 1e-5);
        }
        same += got[r] == want;
    }
    check(ok && in_nucleus, "top-p: every draw in its nucleus (greedy rows exact)", 0, 0);
    check(same >= rows * 97 / 100, "top-p: draws equal the host rule's",
          (double)(rows - same) / rows, 0.03);
    /* batch invariance: each row sampled alone draws the same token as in the batch
     * (its block's arithmetic does not depend on the other rows) */
    int alone_same = 1;
    for (int64_t r = 0; r < rows; r++) {
        int32_t one = -1;
        if (pdc_sample_top_p(0, dl + r * vocab, 1, vocab, dt + r, dp + r, du + r, dids) !=
            cudaSuccess)
            alone_same = 0;
        dev_get(&one, dids, 4);
        alone_same &= one == got[r];
    }
    check(alone_same, "top-p: a row sampled alone == in the batch (exact)", 0, 0);
    cudaFree(dl);
    cudaFree(dt);
    cudaFree(dp);
    cudaFree(du);
    cudaFree(dids);
    free(logits);
    free(ids);
    free(temp);
    free(top_p);
    free(u);
    free(got);
    free(p);
    free(sorted);
}

int main(void)
{
    pd_kernels_t *k = NULL, *cpu = NULL;
    if (pd_kernels_cuda_new(0, false, &k) != PD_OK ||
        pd_kernels_cpu_new(4, "scalar", &cpu) != PD_OK) {
        fprintf(stderr, "test_cuda_ops: no CUDA backend here\n");
        return 1;
    }
    test_matmul(k);
    test_matmul_multi(k);
    test_elementwise(k, cpu);
    test_attention(k, cpu, PD_DTYPE_F32, 64, 8, 2);
    test_attention(k, cpu, PD_DTYPE_F16, 128, 32, 8);
    test_attention(k, cpu, PD_DTYPE_F32, 128, 4, 4);
    test_attention(k, cpu, PD_DTYPE_F32, 8, 8, 4);   /* stories260K's heads */
    test_attention(k, cpu, PD_DTYPE_F16, 40, 16, 1); /* odd sizes, a group of 16 */
    test_sampling(k);
    test_graph_refusal(k);
    if (k->sync(k) != PD_OK) {
        n_checks++;
        n_fail++;
        printf("FAIL the device reported an error\n");
    }
    pd_kernels_destroy(&k);
    pd_kernels_destroy(&cpu);
    printf("%d checks, %d failures\n", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
