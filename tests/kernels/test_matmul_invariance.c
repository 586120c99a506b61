/* test_matmul_invariance.c - batch invariance of the CPU matmul: row y[t] of
 * k->matmul and k->matmul_multi is the same bits whatever the batch around it.
 *
 * For every ISA this CPU supports (scalar, avx2, avx512, avx512 without VNNI) and every
 * weight dtype, over odd and even shapes (multiples of 32 inputs for Q8_0/Q4_0), each
 * row of x is multiplied alone (T = 1, one thread); then the same rows are multiplied
 * inside batches of T = 2, 3, 5, 8, 9, 17 and 64 starting at different rows, with 1
 * and 2 threads (so both the matrix-vector and the matrix-matrix paths, and different
 * splits of the work), and through matmul_multi. Every output must equal the lone
 * row's bit for bit (memcmp): the batching engine mixes decode tokens of many
 * sequences with prompt chunks in one pass, and greedy output must not depend on it.
 * Threading: each test drives its own kernels from the test's thread. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common/tensor.h"
#include "kernels/ops.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static const char *const isa_names[] = {"scalar", "avx2", "avx512", "avx512-novnni"};
static const pd_dtype_t dtypes[] = {PD_DTYPE_F32, PD_DTYPE_F16, PD_DTYPE_BF16,
                                    PD_DTYPE_Q8_0, PD_DTYPE_Q4_0};
static const int64_t batch_Ts[] = {2, 3, 5, 8, 9, 17, 64};
#define MAX_T   64
#define MAX_OFF 5 /* batches start at row 0 or row MAX_OFF of the pool */
#define POOL    (MAX_T + MAX_OFF)

typedef struct shape {
    int64_t n_out, n_in;
} shape_t;

/* Odd and even sizes, ragged panels and vector tails; for Q8_0/Q4_0 whole, partial
 * and single chunks of blocks. */
static const shape_t float_shapes[] = {{67, 37}, {64, 256}, {33, 161}, {5, 8}};
static const shape_t quant_shapes[] = {{67, 96}, {64, 544}, {37, 768}, {3, 32}};

static int is_quant(pd_dtype_t dt)
{
    return dt == PD_DTYPE_Q8_0 || dt == PD_DTYPE_Q4_0;
}

/* A random weight matrix of dtype dt; free t->data. */
static pd_tensor_t weight_make(pd_dtype_t dt, int64_t n_out, int64_t n_in)
{
    size_t rb;
    ck_assert_int_eq(pd_dtype_row_bytes(dt, n_in, &rb), PD_OK);
    uint8_t *data = malloc(rb * (size_t)n_out);
    float *row = malloc((size_t)n_in * sizeof(float));
    ck_assert(data && row);
    for (int64_t o = 0; o < n_out; o++) {
        uint8_t *d = data + (size_t)o * rb;
        for (int64_t i = 0; i < n_in; i++)
            row[i] = frand() * (o % 7 == 0 ? 8.0f : 1.0f);
        if (dt == PD_DTYPE_F32)
            memcpy(d, row, (size_t)n_in * sizeof(float));
        else if (dt == PD_DTYPE_Q8_0)
            pd_quantize_q8_0(row, n_in, (pd_block_q8_0_t *)d);
        else if (dt == PD_DTYPE_Q4_0)
            pd_quantize_q4_0(row, n_in, (pd_block_q4_0_t *)d);
        else
            for (int64_t i = 0; i < n_in; i++) {
                uint16_t h =
                    dt == PD_DTYPE_F16 ? pd_f32_to_fp16(row[i]) : pd_f32_to_bf16(row[i]);
                memcpy(d + 2 * i, &h, 2);
            }
    }
    free(row);
    return (pd_tensor_t){.dtype = dt,
                         .n_dims = 2,
                         .ne = {n_in, n_out, 1, 1},
                         .data = data,
                         .nbytes = rb * (size_t)n_out};
}

