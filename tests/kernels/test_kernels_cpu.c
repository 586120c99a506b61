/* test_kernels_cpu.c - the CPU ops table against its scalar reference, and the scalar
 * reference against naive double-precision formulas.
 *
 * Every ISA this CPU supports is forced in turn (scalar, avx2, avx512, and avx512
 * without VNNI), with 1, 2 and 3 threads, over every weight dtype, odd sizes, T in
 * {1,2,3,5,7,16,33} (both the matrix-vector and the matrix-matrix paths), head_dim
 * 8/16/32/48/64/128, grouped-query heads, varlen batches of several sequences with
 * permuted block tables, and contexts that span several attention chunks; each
 * query's attention alone must give the same bits as in its batch.
 * Tolerances (relative errors, stated once here):
 *   matmul, float activations: 1e-5 of sum_i |w_i x_i| (f32 sums in another order);
 *   matmul, Q8_0/Q4_0 on SIMD ISAs, whose activations may be quantized to Q8 blocks:
 *     the rounding bound sum_b amax_b(x) / 254 * sum_{i in b} |w_i| (+ the f32 term);
 *   rmsnorm, softmax, silu, attention: 2e-6..1e-5 of the row's scale (vector exp);
 *   rope, add, get_rows, kv_write: bit-exact. */
#include <check.h>
#include <malloc.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "common/log.h"
#include "common/tensor.h"
#include "kernels/ops.h"

/* ---- helpers ---------------------------------------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;

static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static float *rand_vec(int64_t n, float scale)
{
    float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(v);
    for (int64_t i = 0; i < n; i++)
        v[i] = frand() * scale;
    return v;
}

typedef struct isa_case {
    const char *name;
    int supported;
} isa_case_t;

static int n_isas;
static isa_case_t isas[4];

static void detect_isas(void)
{
    int avx2 = 0, avx512 = 0, vnni = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    unsigned a, b, c, d; /* F16C from CPUID: clang 14 has no "f16c" builtin name */
    const int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
    vnni = avx512 && __builtin_cpu_supports("avx512vnni");
#endif
    (void)vnni;
    n_isas = 0;
    isas[n_isas++] = (isa_case_t){"scalar", 1};
    isas[n_isas++] = (isa_case_t){"avx2", avx2};
    isas[n_isas++] = (isa_case_t){"avx512", avx512};
    isas[n_isas++] = (isa_case_t){"avx512-novnni", avx512};
}

static pd_kernels_t *kernels(const char *isa, int n_threads)
{
    pd_kernels_t *k = NULL;
    ck_assert_int_eq(pd_kernels_cpu_new(n_threads, isa, &k), PD_OK);
    ck_assert_ptr_nonnull(k);
    ck_assert_int_eq(k->n_threads, n_threads);
    return k;
}

/* A weight matrix of dtype from random floats, and its exact f32 value. */
typedef struct weight {
    pd_tensor_t t;
    void *data;
    float *deq; /* [n_out][n_in] */
} weight_t;

static void weight_make(weight_t *w, pd_dtype_t dt, int64_t n_out, int64_t n_in)
{
    float *src = rand_vec(n_out * n_in, 1.0f);
    size_t rb;
    ck_assert_int_eq(pd_dtype_row_bytes(dt, n_in, &rb), PD_OK);
    w->data = malloc(rb * (size_t)n_out);
    w->deq = malloc((size_t)(n_out * n_in) * sizeof(float));
    ck_assert_ptr_nonnull(w->data);
    for (int64_t o = 0; o < n_out; o++) {
        const float *s = src + o * n_in;
        uint8_t *d = (uint8_t *)w->data + (size_t)o * rb;
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
        pd_dequantize_row(dt, d, n_in, w->deq + o * n_in);
    }
    free(src);
    w->t = (pd_tensor_t){.dtype = dt,
                         .n_dims = 2,
                         .ne = {n_in, n_out, 1, 1},
                         .data = w->data,
                         .nbytes = rb * (size_t)n_out};
}

static void weight_free(weight_t *w)
{
    free(w->data);
    free(w->deq);
}

static const pd_dtype_t all_dtypes[] = {PD_DTYPE_F32, PD_DTYPE_F16, PD_DTYPE_BF16,
                                        PD_DTYPE_Q8_0, PD_DTYPE_Q4_0};
static const int64_t Ts[] = {1, 2, 3, 5, 7, 16, 33};

static int is_quant(pd_dtype_t dt)
{
    return dt == PD_DTYPE_Q8_0 || dt == PD_DTYPE_Q4_0;
}

