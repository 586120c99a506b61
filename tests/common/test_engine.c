/* test_engine.c - the batching engine on a real model (stories260K): outputs equal
 * the single-sequence loop's (pd_generate) whatever the batch, the arrivals, the
 * preemptions and the prefix-cache hits, greedy and sampled; chunked prefill keeps
 * decodes going; cancellation releases blocks at once (also from a callback); bad
 * requests are refused at add; the pool ends every test with all blocks free; and a
 * step allocates nothing. */
#include <check.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/engine.h"
#include "common/generate.h"
#include "common/log.h"
#include "common/model.h"
#include "common/rng.h"
#include "support/alloc_count.h"
#include "support/pdcheck.h"

static pd_model_t *model;
static pd_kernels_t *kern;

static void setup(void)
{
    pd_test_log_setup();
    ck_assert_int_eq(pd_model_open(pd_test_model_path("stories260K.gguf"), NULL, &model),
                     PD_OK);
    ck_assert_int_eq(pd_kernels_cpu_new(2, NULL, &kern), PD_OK);
}

static void teardown(void)
{
    pd_kernels_destroy(&kern);
    pd_model_destroy(&model);
}

#define MAX_REQ 80
#define MAX_GEN 160

typedef struct out {
    int32_t ids[MAX_GEN + 1];
    int32_t n, n_tokens_cb;
    bool done;
    pd_engine_result_t res;
} out_t;

static void on_token(void *user, uint64_t id, int32_t tok)
{
    (void)id;
    out_t *o = user;
    o->n_tokens_cb += tok >= 0;
}

static void on_finish(void *user, const pd_engine_result_t *r)
{
    out_t *o = user;
    ck_assert(!o->done); /* exactly once */
    o->done = true;
    o->res = *r;
    o->n = r->n_gen;
    memcpy(o->ids, r->ids, (size_t)r->n_gen * sizeof *o->ids);
}

typedef struct req_spec {
    int32_t prompt[64];
    int32_t n_prompt, max_tokens;
    pd_sampler_params_t sp;
    int arrival; /* step */
} req_spec_t;

/* The reference: pd_generate alone. */
static int32_t reference(const req_spec_t *q, int32_t *ids)
{
    pd_llm_t *llm = NULL;
    pd_sampler_t *s = NULL;
    pd_llm_opts_t lo = {.max_ctx = 512, .max_batch_tokens = 64};
    ck_assert_int_eq(pd_llm_new(model, kern, &lo, &llm), PD_OK);
    ck_assert_int_eq(pd_sampler_new(pd_model_config(model)->vocab_size, &q->sp, &s),
                     PD_OK);
    pd_gen_opts_t go = {.max_tokens = q->max_tokens, .ignore_eos = true};
    pd_gen_stats_t st;
    ck_assert_int_eq(
        pd_generate(llm, s, q->prompt, q->n_prompt, 2, 1, &go, NULL, NULL, ids, &st),
        PD_OK);
    pd_sampler_destroy(&s);
    pd_llm_destroy(&llm);
    return st.n_gen;
}

/* Random requests: prompts from a few shared stems (so prefixes repeat) plus random
 * tails; every third one sampled. */
static void make_specs(pd_rng_t *rng, req_spec_t *q, int n, int max_arrival)
{
    int32_t stem[48];
    for (int i = 0; i < 48; i++)
        stem[i] = 3 + (int32_t)(pd_rng_next(rng) % 500);
    for (int r = 0; r < n; r++) {
        req_spec_t *x = &q[r];
        memset(x, 0, sizeof *x);
        x->prompt[0] = 1;
        int shared = (int)(pd_rng_next(rng) % 48);
        int tail = 1 + (int)(pd_rng_next(rng) % 12);
        memcpy(x->prompt + 1, stem, (size_t)shared * sizeof(int32_t));
        for (int i = 0; i < tail; i++)
            x->prompt[1 + shared + i] = 3 + (int32_t)(pd_rng_next(rng) % 500);
        x->n_prompt = 1 + shared + tail;
        x->max_tokens = 8 + (int32_t)(pd_rng_next(rng) % 64);
        x->sp = pd_sampler_params_default();
        if (r % 3 == 2) {
            x->sp.temperature = 0.9f;
            x->sp.top_p = 0.95f;
        }
        x->sp.seed = 1000 + (uint64_t)r;
        x->arrival = (int)(pd_rng_next(rng) % ((uint64_t)max_arrival + 1));
    }
}

/* Runs the specs through one engine (checking every block comes back); returns its
 * stats. */
static pd_engine_stats_t run_engine(const pd_engine_opts_t *eo, const req_spec_t *q, int n,
                          out_t *outs)
{
    pd_engine_t *e = NULL;
    ck_assert_int_eq(pd_engine_new(model, kern, eo, &e), PD_OK);
    int32_t free0 = pd_kv_pool_n_free(pd_engine_kv(e));
    int added = 0;
    for (int step = 0; step < 100000 && (added < n || pd_engine_n_pending(e)); step++) {
        for (int r = 0; r < n; r++)
            if (q[r].arrival == step || (step == 0 && q[r].arrival < 0)) {
                pd_engine_request_t rq = {.prompt = q[r].prompt,
                                          .n_prompt = q[r].n_prompt,
                                          .max_tokens = q[r].max_tokens,
                                          .ignore_eos = true,
                                          .sampling = q[r].sp,
                                          .on_token = on_token,
                                          .on_finish = on_finish,
                                          .user = &outs[r]};
                ck_assert_int_eq(pd_engine_add(e, &rq, NULL), PD_OK);
                added++;
            }
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    }
    ck_assert_int_eq(added, n);
    ck_assert_int_eq(pd_engine_n_pending(e), 0);
    ck_assert_int_eq(pd_kv_pool_n_free(pd_engine_kv(e)), free0);
    pd_engine_stats_t st = pd_engine_stats(e);
    pd_engine_destroy(&e);
    return st;
}