/* Pool rows of varied scale (one tiny, one large) so blocks quantize differently. */
static float *pool_make(int64_t n_in)
{
    float *x = malloc((size_t)(POOL * n_in) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    for (int64_t t = 0; t < POOL; t++) {
        float scale = t % 11 == 3 ? 1e-3f : t % 13 == 5 ? 50.0f : 2.0f;
        for (int64_t i = 0; i < n_in; i++)
            x[t * n_in + i] = frand() * scale;
    }
    return x;
}

static pd_kernels_t *kernels_or_null(const char *isa, int n_threads)
{
    pd_kernels_t *k = NULL;
    pd_status_t st = pd_kernels_cpu_new(n_threads, isa, &k);
    if (st == PD_ERR_UNSUPPORTED)
        return NULL;
    ck_assert_int_eq(st, PD_OK);
    return k;
}

/* y of batch [off, off + T) of the pool against the lone rows. */
static void check_batch(pd_kernels_t *k, const pd_tensor_t *w, const float *pool,
                        const float *lone, int64_t off, int64_t T)
{
    int64_t n_in = w->ne[0], n_out = w->ne[1];
    float *y = malloc((size_t)(T * n_out) * sizeof(float));
    ck_assert_ptr_nonnull(y);
    k->matmul(k, w, pool + off * n_in, T, y);
    for (int64_t t = 0; t < T; t++)
        ck_assert_msg(memcmp(y + t * n_out, lone + (off + t) * n_out,
                             (size_t)n_out * sizeof(float)) == 0,
                      "%s/%d %s %lldx%lld: row %lld at %lld of T=%lld differs from alone",
                      k->name, k->n_threads, pd_dtype_name(w->dtype), (long long)n_out,
                      (long long)n_in, (long long)(off + t), (long long)t, (long long)T);
    free(y);
}

START_TEST(test_matmul_batch_invariant)
{
    const char *isa = isa_names[_i];
    pd_kernels_t *k1 = kernels_or_null(isa, 1);
    if (!k1)
        return; /* not this CPU (test_kernels_cpu checks the refusal) */
    pd_kernels_t *k2 = kernels_or_null(isa, 2);
    ck_assert_ptr_nonnull(k2);
    for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
        const shape_t *shapes = is_quant(dtypes[d]) ? quant_shapes : float_shapes;
        for (int si = 0; si < 4; si++) {
            int64_t n_out = shapes[si].n_out, n_in = shapes[si].n_in;
            pd_tensor_t w = weight_make(dtypes[d], n_out, n_in);
            float *pool = pool_make(n_in);
            float *lone = malloc((size_t)(POOL * n_out) * sizeof(float));
            ck_assert_ptr_nonnull(lone);
            for (int64_t t = 0; t < POOL; t++)
                k1->matmul(k1, &w, pool + t * n_in, 1, lone + t * n_out);
            for (size_t ti = 0; ti < sizeof batch_Ts / sizeof batch_Ts[0]; ti++) {
                int64_t T = batch_Ts[ti];
                check_batch(k1, &w, pool, lone, 0, T);
                check_batch(k2, &w, pool, lone, MAX_OFF, T);
                check_batch(k2, &w, pool, lone, 0, T);
                check_batch(k1, &w, pool, lone, MAX_OFF, T);
            }
            /* alone again, on two threads */
            check_batch(k2, &w, pool, lone, MAX_OFF + 1, 1);
            free(lone);
            free(pool);
            free((void *)w.data);
        }
    }
    pd_kernels_destroy(&k1);
    pd_kernels_destroy(&k2);
}
END_TEST

/* matmul_multi (x prepared once for all its matrices) against lone matmul rows. */
START_TEST(test_matmul_multi_batch_invariant)
{
    const char *isa = isa_names[_i];
    pd_kernels_t *k = kernels_or_null(isa, 2);
    if (!k)
        return;
    const int64_t outs[3] = {67, 32, 5};
    const int64_t multi_Ts[] = {1, 3, 9, 17};
    for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
        int64_t n_in = is_quant(dtypes[d]) ? 544 : 161;
        pd_tensor_t w[3];
        const pd_tensor_t *ws[3];
        float *lone[3];
        float *pool = pool_make(n_in);
        for (int m = 0; m < 3; m++) {
            w[m] = weight_make(dtypes[d], outs[m], n_in);
            ws[m] = &w[m];
            lone[m] = malloc((size_t)(POOL * outs[m]) * sizeof(float));
            ck_assert_ptr_nonnull(lone[m]);
            for (int64_t t = 0; t < POOL; t++)
                k->matmul(k, ws[m], pool + t * n_in, 1, lone[m] + t * outs[m]);
        }
        for (size_t ti = 0; ti < sizeof multi_Ts / sizeof multi_Ts[0]; ti++) {
            int64_t T = multi_Ts[ti], off = (int64_t)ti;
            float *ys[3];
            for (int m = 0; m < 3; m++) {
                ys[m] = malloc((size_t)(T * outs[m]) * sizeof(float));
                ck_assert_ptr_nonnull(ys[m]);
            }
            k->matmul_multi(k, ws, ys, 3, pool + off * n_in, T);
            for (int m = 0; m < 3; m++) {
                ck_assert_msg(memcmp(ys[m], lone[m] + off * outs[m],
                                     (size_t)(T * outs[m]) * sizeof(float)) == 0,
                              "%s %s T=%lld matrix %d differs from lone rows", isa,
                              pd_dtype_name(dtypes[d]), (long long)T, m);
                free(ys[m]);
            }
        }
        for (int m = 0; m < 3; m++) {
            free(lone[m]);
            free((void *)w[m].data);
        }
        free(pool);
    }
    pd_kernels_destroy(&k);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("matmul_invariance");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    int n_isas = (int)(sizeof isa_names / sizeof isa_names[0]);
    tcase_add_loop_test(tc, test_matmul_batch_invariant, 0, n_isas);
    tcase_add_loop_test(tc, test_matmul_multi_batch_invariant, 0, n_isas);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