/* Naive double reference and the two error scales of the header comment. */
static void matmul_naive(const weight_t *w, const float *x, int64_t T, double *ref,
                         double *absum, double *qbound)
{
    int64_t n_in = w->t.ne[0], n_out = w->t.ne[1];
    for (int64_t t = 0; t < T; t++) {
        for (int64_t o = 0; o < n_out; o++) {
            const float *wr = w->deq + o * n_in;
            const float *xr = x + t * n_in;
            double s = 0, a = 0, q = 0;
            for (int64_t i = 0; i < n_in; i++) {
                s += (double)wr[i] * xr[i];
                a += fabs((double)wr[i] * xr[i]);
            }
            for (int64_t b = 0; b + 32 <= n_in; b += 32) {
                double amax = 0, wsum = 0;
                for (int j = 0; j < 32; j++) {
                    amax = fmax(amax, fabs(xr[b + j]));
                    wsum += fabs(wr[b + j]);
                }
                q += amax / 254.0 * wsum * 1.02;
            }
            ref[t * n_out + o] = s;
            absum[t * n_out + o] = a;
            qbound[t * n_out + o] = q;
        }
    }
}

/* ---- matmul ----------------------------------------------------------------------- */

typedef struct shape {
    int64_t n_out, n_in;
} shape_t;

static const shape_t float_shapes[] = {{5, 3},   {19, 37},  {41, 70},
                                       {67, 96}, {33, 161}, {300, 256}};
static const shape_t quant_shapes[] = {
    {1, 32}, {37, 64}, {67, 96}, {33, 160}, {300, 256}};

static void check_matmul_dtype(pd_kernels_t *ref_k, pd_kernels_t *k, pd_dtype_t dt,
                               int quant_x)
{
    const shape_t *shapes = is_quant(dt) ? quant_shapes : float_shapes;
    int n_shapes = is_quant(dt) ? 5 : 6;
    for (int si = 0; si < n_shapes; si++) {
        weight_t w;
        weight_make(&w, dt, shapes[si].n_out, shapes[si].n_in);
        int64_t n_in = shapes[si].n_in, n_out = shapes[si].n_out;
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            int64_t T = Ts[ti];
            float *x = rand_vec(T * n_in, 2.0f);
            float *y = rand_vec(T * n_out, 1.0f), *yr = rand_vec(T * n_out, 1.0f);
            double *ref = malloc((size_t)(T * n_out) * sizeof(double) * 3);
            double *absum = ref + T * n_out, *qb = absum + T * n_out;
            matmul_naive(&w, x, T, ref, absum, qb);
            ref_k->matmul(ref_k, &w.t, x, T, yr);
            k->matmul(k, &w.t, x, T, y);
            for (int64_t i = 0; i < T * n_out; i++) {
                double tol_f = 1e-5 * absum[i] + 1e-30;
                double tol = quant_x ? tol_f + qb[i] : tol_f;
                /* the scalar reference against exact arithmetic */
                ck_assert_msg(fabs(yr[i] - ref[i]) <= tol_f,
                              "scalar %s %lldx%lld T=%lld [%lld]: %g vs %g",
                              pd_dtype_name(dt), (long long)n_out, (long long)n_in,
                              (long long)T, (long long)i, yr[i], ref[i]);
                ck_assert_msg(fabs(y[i] - yr[i]) <= tol,
                              "%s/%d %s %lldx%lld T=%lld [%lld]: %.8g vs %.8g (tol %g)",
                              k->name, k->n_threads, pd_dtype_name(dt), (long long)n_out,
                              (long long)n_in, (long long)T, (long long)i, y[i], yr[i],
                              tol);
            }
            free(x);
            free(y);
            free(yr);
            free(ref);
        }
        weight_free(&w);
    }
}

START_TEST(test_matmul)
{
    int ii = _i / 3, n_threads = 1 + _i % 3;
    if (!isas[ii].supported) {
        pd_kernels_t *k = (pd_kernels_t *)0x1;
        ck_assert_int_eq(pd_kernels_cpu_new(n_threads, isas[ii].name, &k),
                         PD_ERR_UNSUPPORTED);
        ck_assert_ptr_eq(k, (pd_kernels_t *)0x1);
        return;
    }
    pd_kernels_t *ref_k = kernels("scalar", 1);
    pd_kernels_t *k = kernels(isas[ii].name, n_threads);
    int simd = strcmp(isas[ii].name, "scalar") != 0;
    for (size_t d = 0; d < sizeof all_dtypes / sizeof all_dtypes[0]; d++)
        check_matmul_dtype(ref_k, k, all_dtypes[d], simd && is_quant(all_dtypes[d]));
    pd_kernels_destroy(&k);
    ck_assert_ptr_null(k);
    pd_kernels_destroy(&ref_k);
}
END_TEST