static void check_against_reference(const req_spec_t *q, int n, const out_t *outs)
{
    int32_t ref[MAX_GEN + 1];
    for (int r = 0; r < n; r++) {
        ck_assert_msg(outs[r].done, "request %d never finished", r);
        int32_t nr = reference(&q[r], ref);
        ck_assert_int_eq(outs[r].n, nr);
        ck_assert_int_eq(outs[r].n_tokens_cb, nr);
        for (int32_t i = 0; i < nr; i++)
            ck_assert_msg(outs[r].ids[i] == ref[i],
                          "request %d (%s) token %d: %d batched, %d alone", r,
                          q[r].sp.temperature > 0 ? "sampled" : "greedy", i,
                          outs[r].ids[i], ref[i]);
        ck_assert_int_eq(outs[r].res.finish, PD_ENGINE_FINISH_LENGTH);
    }
}

START_TEST(batched_equals_alone)
{
    pd_rng_t rng;
    pd_rng_seed(&rng, 7);
    static req_spec_t q[MAX_REQ];
    static out_t outs[MAX_REQ];
    int sizes[3] = {2, 16, 64};
    for (int k = 0; k < 3; k++) {
        make_specs(&rng, q, sizes[k], 40);
        memset(outs, 0, sizeof outs);
        pd_engine_opts_t eo = {
            .max_num_seqs = 64, .max_batch_tokens = 96, .eos = 2, .bos = 1};
        run_engine(&eo, q, sizes[k], outs);
        check_against_reference(q, sizes[k], outs);
    }
}
END_TEST

START_TEST(preemption_keeps_outputs)
{
    pd_rng_t rng;
    pd_rng_seed(&rng, 11);
    static req_spec_t q[24];
    static out_t outs[24];
    make_specs(&rng, q, 24, 10);
    /* 12 blocks of 8: 96 positions for 24 requests of up to 60 + 72 */
    pd_engine_opts_t eo = {.max_num_seqs = 16,
                           .max_batch_tokens = 32,
                           .kv_blocks = 18,
                           .block_size = 8,
                           .eos = 2,
                           .bos = 1};
    int64_t pre = run_engine(&eo, q, 24, outs).preemptions;
    ck_assert_int_gt(pre, 0);
    int with = 0;
    for (int r = 0; r < 24; r++)
        with += outs[r].res.preemptions > 0;
    ck_assert_int_gt(with, 0);
    check_against_reference(q, 24, outs);
    /* and with the prefix cache off */
    memset(outs, 0, sizeof outs);
    eo.no_prefix_cache = true;
    ck_assert_int_gt(run_engine(&eo, q, 24, outs).preemptions, 0);
    check_against_reference(q, 24, outs);
}
END_TEST

START_TEST(prefix_cache_hit_and_stats)
{
    static req_spec_t q[2];
    static out_t outs[2];
    pd_rng_t rng;
    pd_rng_seed(&rng, 3);
    make_specs(&rng, q, 1, 0);
    q[0].n_prompt = 40; /* 2 full blocks of 16 */
    for (int i = 1; i < 40; i++)
        q[0].prompt[i] = 3 + i;
    q[0].max_tokens = 5;
    q[0].arrival = 0;
    q[1] = q[0];
    q[1].arrival = 20; /* after the first finished */
    pd_engine_opts_t eo = {.max_num_seqs = 4, .eos = 2, .bos = 1};
    run_engine(&eo, q, 2, outs);
    ck_assert_int_eq(outs[0].res.cached_tokens, 0);
    ck_assert_int_eq(outs[1].res.cached_tokens, 32);
    check_against_reference(q, 2, outs);
}
END_TEST

/* A long prompt arriving while another request decodes is prefilled in chunks of
 * the budget, and the decode gets its token every step meanwhile. */
START_TEST(chunked_prefill_does_not_stall_decodes)
{
    pd_engine_t *e = NULL;
    pd_engine_opts_t eo = {.max_num_seqs = 4, .max_batch_tokens = 8, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &eo, &e), PD_OK);
    static out_t a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    int32_t p1[3] = {1, 10, 20}, p2[60];
    p2[0] = 1;
    for (int i = 1; i < 60; i++)
        p2[i] = 3 + i * 7 % 400;
    pd_engine_request_t ra = {.prompt = p1,
                              .n_prompt = 3,
                              .max_tokens = 30,
                              .ignore_eos = true,
                              .sampling = pd_sampler_params_default(),
                              .on_token = on_token,
                              .on_finish = on_finish,
                              .user = &a};
    pd_engine_request_t rb = ra;
    rb.prompt = p2;
    rb.n_prompt = 60;
    rb.user = &b;
    ck_assert_int_eq(pd_engine_add(e, &ra, NULL), PD_OK);
    ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK); /* a's prompt: first token */
    ck_assert_int_eq(pd_engine_add(e, &rb, NULL), PD_OK);
    for (int s = 0; s < 8; s++) { /* b needs 60 / 7 steps of prefill */
        int32_t before = a.n_tokens_cb, n_seqs = 0;
        ck_assert_int_eq(pd_engine_step(e, &n_seqs), PD_OK);
        ck_assert_int_eq(a.n_tokens_cb, before + 1);
        ck_assert_int_eq(n_seqs, 2);
    }
    ck_assert_int_eq(b.n_tokens_cb, 0); /* still prefilling: 8 steps x 7 tokens < 60 */
    for (int s = 0; s < 200 && pd_engine_n_pending(e); s++)
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    ck_assert(a.done && b.done);
    ck_assert_int_eq(pd_kv_pool_n_free(pd_engine_kv(e)),
                     pd_kv_pool_n_blocks(pd_engine_kv(e)));
    pd_engine_destroy(&e);
}
END_TEST

