/* test_llm.c - the forward pass and the generation loop on a real model
 * (stories260K): prompt chunking does not change the result, bad batches are
 * refused without touching the cache, and generation allocates nothing per token
 * (every allocation is counted: by interposing malloc, or through the sanitizer's
 * allocator hooks in ASan builds). */
#include <check.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/generate.h"
#include "common/llm.h"
#include "common/log.h"
#include "common/model.h"
#include "common/sampler.h"
#include "kernels/ops.h"
#include "support/pdcheck.h"

#include "support/alloc_count.h"

/* ---- fixtures ---- */
static pd_model_t *model;
static pd_kernels_t *kern;

static void setup(void)
{
    ck_assert_int_eq(pd_model_open(pd_test_model_path("stories260K.gguf"), NULL, &model),
                     PD_OK);
    ck_assert_int_eq(pd_kernels_cpu_new(2, NULL, &kern), PD_OK);
}

static void teardown(void)
{
    pd_kernels_destroy(&kern);
    pd_model_destroy(&model);
}

static const int32_t prompt[] = {1,   403, 407, 261, 378, 432, 383, 286,
                                 261, 376, 298, 315, 421, 395, 317, 426,
                                 338, 401, 396, 267, 337, 410, 408};
#define NP ((int32_t)(sizeof prompt / sizeof prompt[0]))

/* Logits of the last prompt token with the prompt run in chunks of `chunk`. */
static void last_logits_kv(int32_t chunk, pd_kv_type_t kv, float *out)
{
    pd_llm_t *llm = NULL;
    pd_llm_opts_t o = {.max_ctx = 64, .max_batch_tokens = chunk, .kv_type = kv};
    ck_assert_int_eq(pd_llm_new(model, kern, &o, &llm), PD_OK);
    int32_t pos[NP];
    const float *logits = NULL;
    for (int32_t s = 0; s < NP; s += chunk) {
        int32_t T = NP - s < chunk ? NP - s : chunk, row = T - 1;
        for (int32_t t = 0; t < T; t++)
            pos[t] = s + t;
        ck_assert_int_eq(pd_llm_forward(llm, prompt + s, pos, T, &row, 1, &logits),
                         PD_OK);
    }
    memcpy(out, logits, (size_t)pd_model_config(model)->vocab_size * sizeof(float));
    ck_assert_int_eq(pd_llm_kv_dtype(llm), kv == PD_KV_F16 ? PD_DTYPE_F16 : PD_DTYPE_F32);
    pd_llm_destroy(&llm);
    ck_assert_ptr_null(llm);
}

static void last_logits(int32_t chunk, float *out)
{
    last_logits_kv(chunk, PD_KV_AUTO, out); /* an F32 model: auto is F32 */
}

/* An F16 cache rounds K and V to 11 significant bits: logits move by well under 1%
 * of their range, and the cache must still be read (a zeroed cache would not). */
START_TEST(f16_cache_close_to_f32)
{
    int32_t nv = pd_model_config(model)->vocab_size;
    float *ref = malloc((size_t)nv * sizeof *ref),
          *got = malloc((size_t)nv * sizeof *got);
    last_logits_kv(NP, PD_KV_F32, ref);
    const int32_t chunks[] = {NP, 1};
    for (size_t c = 0; c < 2; c++) {
        last_logits_kv(chunks[c], PD_KV_F16, got);
        double maxd = 0, lo = ref[0], hi = ref[0], same = 1;
        for (int32_t i = 0; i < nv; i++) {
            maxd = fmax(maxd, fabs((double)got[i] - ref[i]));
            lo = fmin(lo, ref[i]);
            hi = fmax(hi, ref[i]);
            same = same && got[i] == ref[i];
        }
        ck_assert_msg(maxd <= 5e-3 * (hi - lo),
                      "chunk %d: f16 cache moved logits by %g of "
                      "a range of %g",
                      chunks[c], maxd, hi - lo);
        ck_assert_msg(!same, "f16 cache gave bit-identical logits: was it used?");
    }
    free(ref);
    free(got);
}
END_TEST

START_TEST(chunking_does_not_change_logits)
{
    int32_t nv = pd_model_config(model)->vocab_size;
    float *ref = malloc((size_t)nv * sizeof *ref),
          *got = malloc((size_t)nv * sizeof *got);
    last_logits(NP, ref);
    const int32_t chunks[] = {1, 2, 5, 16};
    for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
        last_logits(chunks[c], got);
        double maxd = 0, maxv = 0;
        for (int32_t i = 0; i < nv; i++) {
            maxd = fmax(maxd, fabs((double)got[i] - ref[i]));
            maxv = fmax(maxv, fabs((double)ref[i]));
        }
        /* only summation order differs between the T = 1 and T > 1 paths */
        ck_assert_msg(maxd <= 1e-4 * maxv, "chunk %d: max diff %g (max |logit| %g)",
                      chunks[c], maxd, maxv);
        ck_assert_int_eq(pd_argmax(got, nv), pd_argmax(ref, nv));
    }
    free(ref);
    free(got);
}
END_TEST