/* Splitting work over threads must not change a single bit. */
START_TEST(test_matmul_thread_invariant)
{
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        pd_kernels_t *k1 = kernels(isas[ii].name, 1), *k3 = kernels(isas[ii].name, 3);
        for (size_t d = 0; d < sizeof all_dtypes / sizeof all_dtypes[0]; d++) {
            weight_t w;
            weight_make(&w, all_dtypes[d], 333, 512);
            for (int64_t T = 1; T <= 40; T += 13) {
                float *x = rand_vec(T * 512, 1.0f);
                float *a = calloc((size_t)(T * 333), 4),
                      *b = calloc((size_t)(T * 333), 4);
                k1->matmul(k1, &w.t, x, T, a);
                k3->matmul(k3, &w.t, x, T, b);
                ck_assert_msg(memcmp(a, b, (size_t)(T * 333) * 4) == 0, "%s %s T=%lld",
                              isas[ii].name, pd_dtype_name(all_dtypes[d]), (long long)T);
                free(x);
                free(a);
                free(b);
            }
            weight_free(&w);
        }
        pd_kernels_destroy(&k1);
        pd_kernels_destroy(&k3);
    }
}
END_TEST

/* matmul_multi is n matmul calls in one fan-out: bit-identical results, every ISA and
 * dtype, both the matrix-vector and the matrix-matrix paths. */
START_TEST(test_matmul_multi)
{
    const int64_t outs[3] = {333, 64, 96}, n_in = 512;
    const int64_t multi_Ts[] = {1, 14, 40, 70};
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        pd_kernels_t *k = kernels(isas[ii].name, 2);
        for (size_t d = 0; d < sizeof all_dtypes / sizeof all_dtypes[0]; d++) {
            weight_t w[3];
            const pd_tensor_t *ws[3];
            for (int m = 0; m < 3; m++) {
                weight_make(&w[m], all_dtypes[d], outs[m], n_in);
                ws[m] = &w[m].t;
            }
            for (size_t ti = 0; ti < sizeof multi_Ts / sizeof multi_Ts[0]; ti++) {
                int64_t T = multi_Ts[ti];
                float *x = rand_vec(T * n_in, 1.0f), *sep[3], *mul[3];
                for (int m = 0; m < 3; m++) {
                    sep[m] = calloc((size_t)(T * outs[m]), 4);
                    mul[m] = calloc((size_t)(T * outs[m]), 4);
                    k->matmul(k, ws[m], x, T, sep[m]);
                }
                k->matmul_multi(k, ws, mul, 3, x, T);
                for (int m = 0; m < 3; m++) {
                    ck_assert_msg(memcmp(sep[m], mul[m], (size_t)(T * outs[m]) * 4) == 0,
                                  "%s %s T=%lld matrix %d", isas[ii].name,
                                  pd_dtype_name(all_dtypes[d]), (long long)T, m);
                    free(sep[m]);
                    free(mul[m]);
                }
                free(x);
            }
            for (int m = 0; m < 3; m++)
                weight_free(&w[m]);
        }
        /* matrices of different widths are refused, outputs untouched */
        weight_t a, b;
        weight_make(&a, PD_DTYPE_F32, 16, 64);
        weight_make(&b, PD_DTYPE_F32, 16, 96);
        const pd_tensor_t *ab[2] = {&a.t, &b.t};
        float x[96] = {1}, ya[16] = {0}, yb[16] = {0}, *yab[2] = {ya, yb};
        pd_log_set_level(PD_LOG_LEVEL_OFF);
        k->matmul_multi(k, ab, yab, 2, x, 1);
        pd_log_set_level(PD_LOG_LEVEL_WARN);
        for (int i = 0; i < 16; i++)
            ck_assert(ya[i] == 0.0f && yb[i] == 0.0f);
        weight_free(&a);
        weight_free(&b);
        pd_kernels_destroy(&k);
    }
}
END_TEST

/* ---- get_rows, element-wise ops ---------------------------------------------------- */