typedef struct cancel_ctx {
    pd_engine_t *e;
    uint64_t victim;
    int after;
    out_t out;
} cancel_ctx_t;

static void cancel_on_token(void *user, uint64_t id, int32_t tok)
{
    cancel_ctx_t *c = user;
    on_token(&c->out, id, tok);
    if (c->out.n_tokens_cb == c->after)
        ck_assert_int_eq(pd_engine_cancel(c->e, c->victim), PD_OK);
}

static void cancel_on_finish(void *user, const pd_engine_result_t *r)
{
    on_finish(&((cancel_ctx_t *)user)->out, r);
}

START_TEST(cancel_releases_blocks)
{
    pd_engine_t *e = NULL;
    pd_engine_opts_t eo = {.max_num_seqs = 8, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &eo, &e), PD_OK);
    pd_kv_pool_t *kv = pd_engine_kv(e);
    int32_t all = pd_kv_pool_n_blocks(kv);
    int32_t p[40];
    p[0] = 1;
    for (int i = 1; i < 40; i++)
        p[i] = 5 + i;
    static cancel_ctx_t c1, c2;
    memset(&c1, 0, sizeof c1);
    memset(&c2, 0, sizeof c2);
    pd_engine_request_t r = {.prompt = p,
                             .n_prompt = 40,
                             .max_tokens = 100,
                             .ignore_eos = true,
                             .sampling = pd_sampler_params_default(),
                             .on_token = cancel_on_token,
                             .on_finish = cancel_on_finish,
                             .user = &c1};
    uint64_t id1, id2, id3;
    ck_assert_int_eq(pd_engine_add(e, &r, &id1), PD_OK);
    r.user = &c2;
    ck_assert_int_eq(pd_engine_add(e, &r, &id2), PD_OK);
    /* c2 cancels itself from its own token callback after 5 tokens */
    c1.e = c2.e = e;
    c1.after = -1;
    c2.victim = id2;
    c2.after = 5;
    for (int s = 0; s < 3; s++)
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    ck_assert_int_lt(pd_kv_pool_n_free(kv), all);
    /* cancel outside a step: released at once, reported at once */
    ck_assert_int_eq(pd_engine_cancel(e, id1), PD_OK);
    ck_assert(c1.out.done);
    ck_assert_int_eq(c1.out.res.finish, PD_ENGINE_FINISH_CANCELLED);
    ck_assert_int_eq(pd_engine_cancel(e, id1), PD_ERR_NOT_FOUND);
    for (int s = 0; s < 10 && pd_engine_n_pending(e); s++)
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    ck_assert(c2.out.done);
    ck_assert_int_eq(c2.out.res.finish, PD_ENGINE_FINISH_CANCELLED);
    ck_assert_int_eq(c2.out.n, 5);
    ck_assert_int_eq(pd_kv_pool_n_free(kv), all);
    /* a waiting request can be cancelled too */
    r.on_token = on_token;
    r.on_finish = on_finish;
    static out_t o3;
    memset(&o3, 0, sizeof o3);
    r.user = &o3;
    ck_assert_int_eq(pd_engine_add(e, &r, &id3), PD_OK);
    ck_assert_int_eq(pd_engine_cancel(e, id3), PD_OK);
    ck_assert(o3.done && o3.n == 0);
    ck_assert_int_eq(pd_engine_n_pending(e), 0);
    ck_assert_int_eq(pd_kv_pool_n_free(kv), all);
    pd_engine_destroy(&e);
}
END_TEST

START_TEST(bad_requests_refused)
{
    pd_engine_t *e = NULL;
    /* 4 blocks of 16: the longest sequence is 64 tokens */
    pd_engine_opts_t eo = {.max_num_seqs = 4, .kv_blocks = 4, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &eo, &e), PD_OK);
    ck_assert_int_eq(pd_engine_max_seq_len(e), 64);
    int32_t p[70];
    for (int i = 0; i < 70; i++)
        p[i] = 1 + i;
    static out_t o;
    pd_engine_request_t r = {.prompt = p,
                             .n_prompt = 64,
                             .max_tokens = 4,
                             .sampling = pd_sampler_params_default(),
                             .on_finish = on_finish,
                             .user = &o};
    pd_test_n_errors = 0;
    ck_assert_int_eq(pd_engine_add(e, &r, NULL), PD_ERR_RANGE); /* no room */
    ck_assert_int_eq(pd_test_n_errors, 1);
    ck_assert_ptr_nonnull(strstr(pd_test_last_error, "no room"));
    r.n_prompt = 0;
    ck_assert_int_eq(pd_engine_add(e, &r, NULL), PD_ERR_INVALID);
    r.n_prompt = 3;
    p[1] = 100000;
    ck_assert_int_eq(pd_engine_add(e, &r, NULL), PD_ERR_RANGE);
    p[1] = 2;
    r.sampling.top_p = 2.0f;
    ck_assert_int_eq(pd_engine_add(e, &r, NULL), PD_ERR_INVALID);
    ck_assert_int_eq(pd_engine_n_pending(e), 0);
    ck_assert(!o.done);
    /* the longest allowed prompt runs, and stops at the pool's end */
    r.sampling = pd_sampler_params_default();
    r.n_prompt = 63;
    r.max_tokens = 0;
    r.ignore_eos = true;
    ck_assert_int_eq(pd_engine_add(e, &r, NULL), PD_OK);
    for (int s = 0; s < 20 && pd_engine_n_pending(e); s++)
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    ck_assert(o.done);
    ck_assert_int_eq(o.res.finish, PD_ENGINE_FINISH_LENGTH);
    ck_assert_int_eq(o.n, 2); /* positions 63 and (never computed) 64 */
    ck_assert_int_eq(pd_kv_pool_n_free(pd_engine_kv(e)), 4);
    pd_engine_destroy(&e);
}
END_TEST

