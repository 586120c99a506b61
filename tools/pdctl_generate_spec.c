/* pdctl_generate_spec.c - `pdctl generate --prompt P` with speculative decoding: the
 * one prompt runs through the batching engine (where speculation lives) instead of
 * pd_generate, with the same streaming and the same stats. Single-threaded. */
#include <stdlib.h>
#include <string.h>

#include "common/engine.h"
#include "common/log.h"
#include "tools/pdctl_generate.h"

typedef struct spec_run {
    int (*on_token)(void *user, int32_t id);
    void *user;
    int32_t *ids;
    int32_t n;
    bool done, stopped;
    pd_engine_result_t res;
    double first_s;
} spec_run_t;

static void token_cb(void *user, uint64_t id, int32_t tok)
{
    (void)id;
    spec_run_t *r = user;
    if (r->stopped)
        return;
    r->ids[r->n++] = tok;
    if (r->on_token && r->on_token(r->user, tok))
        r->stopped = true;
}

static void finish_cb(void *user, const pd_engine_result_t *res)
{
    spec_run_t *r = user;
    r->done = true;
    r->res = *res;
}

pd_status_t pd_generate_spec(const gen_args_t *a, const pd_model_t *m, pd_kernels_t *k,
                             const int32_t *prompt, int32_t n_prompt,
                             int (*on_token)(void *user, int32_t id), void *user,
                             int32_t *ids, pd_gen_stats_t *st, pd_gen_spec_counts_t *sc)
{
    const pd_tokenizer_t *tok = pd_model_tokenizer(m);
    pd_model_t *draft = NULL;
    pd_engine_t *e = NULL;
    memset(st, 0, sizeof *st);
    if (a->max_tokens <= 0) { /* as pd_generate: nothing to generate */
        st->n_prompt = n_prompt;
        st->finish = PD_FINISH_LENGTH;
        return PD_OK;
    }
    if (a->spec && !strcmp(a->spec, "draft") && !a->draft_model) {
        PD_LOG_ERROR("--spec draft needs --draft-model");
        return PD_ERR_INVALID;
    }
    bool use_draft = a->draft_model && (!a->spec || !strcmp(a->spec, "draft"));
    pd_status_t s = PD_OK;
    if (use_draft)
        s = pd_model_open_ex(a->draft_model, a->tokenizer,
                             pd_gen_load_mmap(a) ? PD_MODEL_LOAD_MMAP : PD_MODEL_LOAD_COPY,
                             &draft);
    pd_engine_opts_t eo = {.max_num_seqs = 1,
                           .max_batch_tokens = a->batch,
                           .max_ctx = a->ctx,
                           .kv_memory = a->kv_memory,
                           .spec_k = a->spec_k > 0 ? a->spec_k : 4,
                           .draft_model = draft,
                           .spec_fixed_k = a->spec_fixed,
                           .cuda_graphs = a->cuda_graphs,
                           .eos = pd_tokenizer_eos(tok),
                           .bos = pd_tokenizer_bos(tok)};
    if (a->kv_dtype && strcmp(a->kv_dtype, "auto"))
        eo.kv_type = strcmp(a->kv_dtype, "f16") ? PD_KV_F32 : PD_KV_F16;
    if (s == PD_OK)
        s = pd_engine_new(m, k, &eo, &e);
    spec_run_t r = {.on_token = on_token, .user = user, .ids = ids};
    if (s == PD_OK) {
        pd_engine_request_t rq = {.prompt = prompt,
                                  .n_prompt = n_prompt,
                                  .max_tokens = a->max_tokens,
                                  .ignore_eos = a->ignore_eos,
                                  .sampling = a->sp,
                                  .on_token = token_cb,
                                  .on_finish = finish_cb,
                                  .user = &r};
        uint64_t id = 0;
        s = pd_engine_add(e, &rq, &id);
        while (s == PD_OK && !r.done) {
            s = pd_engine_step(e, NULL);
            if (r.stopped && !r.done)
                pd_engine_cancel(e, id);
        }
    }
    if (r.done) {
        st->n_prompt = n_prompt;
        st->n_gen = r.n;
        st->n_decode_steps = r.n > 0 ? r.n - 1 : 0;
        st->prompt_s = r.res.first_token_s - r.res.arrival_s;
        st->decode_s = r.res.finish_s - r.res.first_token_s;
        st->finish = r.res.finish == PD_ENGINE_FINISH_STOP || r.stopped ? PD_FINISH_STOP
                                                                         : PD_FINISH_LENGTH;
        sc->proposed = r.res.spec_proposed;
        sc->accepted = r.res.spec_accepted;
        if (r.res.finish == PD_ENGINE_FINISH_ERROR)
            s = r.res.status;
    }
    pd_engine_destroy(&e);
    pd_model_destroy(&draft);
    return s;
}