START_TEST(test_get_rows)
{
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        pd_kernels_t *k = kernels(isas[ii].name, 2);
        for (size_t d = 0; d < sizeof all_dtypes / sizeof all_dtypes[0]; d++) {
            weight_t w;
            weight_make(&w, all_dtypes[d], 50, 64);
            int32_t ids[5] = {0, 49, 7, 7, 31};
            float out[5 * 64];
            k->get_rows(k, &w.t, ids, 5, out);
            for (int i = 0; i < 5; i++)
                ck_assert(memcmp(out + i * 64, w.deq + ids[i] * 64, 64 * 4) == 0);
            weight_free(&w);
        }
        pd_kernels_destroy(&k);
    }
}
END_TEST

static void assert_close(const float *a, const float *b, int64_t n, double rel,
                         const char *what)
{
    double scale = 0;
    for (int64_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(b[i]));
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(fabs(a[i] - b[i]) <= rel * scale + 1e-30, "%s [%lld]: %.9g vs %.9g",
                      what, (long long)i, a[i], b[i]);
}

static const int64_t elem_ns[] = {1, 7, 16, 33, 768, 32000, 70001};

START_TEST(test_elementwise)
{
    pd_kernels_t *ref = kernels("scalar", 1);
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        for (int nt = 1; nt <= 3; nt++) {
            pd_kernels_t *k = kernels(isas[ii].name, nt);
            for (size_t ni = 0; ni < sizeof elem_ns / sizeof elem_ns[0]; ni++) {
                int64_t n = elem_ns[ni], T = n > 1000 ? 2 : 3;
                float *x = rand_vec(T * n, 3.0f), *w = rand_vec(n, 1.0f);
                float *a = malloc((size_t)(T * n) * 4), *b = malloc((size_t)(T * n) * 4);
                /* rmsnorm, also against double, and in place */
                ref->rmsnorm(ref, b, x, w, T, n, 1e-5f);
                memcpy(a, x, (size_t)(T * n) * 4);
                k->rmsnorm(k, a, a, w, T, n, 1e-5f);
                /* both sum n squares in f32, in different orders */
                assert_close(a, b, T * n, 4e-6 + 1e-7 * sqrt((double)n), "rmsnorm");
                for (int64_t t = 0; t < T; t++) {
                    double ss = 0;
                    for (int64_t i = 0; i < n; i++)
                        ss += (double)x[t * n + i] * x[t * n + i];
                    double s = 1.0 / sqrt(ss / (double)n + 1e-5);
                    for (int64_t i = 0; i < n; i++)
                        ck_assert(fabs(b[t * n + i] - w[i] * s * x[t * n + i]) <=
                                  1e-5 * fabs(w[i] * s * x[t * n + i]) + 1e-6);
                }
                /* softmax */
                memcpy(a, x, (size_t)(T * n) * 4);
                memcpy(b, x, (size_t)(T * n) * 4);
                ref->softmax(ref, b, T, n);
                k->softmax(k, a, T, n);
                /* per element: vector exp (2 ulp) plus the reference's own f32 sum
                 * of n terms in order */
                for (int64_t i = 0; i < T * n; i++)
                    ck_assert_msg(fabs(a[i] - b[i]) <=
                                      (3e-6 + 2e-7 * sqrt((double)n)) * fabs(b[i]),
                                  "softmax n %lld [%lld]: %.9g vs %.9g", (long long)n,
                                  (long long)i, a[i], b[i]);
                double sum = 0;
                for (int64_t i = 0; i < n; i++)
                    sum += b[i];
                ck_assert(fabs(sum - 1.0) < 1e-4);
                /* silu_mul */
                memcpy(a, x, (size_t)(T * n) * 4);
                memcpy(b, x, (size_t)(T * n) * 4);
                ref->silu_mul(ref, b, w, n);
                k->silu_mul(k, a, w, n);
                assert_close(a, b, n, 2e-6, "silu_mul");
                for (int64_t i = 0; i < n; i++) {
                    double v = x[i], e = v / (1 + exp(-v)) * w[i];
                    ck_assert(fabs(b[i] - e) <= 1e-5 * fabs(e) + 1e-6);
                }
                /* add: exact */
                memcpy(a, x, (size_t)n * 4);
                k->add(k, a, w, n);
                for (int64_t i = 0; i < n; i++)
                    ck_assert(a[i] == x[i] + w[i]);
                free(x);
                free(w);
                free(a);
                free(b);
            }
            pd_kernels_destroy(&k);
        }
    }
    pd_kernels_destroy(&ref);
}
END_TEST

/* llama2.c's rope loop, verbatim in structure: the reference must match it exactly,
 * and every ISA must match the reference exactly. */