/* ---- the disaggregated handoff: prefill-only on one engine, prefilled on another ---- */

typedef struct handoff {
    int32_t n_layers, calls, last_layer;
    int32_t pos_end[MAX_REQ];
    bool order_ok;
    /* the prefill side's result */
    bool done;
    int32_t first, kv[64], n_kv;
    uint64_t rng[4];
} handoff_t;

static void handoff_layer(void *user, int32_t layer, const pd_engine_progress_t *seqs,
                          int32_t n)
{
    handoff_t *h = user;
    /* layers come in order 0..n_layers-1 within each step */
    if (layer != (h->last_layer + 1) % h->n_layers)
        h->order_ok = false;
    h->last_layer = layer;
    h->calls++;
    for (int32_t i = 0; i < n; i++) {
        if (seqs[i].pos_end > seqs[i].n_prompt || seqs[i].n_blocks * 16 < seqs[i].pos_end)
            h->order_ok = false;
        int r = (int)(intptr_t)seqs[i].user;
        if (layer == 0 && seqs[i].pos_end <= h->pos_end[r])
            h->order_ok = false; /* every step moves a prefill forward */
        h->pos_end[r] = seqs[i].pos_end;
    }
}

static handoff_t *handoff_cur;
static void handoff_finish(void *user, const pd_engine_result_t *r)
{
    handoff_t *h = &handoff_cur[(intptr_t)user];
    ck_assert(!h->done);
    h->done = true;
    ck_assert_int_eq(r->finish, PD_ENGINE_FINISH_LENGTH);
    ck_assert_int_eq(r->n_gen, 1);
    ck_assert_ptr_nonnull(r->kv_blocks);
    ck_assert_int_eq(r->n_kv_blocks, (r->n_prompt + 15) / 16);
    h->first = r->ids[0];
    h->n_kv = r->n_kv_blocks;
    memcpy(h->kv, r->kv_blocks, (size_t)r->n_kv_blocks * sizeof *h->kv);
    memcpy(h->rng, r->rng_state, sizeof h->rng);
}

START_TEST(prefill_handoff_equals_alone)
{
    enum { N = 12 };
    static req_spec_t q[N];
    static out_t outs[N];
    static handoff_t hs[N];
    memset(outs, 0, sizeof outs);
    memset(hs, 0, sizeof hs);
    pd_rng_t rng;
    pd_rng_seed(&rng, 77);
    make_specs(&rng, q, N, 0);
    handoff_t layer_log = {.n_layers = pd_model_config(model)->n_layers,
                           .last_layer = -1,
                           .order_ok = true};
    handoff_cur = hs;
    /* the prefill side: small steps so prompts arrive in chunks */
    pd_engine_opts_t po = {.max_num_seqs = 4,
                           .max_batch_tokens = 16,
                           .kv_blocks = 64,
                           .eos = 2,
                           .bos = 1,
                           .on_layer = {handoff_layer, &layer_log}};
    pd_engine_t *P = NULL, *D = NULL;
    ck_assert_int_eq(pd_engine_new(model, kern, &po, &P), PD_OK);
    pd_engine_opts_t dopt = {.max_num_seqs = 8, .kv_blocks = 96, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &dopt, &D), PD_OK);
    pd_kv_pool_t *pk = pd_engine_kv(P), *dk = pd_engine_kv(D);
    int32_t pfree0 = pd_kv_pool_n_free(pk), dfree0 = pd_kv_pool_n_free(dk);
    for (int r = 0; r < N; r++) {
        pd_engine_request_t rq = {.prompt = q[r].prompt,
                                  .n_prompt = q[r].n_prompt,
                                  .sampling = q[r].sp,
                                  .prefill_only = true,
                                  .on_finish = handoff_finish,
                                  .user = (void *)(intptr_t)r};
        ck_assert_int_eq(pd_engine_add(P, &rq, NULL), PD_OK);
    }
    for (int s = 0; s < 1000 && pd_engine_n_pending(P); s++)
        ck_assert_int_eq(pd_engine_step(P, NULL), PD_OK);
    ck_assert_int_eq(pd_engine_n_pending(P), 0);
    ck_assert(layer_log.order_ok);
    ck_assert_int_gt(layer_log.calls, layer_log.n_layers * 2);
    /* the transfer: copy every layer's K/V rows into blocks reserved on D */
    size_t row = pd_kv_pool_row_bytes(pk), lb = pd_kv_pool_layer_bytes(pk);
    size_t dlb = pd_kv_pool_layer_bytes(dk); /* the pools differ in size */
    size_t bb = row * 16;
    int32_t nl = pd_kv_pool_n_layers(pk);
    for (int r = 0; r < N; r++) {
        handoff_t *h = &hs[r];
        ck_assert(h->done);
        int32_t dst[64];
        ck_assert_int_eq(pd_kv_pool_alloc(dk, h->n_kv, dst), PD_OK);
        for (int32_t l = 0; l < nl; l++)
            for (int32_t b = 0; b < h->n_kv; b++) {
                memcpy((uint8_t *)pd_kv_pool_k(dk, 0) + l * dlb + (size_t)dst[b] * bb,
                       (uint8_t *)pd_kv_pool_k(pk, 0) + l * lb + (size_t)h->kv[b] * bb, bb);
                memcpy((uint8_t *)pd_kv_pool_v(dk, 0) + l * dlb + (size_t)dst[b] * bb,
                       (uint8_t *)pd_kv_pool_v(pk, 0) + l * lb + (size_t)h->kv[b] * bb, bb);
            }
        ck_assert_uint_eq(pd_kv_checksum(pk, h->kv, q[r].n_prompt),
                          pd_kv_checksum(dk, dst, q[r].n_prompt));
        pd_kv_pool_release(pk, h->kv, h->n_kv);
        pd_engine_request_t rq = {.prompt = q[r].prompt,
                                  .n_prompt = q[r].n_prompt,
                                  .max_tokens = q[r].max_tokens,
                                  .ignore_eos = true,
                                  .sampling = q[r].sp,
                                  .rng_state = h->rng,
                                  .kv_blocks = dst,
                                  .first_token = h->first,
                                  .on_token = on_token,
                                  .on_finish = on_finish,
                                  .user = &outs[r]};
        outs[r].n_tokens_cb = 1; /* the first token came from the prefill side */
        ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_OK);
    }
    ck_assert_int_eq(pd_kv_pool_n_free(pk), pfree0);
    for (int s = 0; s < 5000 && pd_engine_n_pending(D); s++)
        ck_assert_int_eq(pd_engine_step(D, NULL), PD_OK);
    ck_assert_int_eq(pd_engine_n_pending(D), 0);
    check_against_reference(q, N, outs);
    ck_assert_int_eq(pd_engine_stats(D).prompt_tokens, 0); /* nothing recomputed */
    ck_assert_int_eq(pd_kv_pool_n_free(dk), dfree0);
    pd_engine_destroy(&P);
    pd_engine_destroy(&D);
}
END_TEST