START_TEST(bad_batches_refused)
{
    pd_log_set_level(PD_LOG_LEVEL_OFF);
    pd_llm_t *llm = NULL;
    pd_llm_opts_t o = {.max_ctx = 8, .max_batch_tokens = 4, .max_logits = 2};
    ck_assert_int_eq(pd_llm_new(model, kern, &o, &llm), PD_OK);
    int32_t ids[5] = {1, 2, 3, 4, 5}, pos[5] = {0, 1, 2, 3, 4}, rows[3] = {0, 1, 2};
    const float *l = NULL;
    ck_assert_int_eq(pd_llm_forward(llm, ids, pos, 0, rows, 1, &l), PD_ERR_RANGE);
    ck_assert_int_eq(pd_llm_forward(llm, ids, pos, 5, rows, 1, &l), PD_ERR_RANGE);
    ck_assert_int_eq(pd_llm_forward(llm, ids, pos, 3, rows, 3, &l), PD_ERR_RANGE);
    int32_t bad_id = 512, bad_pos = 8, bad_row = 1;
    ck_assert_int_eq(pd_llm_forward(llm, &bad_id, pos, 1, rows, 1, &l), PD_ERR_RANGE);
    ck_assert_int_eq(pd_llm_forward(llm, ids, &bad_pos, 1, rows, 1, &l), PD_ERR_RANGE);
    ck_assert_int_eq(pd_llm_forward(llm, ids, pos, 1, &bad_row, 1, &l), PD_ERR_RANGE);
    ck_assert_ptr_null(l);
    ck_assert_int_eq(pd_llm_forward(llm, ids, pos, 4, rows, 2, &l), PD_OK);
    ck_assert_ptr_nonnull(l);
    pd_llm_destroy(&llm);
}
END_TEST

static int count_tokens(void *user, int32_t id)
{
    (void)id;
    ++*(int *)user;
    return 0;
}

/* Allocations of one whole generation of n tokens (sampling on, a fresh seed). */
static long allocs_for(pd_llm_t *llm, pd_sampler_t *s, int32_t n)
{
    int32_t out[256];
    int seen = 0;
    pd_gen_opts_t go = {.max_tokens = n, .ignore_eos = true};
    pd_gen_stats_t st;
    pd_sampler_reseed(s, 1234);
    /* nothing but the generation inside the window: Check's asserts allocate */
    long before = pd_test_allocs();
    pd_status_t rc =
        pd_generate(llm, s, prompt, NP, 2, 1, &go, count_tokens, &seen, out, &st);
    long used = pd_test_allocs() - before;
    ck_assert_int_eq(rc, PD_OK);
    ck_assert_int_eq(st.n_gen, n);
    ck_assert_int_eq(seen, n);
    return used;
}

START_TEST(generation_allocates_nothing_per_token)
{
    pd_test_alloc_count_install();
    pd_llm_t *llm = NULL;
    pd_sampler_t *s = NULL;
    pd_llm_opts_t o = {.max_ctx = 512, .max_batch_tokens = 32};
    pd_sampler_params_t sp = {
        .temperature = 0.9f, .top_k = 40, .top_p = 0.9f, .min_p = 0.02f};
    ck_assert_int_eq(pd_llm_new(model, kern, &o, &llm), PD_OK);
    ck_assert_int_eq(pd_sampler_new(pd_model_config(model)->vocab_size, &sp, &s), PD_OK);
    (void)allocs_for(llm, s, 4); /* warm-up: kernels size their scratch on first use */
    long a_short = allocs_for(llm, s, 8), a_long = allocs_for(llm, s, 200);
    ck_assert_msg(a_long == a_short,
                  "generating 200 tokens made %ld allocations, 8 tokens %ld", a_long,
                  a_short);
    ck_assert_int_eq(a_long, 0);
    pd_sampler_destroy(&s);
    pd_llm_destroy(&llm);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 120, setup, teardown);
    PD_TEST_ADD(tc, chunking_does_not_change_logits, f16_cache_close_to_f32,
                bad_batches_refused, generation_allocates_nothing_per_token);
    return pd_test_run("llm", tc);
}