static void rope_llama2c(float *x, int pos, int n_heads, int head_size, float theta)
{
    for (int i = 0; i < n_heads * head_size; i += 2) {
        int head_dim = i % head_size;
        float freq = 1.0f / powf(theta, head_dim / (float)head_size);
        float val = pos * freq;
        float fcr = cosf(val), fci = sinf(val);
        float v0 = x[i], v1 = x[i + 1];
        x[i] = v0 * fcr - v1 * fci;
        x[i + 1] = v0 * fci + v1 * fcr;
    }
}

START_TEST(test_rope)
{
    static const int hds[] = {8, 64, 128, 6};
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        pd_kernels_t *k = kernels(isas[ii].name, 1 + ii % 3);
        for (int hi = 0; hi < 4; hi++) {
            int hd = hds[hi], nh = 3;
            int64_t T = 7;
            int32_t pos[7] = {0, 1, 2, 100, 5000, 3, 3};
            for (int rep = 0; rep < 2; rep++) { /* the second call reuses the table */
                float *x = rand_vec(T * nh * hd, 2.0f);
                float *e = malloc((size_t)(T * nh * hd) * 4);
                memcpy(e, x, (size_t)(T * nh * hd) * 4);
                for (int t = 0; t < T; t++)
                    rope_llama2c(e + t * nh * hd, pos[t], nh, hd, 10000.0f);
                k->rope(k, x, pos, T, nh, hd, 10000.0f);
                for (int64_t i = 0; i < T * nh * hd; i++)
                    ck_assert_msg(x[i] == e[i], "%s hd %d [%lld]: %.9g vs %.9g", k->name,
                                  hd, (long long)i, x[i], e[i]);
                free(x);
                free(e);
            }
        }
        pd_kernels_destroy(&k);
    }
}
END_TEST

/* ---- kv_write + attention ---------------------------------------------------------- */

typedef struct attn_case {
    int n_heads, n_kv_heads, head_dim;
    int64_t T, p0, block_size; /* queries at positions p0 .. p0 + T - 1 */
    pd_dtype_t kv;
    int shuffled; /* the queries in a scrambled order (their positions with them) */
} attn_case_t;

static const attn_case_t attn_cases[] = {
    {4, 2, 8, 1, 0, 4, PD_DTYPE_F32, 0},     {4, 2, 64, 5, 30, 16, PD_DTYPE_F32, 0},
    {4, 4, 128, 3, 70, 16, PD_DTYPE_F32, 0}, {6, 2, 64, 33, 0, 16, PD_DTYPE_F32, 0},
    {2, 1, 48, 2, 20, 3, PD_DTYPE_F32, 0},   {4, 2, 64, 7, 40, 8, PD_DTYPE_F16, 0},
    {4, 1, 8, 4, 10, 4, PD_DTYPE_F16, 0},    {12, 12, 64, 1, 300, 16, PD_DTYPE_F32, 0},
    {4, 2, 64, 9, 5, 16, PD_DTYPE_F32, 1},   {2, 2, 128, 7, 3, 4, PD_DTYPE_F16, 1},
    {4, 2, 32, 3, 125, 16, PD_DTYPE_F16, 0}, {2, 1, 8, 70, 60, 16, PD_DTYPE_F32, 0},
    {8, 8, 16, 1, 639, 32, PD_DTYPE_F32, 0},
};