/* A prefilled request whose first token already ends it finishes at the next step;
 * cancelling a prefilled request that never started releases its blocks. */
START_TEST(prefilled_edge_cases)
{
    pd_engine_t *D = NULL;
    pd_engine_opts_t dopt = {.max_num_seqs = 4, .kv_blocks = 16, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &dopt, &D), PD_OK);
    pd_kv_pool_t *dk = pd_engine_kv(D);
    int32_t free0 = pd_kv_pool_n_free(dk);
    int32_t prompt[20];
    for (int i = 0; i < 20; i++)
        prompt[i] = 5 + i;
    int32_t blocks[2];
    static out_t o[3];
    memset(o, 0, sizeof o);
    /* EOS as the first token */
    ck_assert_int_eq(pd_kv_pool_alloc(dk, 2, blocks), PD_OK);
    pd_engine_request_t rq = {.prompt = prompt,
                              .n_prompt = 20,
                              .max_tokens = 10,
                              .sampling = pd_sampler_params_default(),
                              .kv_blocks = blocks,
                              .first_token = 2,
                              .on_finish = on_finish,
                              .user = &o[0]};
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_OK);
    /* max_tokens 1 */
    ck_assert_int_eq(pd_kv_pool_alloc(dk, 2, blocks), PD_OK);
    rq.first_token = 7;
    rq.max_tokens = 1;
    rq.user = &o[1];
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_OK);
    /* cancelled before it starts */
    ck_assert_int_eq(pd_kv_pool_alloc(dk, 2, blocks), PD_OK);
    rq.max_tokens = 10;
    rq.user = &o[2];
    uint64_t id = 0;
    ck_assert_int_eq(pd_engine_add(D, &rq, &id), PD_OK);
    ck_assert_int_eq(pd_kv_pool_n_free(dk), free0 - 6);
    ck_assert_int_eq(pd_engine_cancel(D, id), PD_OK);
    ck_assert_int_eq(o[2].res.finish, PD_ENGINE_FINISH_CANCELLED);
    ck_assert_int_eq(pd_kv_pool_n_free(dk), free0 - 4);
    /* bad first token or block: refused, blocks stay the caller's */
    rq.first_token = 1 << 20;
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_ERR_INVALID);
    int32_t bad[2] = {0, 1 << 20};
    rq.first_token = 7;
    rq.kv_blocks = bad;
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_ERR_RANGE);
    ck_assert_int_eq(pd_engine_step(D, NULL), PD_OK);
    ck_assert(o[0].done && o[1].done);
    ck_assert_int_eq(o[0].res.finish, PD_ENGINE_FINISH_STOP);
    ck_assert_int_eq(o[0].n, 1);
    ck_assert_int_eq(o[0].ids[0], 2);
    ck_assert_int_eq(o[1].res.finish, PD_ENGINE_FINISH_LENGTH);
    ck_assert_int_eq(o[1].n, 1);
    ck_assert_int_eq(pd_kv_pool_n_free(dk), free0);
    pd_engine_destroy(&D);
}
END_TEST

/* Blocks held outside the batch (a decode worker's reservations, prefilled requests
 * waiting): a request that does not fit waits (a step runs nothing and is no error)
 * until they come back, and prefilled requests queued behind the head give their
 * blocks up rather than stall it. */
START_TEST(blocks_held_outside_wait)
{
    pd_engine_t *D = NULL;
    pd_engine_opts_t dopt = {.max_num_seqs = 4, .kv_blocks = 6, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &dopt, &D), PD_OK);
    pd_kv_pool_t *dk = pd_engine_kv(D);
    int32_t prompt[40];
    for (int i = 0; i < 40; i++)
        prompt[i] = 5 + i;
    static out_t o[3];
    memset(o, 0, sizeof o);
    int32_t held[5];
    ck_assert_int_eq(pd_kv_pool_alloc(dk, 5, held), PD_OK); /* "reserved" */
    pd_engine_request_t rq = {.prompt = prompt,
                              .n_prompt = 40, /* 3 blocks */
                              .max_tokens = 4,
                              .ignore_eos = true,
                              .sampling = pd_sampler_params_default(),
                              .on_finish = on_finish,
                              .user = &o[0]};
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_OK);
    int32_t ran = -1;
    ck_assert_int_eq(pd_engine_step(D, &ran), PD_OK);
    ck_assert_int_eq(ran, 0);
    ck_assert(!o[0].done);
    pd_kv_pool_release(dk, held, 5);
    for (int s = 0; s < 20 && !o[0].done; s++)
        ck_assert_int_eq(pd_engine_step(D, NULL), PD_OK);
    ck_assert(o[0].done);
    ck_assert_int_eq(o[0].res.finish, PD_ENGINE_FINISH_LENGTH);
    ck_assert_int_eq(o[0].n, 4);
    /* two prefilled requests of 32 tokens (2 blocks each, full) wait behind a plain
     * one of 40 tokens: the pool (6) cannot hold the head's 3 blocks plus their 4, so
     * the newest prefilled request gives its blocks up and everything finishes */
    memset(o, 0, sizeof o);
    int32_t pb[2][2];
    ck_assert_int_eq(pd_engine_add(D, &rq, NULL), PD_OK);
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(pd_kv_pool_alloc(dk, 2, pb[k]), PD_OK);
        pd_engine_request_t pr = rq;
        pr.n_prompt = 32;
        pr.kv_blocks = pb[k];
        pr.first_token = 9;
        pr.user = &o[1 + k];
        ck_assert_int_eq(pd_engine_add(D, &pr, NULL), PD_OK);
    }
    for (int s = 0; s < 100 && pd_engine_n_pending(D); s++)
        ck_assert_int_eq(pd_engine_step(D, NULL), PD_OK);
    ck_assert_int_eq(pd_engine_n_pending(D), 0);
    for (int k = 0; k < 3; k++)
        ck_assert_msg(o[k].done && o[k].res.finish == PD_ENGINE_FINISH_LENGTH,
                      "request %d did not finish", k);
    ck_assert_int_ge(pd_engine_stats(D).preemptions, 1);
    ck_assert_int_eq(pd_kv_pool_n_free(dk), 6);
    pd_engine_destroy(&D);
}
END_TEST

/* ---- speculative decoding (n-gram prompt lookup) ---- */

/* Greedy requests that repeat themselves (so that lookups hit) give exactly the
 * reference's tokens with speculation on, batched and under preemption; proposals are
 * accepted; blocks come back. */
START_TEST(spec_ngram_equals_alone)
{
    enum { N = 24 };
    static req_spec_t q[N];
    static out_t outs[N];
    pd_rng_t rng;
    pd_rng_seed(&rng, 4242);
    make_specs(&rng, q, N, 8);
    for (int r = 0; r < N; r++) {
        q[r].sp = pd_sampler_params_default(); /* greedy */
        q[r].max_tokens = 40 + (int32_t)(pd_rng_next(&rng) % 80);
    }
    for (int pass = 0; pass < 2; pass++) {
        memset(outs, 0, sizeof outs);
        pd_engine_opts_t eo = {.max_num_seqs = 8,
                               .max_batch_tokens = 48,
                               .kv_blocks = pass ? 24 : 0, /* pass 1: preemptions */
                               .eos = 2,
                               .bos = 1,
                               .spec_k = 4};
        pd_engine_stats_t st = run_engine(&eo, q, N, outs);
        ck_assert_int_gt(st.spec_proposed, 0);
        ck_assert_int_gt(st.spec_accepted, 0);
        ck_assert_int_le(st.spec_accepted, st.spec_proposed);
        if (pass)
            ck_assert_int_gt(st.preemptions, 0);
        int64_t acc = 0;
        for (int r = 0; r < N; r++) {
            ck_assert_int_le(outs[r].res.spec_accepted, outs[r].res.spec_proposed);
            acc += outs[r].res.spec_accepted;
        }
        ck_assert_int_eq(acc, st.spec_accepted);
        check_against_reference(q, N, outs);
    }
}
END_TEST

/* The draft model's proposals (llama2xs, the same vocabulary): outputs equal the
 * reference batched and under preemption, and the draft's KV stays consistent (the
 * model as its own draft has every proposal accepted). */
START_TEST(spec_draft_equals_alone)
{
    enum { N = 16 };
    static req_spec_t q[N];
    static out_t outs[N];
    pd_model_t *draft = NULL;
    ck_assert_int_eq(
        pd_model_open(pd_test_model_path("llama2xs_tok512_280K.gguf"), NULL, &draft), PD_OK);
    pd_rng_t rng;
    pd_rng_seed(&rng, 777);
    make_specs(&rng, q, N, 6);
    for (int r = 0; r < N; r++) {
        q[r].sp = pd_sampler_params_default();
        q[r].max_tokens = 30 + (int32_t)(pd_rng_next(&rng) % 60);
    }
    for (int pass = 0; pass < 3; pass++) {
        memset(outs, 0, sizeof outs);
        pd_engine_opts_t eo = {.max_num_seqs = 6,
                               .max_batch_tokens = 40,
                               .kv_blocks = pass == 1 ? 20 : 0, /* pass 1: preemptions */
                               .eos = 2,
                               .bos = 1,
                               .spec_k = 3,
                               .spec_fixed_k = true, /* adaptive k reads the clock */
                               .draft_model = pass == 2 ? model : draft};
        pd_engine_stats_t st = run_engine(&eo, q, N, outs);
        ck_assert_int_gt(st.spec_proposed, 0);
        if (pass == 2)
            ck_assert_int_eq(st.spec_accepted, st.spec_proposed);
        else
            ck_assert_int_gt(st.spec_accepted, 0);
        if (pass == 1)
            ck_assert_int_gt(st.preemptions, 0);
        check_against_reference(q, N, outs);
    }
    /* a draft on another vocabulary is refused */
    pd_model_t *other = NULL;
    ck_assert_int_eq(
        pd_model_open(pd_test_model_path("llama-2-tiny-random.gguf"), NULL, &other), PD_OK);
    pd_engine_opts_t eo = {.spec_k = 2, .draft_model = other, .eos = 2, .bos = 1};
    pd_engine_t *e = NULL;
    ck_assert_int_eq(pd_engine_new(model, kern, &eo, &e), PD_ERR_INVALID);
    ck_assert_ptr_null(e);
    pd_model_destroy(&other);
    pd_model_destroy(&draft);
}
END_TEST