static int64_t gcd64(int64_t a, int64_t b)
{
    while (b) {
        int64_t r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* A varlen batch of N_SEQS sequences of the case's shape, each with its own K/V and
 * its own block table into one shared pool of blocks (permuted), and the queries of
 * the sequences interleaved (query t belongs to sequence t % N_SEQS). */
#define N_SEQS 3

typedef struct attn_batch {
    int64_t n_pos, row, n_blocks, T; /* n_blocks per sequence; T all queries */
    size_t es;
    int32_t *tables;       /* [N_SEQS][n_blocks] */
    void *kc, *vc;         /* the pool: N_SEQS * n_blocks blocks */
    float *ks, *vs;        /* [N_SEQS][n_pos][row] what the cache holds, as f32 */
    int32_t *qpos, *qseq;  /* [T] */
    float *q;              /* [T][n_heads][head_dim] */
} attn_batch_t;

static void attn_batch_make(pd_kernels_t *k, const attn_case_t *c, attn_batch_t *b)
{
    b->n_pos = c->p0 + c->T;
    b->row = (int64_t)c->n_kv_heads * c->head_dim;
    b->n_blocks = (b->n_pos + c->block_size - 1) / c->block_size + 1;
    b->T = c->T * N_SEQS;
    b->es = c->kv == PD_DTYPE_F16 ? 2 : 4;
    int64_t pool = b->n_blocks * N_SEQS;
    b->tables = malloc((size_t)pool * 4);
    int64_t m = 5; /* i -> (i * m + 3) mod n is a permutation when gcd(m, n) = 1 */
    while (gcd64(m, pool) != 1)
        m++;
    for (int64_t i = 0; i < pool; i++)
        b->tables[i] = (int32_t)((i * m + 3) % pool);
    size_t cache_bytes = (size_t)(pool * c->block_size * b->row) * b->es;
    b->kc = calloc(1, cache_bytes);
    b->vc = calloc(1, cache_bytes);
    int64_t n_rows = N_SEQS * b->n_pos;
    b->ks = rand_vec(n_rows * b->row, 1.0f);
    b->vs = rand_vec(n_rows * b->row, 1.0f);
    int32_t *slots = malloc((size_t)n_rows * 4);
    for (int64_t s = 0; s < N_SEQS; s++)
        for (int64_t p = 0; p < b->n_pos; p++)
            slots[s * b->n_pos + p] =
                (int32_t)(b->tables[s * b->n_blocks + p / c->block_size] * c->block_size +
                          p % c->block_size);
    /* the contexts first, then the new tokens, as the engine writes them */
    for (int64_t s = 0; s < N_SEQS; s++) {
        int64_t r0 = s * b->n_pos;
        k->kv_write(k, b->kc, c->kv, b->row, slots + r0, c->p0, b->ks + r0 * b->row);
        k->kv_write(k, b->kc, c->kv, b->row, slots + r0 + c->p0, c->T,
                    b->ks + (r0 + c->p0) * b->row);
    }
    k->kv_write(k, b->vc, c->kv, b->row, slots, n_rows, b->vs);
    free(slots);
    if (c->kv == PD_DTYPE_F16) { /* what the cache holds */
        for (int64_t i = 0; i < n_rows * b->row; i++) {
            b->ks[i] = pd_fp16_to_f32(pd_f32_to_fp16(b->ks[i]));
            b->vs[i] = pd_fp16_to_f32(pd_f32_to_fp16(b->vs[i]));
        }
    }
    b->qpos = malloc((size_t)b->T * 4);
    b->qseq = malloc((size_t)b->T * 4);
    for (int64_t t = 0; t < b->T; t++) {
        int64_t i = t / N_SEQS;
        b->qseq[t] = (int32_t)(t % N_SEQS);
        b->qpos[t] = (int32_t)(c->p0 + (c->shuffled ? (i * 5 + 2) % c->T : i));
    }
    if (c->shuffled) /* (i * 5 + 2) mod T must be a permutation */
        ck_assert_int_eq(gcd64(5, c->T), 1);
    b->q = rand_vec(b->T * c->n_heads * c->head_dim, 1.0f);
}

static void attn_batch_free(attn_batch_t *b)
{
    free(b->tables);
    free(b->kc);
    free(b->vc);
    free(b->ks);
    free(b->vs);
    free(b->qpos);
    free(b->qseq);
    free(b->q);
}

static pd_attn_args_t attn_args(const attn_case_t *c, const attn_batch_t *b, float *out)
{
    return (pd_attn_args_t){.q = b->q,
                            .out = out,
                            .T = b->T,
                            .pos = b->qpos,
                            .seq = b->qseq,
                            .k_cache = b->kc,
                            .v_cache = b->vc,
                            .kv_dtype = c->kv,
                            .block_tables = b->tables,
                            .n_seqs = N_SEQS,
                            .bt_stride = b->n_blocks,
                            .block_size = c->block_size,
                            .n_heads = c->n_heads,
                            .n_kv_heads = c->n_kv_heads,
                            .head_dim = c->head_dim,
                            .scale = 1.0f / sqrtf((float)c->head_dim)};
}

/* Against a double-precision softmax(q K^T) V, the scalar reference, and itself: each
 * query run alone (T = 1) gives the same bits as inside the batch. */
static void check_attention(pd_kernels_t *k, pd_kernels_t *ref, const attn_case_t *c)
{
    attn_batch_t b;
    attn_batch_make(k, c, &b);
    int64_t hd = c->head_dim, row = b.row, qrow = c->n_heads * hd;
    float *out = rand_vec(b.T * qrow, 1.0f), *rout = rand_vec(b.T * qrow, 1.0f);
    float *one = rand_vec(qrow, 1.0f);
    pd_attn_args_t a = attn_args(c, &b, out);
    k->attention(k, &a);
    a.out = rout;
    ref->attention(ref, &a);
    double *sc = malloc((size_t)b.n_pos * sizeof(double));
    for (int64_t t = 0; t < b.T; t++) {
        const float *ks = b.ks + b.qseq[t] * b.n_pos * row;
        const float *vs = b.vs + b.qseq[t] * b.n_pos * row;
        for (int h = 0; h < c->n_heads; h++) {
            int kvh = h / (c->n_heads / c->n_kv_heads);
            int64_t np = (int64_t)b.qpos[t] + 1;
            const float *qv = b.q + (t * c->n_heads + h) * hd;
            double max = -1e300, sum = 0;
            for (int64_t p = 0; p < np; p++) {
                double s = 0;
                for (int64_t i = 0; i < hd; i++)
                    s += (double)qv[i] * ks[p * row + kvh * hd + i];
                sc[p] = s / sqrt((double)hd);
                max = fmax(max, sc[p]);
            }
            for (int64_t p = 0; p < np; p++)
                sum += (sc[p] = exp(sc[p] - max));
            for (int64_t i = 0; i < hd; i++) {
                double e = 0;
                for (int64_t p = 0; p < np; p++)
                    e += sc[p] / sum * vs[p * row + kvh * hd + i];
                int64_t at = (t * c->n_heads + h) * hd + i;
                ck_assert_msg(fabs(rout[at] - e) < 2e-5, "scalar attention %g vs %g",
                              rout[at], e);
                ck_assert_msg(fabs(out[at] - rout[at]) < 5e-6,
                              "%s/%d attention hd %d T %lld [%lld]: %g vs %g", k->name,
                              k->n_threads, c->head_dim, (long long)c->T, (long long)at,
                              out[at], rout[at]);
            }
        }
        /* query t alone: the same bits */
        pd_attn_args_t a1 = attn_args(c, &b, one);
        a1.q = b.q + t * qrow;
        a1.T = 1;
        a1.pos = b.qpos + t;
        a1.seq = b.qseq + t;
        k->attention(k, &a1);
        ck_assert_msg(memcmp(one, out + t * qrow, (size_t)qrow * sizeof(float)) == 0,
                      "%s/%d attention of query %lld (pos %d) alone differs from in the "
                      "batch of %lld",
                      k->name, k->n_threads, (long long)t, (int)b.qpos[t],
                      (long long)b.T);
    }
    free(sc);
    free(out);
    free(rout);
    free(one);
    attn_batch_free(&b);
}

START_TEST(test_attention)
{
    pd_kernels_t *ref = kernels("scalar", 1);
    for (int ii = 0; ii < n_isas; ii++) {
        if (!isas[ii].supported)
            continue;
        for (int nt = 1; nt <= 3; nt++) {
            pd_kernels_t *k = kernels(isas[ii].name, nt);
            for (size_t ci = 0; ci < sizeof attn_cases / sizeof attn_cases[0]; ci++)
                check_attention(k, ref, &attn_cases[ci]);
            pd_kernels_destroy(&k);
        }
    }
    pd_kernels_destroy(&ref);
}
END_TEST

/* kv_write lands rows in the slots named, converting exactly, and skips negative
 * ones. */
START_TEST(test_kv_write_layout)
{
    pd_kernels_t *k = kernels("auto", 2);
    float cache[3 * 4 * 6]; /* 3 blocks x 4 rows x 6 elements */
    uint16_t hcache[3 * 4 * 6];
    memset(cache, 0, sizeof cache);
    memset(hcache, 0, sizeof hcache);
    float src[3 * 6];
    for (int i = 0; i < 18; i++)
        src[i] = (float)i + 0.1f;
    int32_t slots[3] = {1, 4, -1}; /* block 0 row 1; block 1 row 0; skipped */
    k->kv_write(k, cache, PD_DTYPE_F32, 6, slots, 3, src);
    k->kv_write(k, hcache, PD_DTYPE_F16, 6, slots, 3, src);
    int written = 0;
    for (int i = 0; i < 3 * 4 * 6; i++)
        written += cache[i] != 0.0f;
    ck_assert_int_eq(written, 12);
    for (int i = 0; i < 6; i++) {
        ck_assert(cache[(0 * 4 + 1) * 6 + i] == src[i]);
        ck_assert(cache[(1 * 4 + 0) * 6 + i] == src[6 + i]);
        ck_assert_int_eq(hcache[(0 * 4 + 1) * 6 + i], pd_f32_to_fp16(src[i]));
        ck_assert_int_eq(hcache[(1 * 4 + 0) * 6 + i], pd_f32_to_fp16(src[6 + i]));
    }
    pd_kernels_destroy(&k);
}
END_TEST

/* ---- construction, steady-state allocation ---------------------------------------- */

START_TEST(test_new_bad_args)
{
    pd_kernels_t *k = (pd_kernels_t *)0x1;
    ck_assert_int_eq(pd_kernels_cpu_new(1, "bogus", &k), PD_ERR_INVALID);
    ck_assert_ptr_eq(k, (pd_kernels_t *)0x1);
    ck_assert_int_eq(pd_kernels_cpu_new(1, NULL, NULL), PD_ERR_INVALID);
    pd_kernels_destroy(NULL);
    k = NULL;
    pd_kernels_destroy(&k);
    k = kernels("auto", 2);
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        ck_assert_str_eq(k->name, "avx512");
#endif
    pd_kernels_destroy(&k);
    ck_assert_int_eq(pd_kernels_cpu_new(0, "scalar", &k), PD_OK); /* one per CPU */
    ck_assert_int_ge(k->n_threads, 1);
    pd_kernels_destroy(&k);
}
END_TEST

static size_t heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

/* After one warm-up step, a decode-like sequence of ops allocates nothing. */
START_TEST(test_no_alloc_steady_state)
{
    pd_kernels_t *k = kernels("auto", 2);
    weight_t w8, w32;
    weight_make(&w8, PD_DTYPE_Q8_0, 256, 256);
    weight_make(&w32, PD_DTYPE_F32, 256, 256);
    float *x = rand_vec(64 * 256, 1.0f), *y = rand_vec(64 * 256, 1.0f);
    float *wn = rand_vec(256, 1.0f);
    int32_t table[8] = {3, 1, 0, 2, 7, 6, 5, 4}, zero = 0;
    float *kc = calloc(8 * 16 * 64, 4), *vc = calloc(8 * 16 * 64, 4);
    float *q = rand_vec(4 * 64, 1.0f), *o = rand_vec(4 * 64, 1.0f);
    size_t before = 0;
    for (int step = 0; step < 40; step++) {
        int32_t pos = step;
        int64_t T = step == 0 ? 64 : 1; /* a prompt, then tokens */
        int32_t ps[64];
        for (int i = 0; i < 64; i++)
            ps[i] = i;
        k->rmsnorm(k, y, x, wn, T, 256, 1e-5f);
        k->matmul(k, &w8.t, x, T, y);
        k->matmul(k, &w32.t, x, T, y);
        k->rope(k, y, T == 1 ? &pos : ps, T, 4, 64, 10000.0f);
        int32_t slots[64];
        for (int64_t t = 0; t < T; t++) {
            int32_t p = T == 1 ? pos : ps[t];
            slots[t] = table[p / 16] * 16 + p % 16;
        }
        k->kv_write(k, kc, PD_DTYPE_F32, 64, slots, T, x);
        k->kv_write(k, vc, PD_DTYPE_F32, 64, slots, T, x);
        pd_attn_args_t a = {.q = q,
                            .out = o,
                            .T = 1,
                            .pos = &pos,
                            .k_cache = kc,
                            .v_cache = vc,
                            .kv_dtype = PD_DTYPE_F32,
                            .seq = &zero,
                            .block_tables = table,
                            .n_seqs = 1,
                            .bt_stride = 8,
                            .block_size = 16,
                            .n_heads = 4,
                            .n_kv_heads = 1,
                            .head_dim = 64,
                            .scale = 0.125f};
        k->attention(k, &a);
        k->silu_mul(k, y, x, 256);
        k->add(k, y, x, 256);
        k->softmax(k, y, 1, 256);
        if (step == 1)
            before = heap_in_use();
    }
    ck_assert_uint_eq(heap_in_use(), before);
    free(x);
    free(y);
    free(wn);
    free(kc);
    free(vc);
    free(q);
    free(o);
    weight_free(&w8);
    weight_free(&w32);
    pd_kernels_destroy(&k);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kernels_cpu");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_matmul, 0, 3 * 4);
    tcase_add_test(tc, test_matmul_thread_invariant);
    tcase_add_test(tc, test_matmul_multi);
    tcase_add_test(tc, test_get_rows);
    tcase_add_test(tc, test_elementwise);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_attention);
    tcase_add_test(tc, test_kv_write_layout);
    tcase_add_test(tc, test_new_bad_args);
    tcase_add_test(tc, test_no_alloc_steady_state);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    detect_isas();
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