/* ---- draws on several host threads ---- */

typedef struct traced {
    out_t o;
    uint64_t trace;       /* every token and the random state after it, folded */
    uint64_t cancel_id;   /* cancelled from this request's callback ... */
    int32_t cancel_after; /* ... at its token number cancel_after */
} traced_t;

static pd_engine_t *traced_engine;

static void fold(uint64_t *h, uint64_t v)
{
    *h = (*h ^ v) * 0x100000001b3ull;
}

static void traced_token(void *user, uint64_t id, int32_t tok)
{
    traced_t *t = user;
    uint64_t rng[4];
    ck_assert_int_eq(pd_engine_rng_state(traced_engine, id, rng), PD_OK);
    fold(&t->trace, (uint64_t)(uint32_t)tok);
    for (int i = 0; i < 4; i++)
        fold(&t->trace, rng[i]);
    if (++t->o.n_tokens_cb == t->cancel_after && t->cancel_id)
        ck_assert_int_eq(pd_engine_cancel(traced_engine, t->cancel_id), PD_OK);
}

static void traced_finish(void *user, const pd_engine_result_t *r)
{
    on_finish(&((traced_t *)user)->o, r);
}

/* Runs q through an engine on m; request 0 cancels request 1 after 5 tokens. */
static pd_engine_stats_t run_traced(const pd_model_t *m, const pd_engine_opts_t *eo,
                                    const req_spec_t *q, int n, traced_t *outs,
                                    int32_t *threads_p)
{
    memset(outs, 0, (size_t)n * sizeof *outs);
    ck_assert_int_eq(pd_engine_new(m, kern, eo, &traced_engine), PD_OK);
    *threads_p = pd_engine_sample_threads(traced_engine);
    uint64_t ids[MAX_REQ];
    int added = 0;
    for (int step = 0; step < 100000 && (added < n || pd_engine_n_pending(traced_engine));
         step++) {
        for (int r = 0; r < n; r++)
            if (q[r].arrival == step) {
                pd_engine_request_t rq = {.prompt = q[r].prompt,
                                          .n_prompt = q[r].n_prompt,
                                          .max_tokens = q[r].max_tokens,
                                          .ignore_eos = true,
                                          .sampling = q[r].sp,
                                          .on_token = traced_token,
                                          .on_finish = traced_finish,
                                          .user = &outs[r]};
                ck_assert_int_eq(pd_engine_add(traced_engine, &rq, &ids[r]), PD_OK);
                added++;
                if (r == 1) {
                    outs[0].cancel_id = ids[1];
                    outs[0].cancel_after = 5;
                }
            }
        ck_assert_int_eq(pd_engine_step(traced_engine, NULL), PD_OK);
    }
    ck_assert_int_eq(added, n);
    ck_assert_int_eq(pd_engine_n_pending(traced_engine), 0);
    pd_engine_stats_t st = pd_engine_stats(traced_engine);
    pd_engine_destroy(&traced_engine);
    return st;
}

/* Draws made ahead on several host threads (the engine's own pool of 4, the CPU
 * backend's pool of 2) give every request the tokens, the random state after each
 * token (as on_token reads it) and the final state that the engine thread alone gives:
 * sampled and greedy requests with every filter, with n-gram and draft-model
 * proposals verified by rejection sampling, on the 32000-token vocabulary and on
 * stories260K, with a request cancelled from another's callback after its draws were
 * made. */
START_TEST(parallel_draws_equal_serial)
{
    enum { N = 64 };
    static req_spec_t q[N];
    static traced_t serial[N], par[N];
    pd_model_t *big = NULL, *draft = NULL;
    ck_assert_int_eq(
        pd_model_open(pd_test_model_path("llama-2-tiny-random.gguf"), NULL, &big), PD_OK);
    ck_assert_int_eq(
        pd_model_open(pd_test_model_path("llama2xs_tok512_280K.gguf"), NULL, &draft),
        PD_OK);
    pd_rng_t rng;
    pd_rng_seed(&rng, 9090);
    make_specs(&rng, q, N, 6);
    q[0].arrival = q[1].arrival = 0;
    q[0].max_tokens = q[1].max_tokens = 40;
    for (int r = 0; r < N; r++) {
        pd_sampler_params_t *sp = &q[r].sp;
        *sp = pd_sampler_params_default();
        sp->seed = 77 + (uint64_t)r;
        if (r % 5 == 4)
            continue; /* greedy */
        sp->temperature = r % 3 == 0 ? 0.7f : r % 3 == 1 ? 1.0f : 1.4f;
        sp->top_p = r % 4 == 0 ? 1.0f : r % 4 == 1 ? 0.9f : 0.5f;
        sp->top_k = r % 7 == 0 ? 40 : 0;
        sp->min_p = r % 6 == 1 ? 0.05f : 0.0f;
    }
    /* 0: 32000 tokens, 12 requests; 1: stories260K with n-gram proposals; 2: with the
     * draft model's */
    for (int c = 0; c < 3; c++) {
        const pd_model_t *m = c == 0 ? big : model;
        int n = c == 0 ? 12 : N;
        pd_engine_opts_t eo = {.max_num_seqs = c == 0 ? 8 : N,
                               .max_batch_tokens = 512,
                               .eos = 2,
                               .bos = 1,
                               .spec_k = c == 0 ? 0 : 4,
                               .spec_fixed_k = true, /* adaptive k reads the clock */
                               .draft_model = c == 2 ? draft : NULL,
                               .sample_threads = 1};
        int32_t threads = 0;
        pd_engine_stats_t s1 = run_traced(m, &eo, q, n, serial, &threads);
        ck_assert_int_eq(threads, 1);
        ck_assert_int_eq(s1.sample_parallel_steps, 0);
        if (c > 0)
            ck_assert_int_gt(s1.spec_accepted, 0);
        for (int v = 0; v < 2; v++) {
            eo.sample_threads = v == 0 ? 4 : 0; /* 0: the backend's 2 kernel threads */
            pd_engine_stats_t s2 = run_traced(m, &eo, q, n, par, &threads);
            ck_assert_int_eq(threads, v == 0 ? 4 : 2);
            ck_assert_msg(s2.sample_parallel_steps > 0,
                          "case %d: no step drew in parallel (%lld steps)", c,
                          (long long)s2.steps);
            ck_assert_int_eq(s2.gen_tokens, s1.gen_tokens);
            ck_assert_int_eq(s2.spec_accepted, s1.spec_accepted);
            for (int r = 0; r < n; r++) {
                const out_t *a = &serial[r].o, *b = &par[r].o;
                ck_assert(a->done && b->done);
                ck_assert_int_eq(b->res.finish, a->res.finish);
                ck_assert_int_eq(b->n, a->n);
                for (int32_t i = 0; i < a->n; i++)
                    ck_assert_msg(
                        b->ids[i] == a->ids[i],
                        "case %d, %d threads, request %d token %d: %d, serial %d", c,
                        threads, r, i, b->ids[i], a->ids[i]);
                ck_assert_msg(par[r].trace == serial[r].trace,
                              "case %d, %d threads, request %d: the random states seen "
                              "from on_token differ",
                              c, threads, r);
                ck_assert_msg(!memcmp(b->res.rng_state, a->res.rng_state,
                                      sizeof a->res.rng_state),
                              "case %d, %d threads, request %d (%s): the final random "
                              "state differs",
                              c, threads, r, pd_engine_finish_str(a->res.finish));
            }
        }
        /* request 1, after request 0 in every step, has its token of the step drawn
         * (ahead, in parallel) when request 0's callback cancels it */
        ck_assert_int_eq(serial[1].o.res.finish, PD_ENGINE_FINISH_CANCELLED);
        if (c == 0)
            ck_assert_int_eq(serial[1].o.n, 4);
        else
            ck_assert_int_lt(serial[1].o.n, q[1].max_tokens);
    }
    pd_model_destroy(&draft);
    pd_model_destroy(&big);
}
END_TEST

/* ---- a step allocates nothing ---- */

START_TEST(steps_allocate_nothing)
{
    pd_test_alloc_count_install();
    pd_engine_t *e = NULL;
    pd_engine_opts_t eo = {.max_num_seqs = 8, .max_batch_tokens = 32, .eos = 2, .bos = 1};
    ck_assert_int_eq(pd_engine_new(model, kern, &eo, &e), PD_OK);
    int32_t p[20];
    for (int i = 0; i < 20; i++)
        p[i] = 1 + i * 3;
    static out_t o[8];
    memset(o, 0, sizeof o);
    for (int r = 0; r < 8; r++) {
        pd_engine_request_t rq = {.prompt = p,
                                  .n_prompt = 10 + r,
                                  .max_tokens = 120,
                                  .ignore_eos = true,
                                  .sampling = pd_sampler_params_default(),
                                  .on_finish = on_finish,
                                  .user = &o[r]};
        rq.sampling.temperature = 0.7f;
        ck_assert_int_eq(pd_engine_add(e, &rq, NULL), PD_OK);
    }
    for (int s = 0; s < 5; s++) /* warm-up: kernel scratch grows on first use */
        ck_assert_int_eq(pd_engine_step(e, NULL), PD_OK);
    long before = pd_test_allocs();
    pd_status_t st = PD_OK;
    for (int s = 0; s < 100 && st == PD_OK; s++)
        st = pd_engine_step(e, NULL);
    long used = pd_test_allocs() - before;
    ck_assert_int_eq(st, PD_OK);
    ck_assert_int_eq(pd_engine_n_running(e), 8);
    ck_assert_int_eq(used, 0);
    pd_engine_destroy(&e);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 600, setup, teardown);
    PD_TEST_ADD(tc, batched_equals_alone, preemption_keeps_outputs,
                prefix_cache_hit_and_stats, chunked_prefill_does_not_stall_decodes,
                cancel_releases_blocks, bad_requests_refused, steps_allocate_nothing,
                prefill_handoff_equals_alone, prefilled_edge_cases, blocks_held_outside_wait,
                spec_ngram_equals_alone, spec_draft_equals_alone,
                parallel_draws_equal_serial);
    return pd_test_run("engine", tc);
}
