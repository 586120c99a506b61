/* engine.c - see engine.h. Requests live on two intrusive lists (waiting: a queue with
 * preempted requests at its front; running: in the order they started, newest last).
 * A running request owns one row of the engine's block-table matrix (its slot), which
 * is also its sequence index in the varlen batch. */
#include "common/engine.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "kernels/cpu/threadpool.h"

/* A step draws on several host threads only when its draws cover at least this many
 * logits (rows times the vocabulary): about 0.2 ms of sampling, well above the cost
 * of waking the threads. */
#define PARALLEL_MIN_LOGITS (1 << 15)
/* The most sampling threads an engine starts, and its default on a device backend. */
#define MAX_SAMPLE_THREADS     256
#define DEFAULT_SAMPLE_THREADS 8

/* One token drawn ahead of its emission (draw_ahead), and the random state after it. */
typedef struct drawn {
    int32_t tok;
    bool accepted;
    uint64_t rng[4];
} drawn_t;

typedef struct req req_t;
struct req {
    uint64_t id;
    req_t *prev, *next;
    bool running, cancelled, started;
    int32_t *tokens; /* [cap]: the prompt, then the generated tokens */
    int32_t n_prompt, n_tokens, cap;
    int32_t max_tokens;
    bool ignore_eos;
    int32_t *stop;
    int32_t n_stop;
    pd_sampler_t *sampler;
    pd_engine_token_fn on_token;
    pd_engine_finish_fn on_finish;
    void *user;

    int32_t n_computed;   /* tokens whose KV is in the cache */
    int32_t slot;         /* row of the block tables while running, else -1 */
    int32_t n_blocks;     /* blocks held: the first n_blocks of the slot's row */
    pd_kv_hash_t *hashes; /* [max_blocks] chained hashes of full blocks */
    int32_t n_hashed;     /* ... computed so far */
    int32_t n_committed;  /* leading blocks committed (or found) in the prefix cache */
    int32_t cached_tokens, preemptions;
    double arrival_s, first_token_s;
    bool prefill_only;
    int32_t spec_k; /* most tokens proposed per step (0: no speculation) */
    int32_t *draft; /* [spec_k] this step's proposal */
    int32_t n_draft;
    int32_t n_logits;              /* rows of logits this step (1 + n_draft, or 0) */
    int32_t d_computed, n_dblocks; /* the draft model's KV: positions, blocks held */
    int32_t d_room;                /* proposals wanted from the draft this step */
    int64_t spec_proposed, spec_accepted;
    double spec_acc;     /* acceptance estimate (exponential average) */
    int32_t spec_idle;   /* steps since it last proposed with adaptive k = 0 */
    int32_t *pre_blocks; /* a prefilled request's blocks until it starts */
    int32_t n_pre;
    int finish_now; /* 0, or 1 + the finish of a prefilled request done at add */
    /* this step */
    int32_t sched; /* tokens scheduled */
    int32_t logit; /* its row of logits, or -1 */
    /* [1 + spec_k] when the engine draws in parallel: this step's draws in the order
     * advance() emits them, made ahead on a host thread (draw_ahead); n_drawn of
     * them, 0 when the step draws inline */
    drawn_t *drawn;
    int32_t n_drawn;
    uint64_t rng_before[4]; /* the random state before them */
};

typedef struct req_list {
    req_t *head, *tail;
    int32_t n;
} req_list_t;

struct pd_engine {
    const pd_model_t *model;
    pd_kernels_t *k;
    pd_model_config_t cfg;
    pd_llm_t *llm;
    pd_kv_pool_t *kv;
    int32_t max_seqs, max_T, max_len, bs, max_blocks;
    int32_t eos, bos;
    bool prefix_cache;
    uint64_t next_id;
    struct timespec t0;

    req_list_t waiting, running;
    int32_t *tables;     /* [max_seqs][max_blocks] */
    int32_t *free_slots; /* stack */
    int32_t n_free_slots;
    /* the batch of a step */
    int32_t *ids, *pos, *seq, *out_rows; /* [max_T], out_rows [max_seqs] */
    /* [max_T] the argmax of each logit row of a greedy step on a device backend
     * (the logits stay there), or of a draft pass */
    int32_t *row_ids;
    bool greedy_step; /* this step's tokens come from row_ids */
    req_t **sched;    /* [max_seqs] scheduled this step */
    int32_t n_sched;
    bool in_step;
    pd_engine_stats_t stats;
    struct pd_engine_layer_hook on_layer;
    pd_engine_progress_t *progress; /* [max_seqs] */
    int32_t spec_k, ngram_min, ngram_max;
    bool spec_fixed;
    double spec_rho;
    bool cuda_graphs; /* passed to both llms */
    /* the draft model's side (draft_model given) */
    pd_llm_t *dllm;
    pd_kv_pool_t *dkv;
    int32_t *dtables; /* [max_seqs][max_blocks], rows by slot as the target's */
    int32_t dmax_ctx;
    req_t **dreqs; /* [max_seqs] drafting this step */
    /* parallel draws (opts.sample_threads): the engine's own pool, or NULL with the
     * backend's host_run (sample_threads > 1) or none (sample_threads 1) */
    int32_t sample_threads;
    pd_threadpool_t *spool;
    req_t **draws; /* [max_seqs] the requests drawing this step */
    int32_t n_draws;
    const float *step_logits;
};

const char *pd_engine_finish_str(pd_engine_finish_t f)
{
    switch (f) {
    case PD_ENGINE_FINISH_STOP:
        return "stop";
    case PD_ENGINE_FINISH_LENGTH:
        return "length";
    case PD_ENGINE_FINISH_CANCELLED:
        return "cancelled";
    case PD_ENGINE_FINISH_ERROR:
        return "error";
    }
    return "none";
}

int32_t pd_engine_sample_threads(const pd_engine_t *e)
{
    return e->sample_threads;
}

double pd_engine_now(const pd_engine_t *e)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)(ts.tv_sec - e->t0.tv_sec) +
           (double)(ts.tv_nsec - e->t0.tv_nsec) * 1e-9;
}

/* ---- lists ------------------------------------------------------------------------- */

static void list_remove(req_list_t *l, req_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
    l->n--;
}

static void list_push(req_list_t *l, req_t *r, bool front)
{
    if (front) {
        r->prev = NULL;
        r->next = l->head;
        if (l->head)
            l->head->prev = r;
        else
            l->tail = r;
        l->head = r;
    } else {
        r->next = NULL;
        r->prev = l->tail;
        if (l->tail)
            l->tail->next = r;
        else
            l->head = r;
        l->tail = r;
    }
    l->n++;
}

/* ---- creation ---------------------------------------------------------------------- */

/* The draft model's llm, KV pool (as many blocks as the target's) and block tables,
 * after checking that it speaks the target's vocabulary. */
static pd_status_t draft_new(pd_engine_t *e, const pd_model_t *dm)
{
    const pd_tokenizer_t *a = pd_model_tokenizer(e->model), *b = pd_model_tokenizer(dm);
    int32_t nv = pd_tokenizer_n_vocab(a);
    bool same = pd_model_config(dm)->vocab_size == e->cfg.vocab_size &&
                pd_tokenizer_n_vocab(b) == nv;
    for (int32_t i = 0; same && i < nv; i++) {
        size_t la = 0, lb = 0;
        const char *pa = pd_tokenizer_piece(a, i, &la),
                   *pb = pd_tokenizer_piece(b, i, &lb);
        same = la == lb && (!la || memcmp(pa, pb, la) == 0);
    }
    if (!same) {
        PD_LOG_ERROR("draft model refused: its vocabulary (%d tokens) is not the model's "
                     "(%d tokens)",
                     pd_model_config(dm)->vocab_size, e->cfg.vocab_size);
        return PD_ERR_INVALID;
    }
    e->dmax_ctx = pd_model_config(dm)->ctx_len < e->max_len ? pd_model_config(dm)->ctx_len
                                                            : e->max_len;
    pd_llm_opts_t lo = {.max_ctx = e->dmax_ctx,
                        .max_batch_tokens = e->max_T,
                        .max_logits = e->max_seqs,
                        .no_private_kv = true,
                        .cuda_graphs = e->cuda_graphs};
    pd_kv_pool_opts_t po = {
        .block_size = e->bs, .n_blocks = pd_kv_pool_n_blocks(e->kv), .device = e->k};
    size_t rows = (size_t)e->max_seqs * (size_t)e->max_blocks;
    pd_status_t st = pd_llm_new(dm, e->k, &lo, &e->dllm);
    if (st == PD_OK)
        st = pd_kv_pool_new(dm, &po, &e->dkv);
    e->dtables = calloc(rows, sizeof *e->dtables);
    e->dreqs = malloc((size_t)e->max_seqs * sizeof *e->dreqs);
    if (st == PD_OK && (!e->dtables || !e->dreqs))
        st = PD_ERR_NOMEM;
    return st;
}

/* Resolves opts.sample_threads (engine.h) and starts the engine's own pool when it
 * needs one. A pool that cannot start leaves the draws on the engine thread. */
static pd_status_t sampling_new(pd_engine_t *e, int32_t want)
{
    e->sample_threads = 1;
    if (want > MAX_SAMPLE_THREADS)
        want = MAX_SAMPLE_THREADS;
    if (want <= 0 && e->k->host_run) {
        e->sample_threads = e->k->n_threads > 1 ? e->k->n_threads : 1;
    } else {
        if (want <= 0) {
            long n = sysconf(_SC_NPROCESSORS_ONLN);
            want = n < 1                        ? 1
                   : n < DEFAULT_SAMPLE_THREADS ? (int32_t)n
                                                : DEFAULT_SAMPLE_THREADS;
        }
        if (want > 1 && pd_threadpool_new(want, &e->spool) != PD_OK)
            PD_LOG_WARN(
                "engine: no pool of %d sampling threads: sampled tokens are drawn "
                "on the engine thread alone",
                want);
        else
            e->sample_threads = want;
    }
    if (e->sample_threads > 1) {
        e->draws = malloc((size_t)e->max_seqs * sizeof *e->draws);
        if (!e->draws)
            return PD_ERR_NOMEM;
    }
    return PD_OK;
}

/* The llm's layer hook: hands the step's progress table (filled before the forward
 * pass) to the engine's layer hook. */
static void layer_done(void *user, int layer)
{
    pd_engine_t *e = user;
    e->on_layer.fn(e->on_layer.user, layer, e->progress, e->n_sched);
}

pd_status_t pd_engine_new(const pd_model_t *model, pd_kernels_t *kernels,
                          const pd_engine_opts_t *opts, pd_engine_t **engine_p)
{
    pd_engine_opts_t o = opts ? *opts : (pd_engine_opts_t){0};
    pd_engine_t *e = calloc(1, sizeof *e);
    if (!e)
        return PD_ERR_NOMEM;
    clock_gettime(CLOCK_MONOTONIC, &e->t0);
    e->model = model;
    e->k = kernels;
    e->cfg = *pd_model_config(model);
    e->max_seqs = o.max_num_seqs > 0 ? o.max_num_seqs : 64;
    e->max_T = o.max_batch_tokens > 0 ? o.max_batch_tokens : 512;
    if (e->max_T < e->max_seqs) /* every running sequence must fit one step */
        e->max_T = e->max_seqs;
    int32_t max_ctx =
        o.max_ctx > 0 && o.max_ctx < e->cfg.ctx_len ? o.max_ctx : e->cfg.ctx_len;
    e->bs = o.block_size > 0 ? o.block_size : 16;
    e->eos = o.eos;
    e->bos = o.bos;
    e->prefix_cache = !o.no_prefix_cache;
    e->cuda_graphs = o.cuda_graphs;

    pd_kv_pool_opts_t po = {
        .block_size = e->bs, .kv_type = o.kv_type, .device = kernels, .host = o.kv_host};
    if (o.kv_blocks > 0) {
        po.n_blocks = o.kv_blocks;
    } else if (o.kv_memory > 0) {
        po.memory_bytes = o.kv_memory;
    } else {
        int64_t per_seq = (max_ctx + e->bs - 1) / e->bs;
        int64_t want = per_seq * e->max_seqs * (int64_t)pd_kv_block_bytes(model, &po);
        po.memory_bytes = want < (1LL << 30) ? want : (1LL << 30);
    }
    pd_status_t st = pd_kv_pool_new(model, &po, &e->kv);
    if (st != PD_OK) {
        free(e);
        return st;
    }
    int64_t pool_tokens = (int64_t)pd_kv_pool_n_blocks(e->kv) * e->bs;
    e->max_len = pool_tokens < max_ctx ? (int32_t)pool_tokens : max_ctx;
    e->max_blocks = (e->max_len + e->bs - 1) / e->bs;

    e->spec_k = o.spec_k > 0 ? o.spec_k : 0;
    e->spec_fixed = o.spec_fixed_k;
    e->spec_rho = o.spec_row_cost > 0 ? o.spec_row_cost : 0.1;
    e->ngram_min = o.spec_ngram_min > 0 ? o.spec_ngram_min : 1;
    e->ngram_max = o.spec_ngram_max > 0 ? o.spec_ngram_max : 4;
    if (e->ngram_max < e->ngram_min)
        e->ngram_max = e->ngram_min;
    /* every row may need logits when sequences verify proposals */
    int64_t max_logits = (int64_t)e->max_seqs * (1 + e->spec_k);
    pd_llm_opts_t lo = {.max_ctx = e->max_len,
                        .max_batch_tokens = e->max_T,
                        .max_logits =
                            (int32_t)(max_logits < e->max_T ? max_logits : e->max_T),
                        .no_private_kv = true,
                        .cuda_graphs = o.cuda_graphs};
    st = pd_llm_new(model, kernels, &lo, &e->llm);
    size_t T = (size_t)e->max_T, S = (size_t)e->max_seqs;
    if (st == PD_OK) {
        e->tables = malloc(S * (size_t)e->max_blocks * sizeof *e->tables);
        e->free_slots = malloc(S * sizeof *e->free_slots);
        e->ids = malloc(T * sizeof *e->ids);
        e->pos = malloc(T * sizeof *e->pos);
        e->seq = malloc(T * sizeof *e->seq);
        e->out_rows = malloc(T * sizeof *e->out_rows);
        e->row_ids = malloc(T * sizeof *e->row_ids);
        e->sched = malloc(S * sizeof *e->sched);
        e->progress = malloc(S * sizeof *e->progress);
        if (!e->tables || !e->free_slots || !e->ids || !e->pos || !e->seq ||
            !e->out_rows || !e->row_ids || !e->sched || !e->progress)
            st = PD_ERR_NOMEM;
    }
    if (st == PD_OK)
        st = sampling_new(e, o.sample_threads);
    if (st != PD_OK) {
        PD_LOG_ERROR("cannot create the engine: %s", pd_status_str(st));
        pd_engine_destroy(&e);
        return st;
    }
    for (size_t i = 0; i < S * (size_t)e->max_blocks; i++)
        e->tables[i] = 0; /* unused entries still name a valid block */
    for (int32_t s = 0; s < e->max_seqs; s++)
        e->free_slots[s] = e->max_seqs - 1 - s;
    e->n_free_slots = e->max_seqs;
    if (o.draft_model && draft_new(e, o.draft_model) != PD_OK) {
        pd_engine_destroy(&e);
        return PD_ERR_INVALID;
    }
    e->on_layer = o.on_layer;
    if (e->on_layer.fn)
        pd_llm_set_layer_hook(e->llm, layer_done, e);
    *engine_p = e;
    return PD_OK;
}

static void req_free(req_t *r)
{
    free(r->pre_blocks);
    free(r->draft);
    free(r->drawn);
    pd_sampler_destroy(&r->sampler);
    free(r->tokens);
    free(r->stop);
    free(r->hashes);
    free(r);
}

void pd_engine_destroy(pd_engine_t **engine_p)
{
    if (!engine_p || !*engine_p)
        return;
    pd_engine_t *e = *engine_p;
    req_list_t *lists[2] = {&e->waiting, &e->running};
    for (int i = 0; i < 2; i++)
        while (lists[i]->head) {
            req_t *r = lists[i]->head;
            list_remove(lists[i], r);
            req_free(r);
        }
    pd_llm_destroy(&e->llm);
    pd_kv_pool_destroy(&e->kv);
    free(e->tables);
    free(e->free_slots);
    free(e->ids);
    free(e->pos);
    free(e->seq);
    free(e->out_rows);
    free(e->row_ids);
    free(e->sched);
    free(e->progress);
    pd_llm_destroy(&e->dllm);
    pd_kv_pool_destroy(&e->dkv);
    free(e->dtables);
    free(e->dreqs);
    pd_threadpool_destroy(&e->spool);
    free(e->draws);
    free(e);
    *engine_p = NULL;
}

/* ---- requests ---------------------------------------------------------------------- */

static bool is_stop(const pd_engine_t *e, const req_t *r, int32_t tok);
static int32_t *row_of(pd_engine_t *e, const req_t *r);

pd_status_t pd_engine_add(pd_engine_t *e, const pd_engine_request_t *q, uint64_t *id_p)
{
    if (!q || !q->prompt || q->n_prompt < 1 || q->n_stop < 0 ||
        (q->n_stop && !q->stop_ids)) {
        PD_LOG_ERROR("request refused: an empty prompt or bad stop ids");
        return PD_ERR_INVALID;
    }
    if (q->n_prompt >= e->max_len) {
        PD_LOG_ERROR("request refused: a prompt of %d tokens leaves no room for output "
                     "in the longest sequence of %d tokens (context %d, kv pool %lld)",
                     q->n_prompt, e->max_len, e->cfg.ctx_len,
                     (long long)pd_kv_pool_n_blocks(e->kv) * e->bs);
        return PD_ERR_RANGE;
    }
    for (int32_t i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= e->cfg.vocab_size) {
            PD_LOG_ERROR("request refused: token %d at %d outside the vocabulary (%d)",
                         q->prompt[i], i, e->cfg.vocab_size);
            return PD_ERR_RANGE;
        }
    pd_status_t st = pd_sampler_params_check(&q->sampling);
    if (st != PD_OK)
        return st;
    int32_t n_pre = q->kv_blocks ? (q->n_prompt + e->bs - 1) / e->bs : 0;
    if (q->kv_blocks) {
        if (q->prefill_only || q->first_token < 0 ||
            q->first_token >= e->cfg.vocab_size) {
            PD_LOG_ERROR("request refused: a prefilled request with first token %d "
                         "(vocabulary %d)%s",
                         q->first_token, e->cfg.vocab_size,
                         q->prefill_only ? " cannot also be prefill-only" : "");
            return PD_ERR_INVALID;
        }
        for (int32_t i = 0; i < n_pre; i++)
            if (q->kv_blocks[i] < 0 || q->kv_blocks[i] >= pd_kv_pool_n_blocks(e->kv)) {
                PD_LOG_ERROR("request refused: KV block %d outside the pool",
                             q->kv_blocks[i]);
                return PD_ERR_RANGE;
            }
    }
    req_t *r = calloc(1, sizeof *r);
    if (!r)
        return PD_ERR_NOMEM;
    int64_t cap = (int64_t)e->max_len + 1; /* the last token is never computed */
    int32_t max_tokens = q->prefill_only ? 1 : q->max_tokens;
    if (max_tokens > 0 && (int64_t)q->n_prompt + max_tokens < cap)
        cap = (int64_t)q->n_prompt + max_tokens;
    r->cap = (int32_t)cap;
    r->tokens = malloc((size_t)cap * sizeof *r->tokens);
    r->hashes = malloc((size_t)e->max_blocks * sizeof *r->hashes);
    r->stop = q->n_stop ? malloc((size_t)q->n_stop * sizeof *r->stop) : NULL;
    r->pre_blocks = n_pre ? malloc((size_t)n_pre * sizeof *r->pre_blocks) : NULL;
    st = pd_sampler_new(e->cfg.vocab_size, &q->sampling, &r->sampler);
    if (st != PD_OK || !r->tokens || !r->hashes || (q->n_stop && !r->stop) ||
        (n_pre && !r->pre_blocks)) {
        req_free(r);
        return st != PD_OK ? st : PD_ERR_NOMEM;
    }
    memcpy(r->tokens, q->prompt, (size_t)q->n_prompt * sizeof *r->tokens);
    if (q->n_stop)
        memcpy(r->stop, q->stop_ids, (size_t)q->n_stop * sizeof *r->stop);
    r->n_stop = q->n_stop;
    r->n_prompt = r->n_tokens = q->n_prompt;
    r->max_tokens = max_tokens;
    r->prefill_only = q->prefill_only;
    r->spec_k = q->spec_k < 0                             ? 0
                : q->spec_k == 0 || q->spec_k > e->spec_k ? e->spec_k
                                                          : q->spec_k;
    r->spec_acc = 0.6; /* optimistic until it has history */
    if (q->prefill_only)
        r->spec_k = 0;
    if (r->spec_k) {
        r->draft = malloc((size_t)r->spec_k * sizeof *r->draft);
        if (!r->draft) {
            req_free(r);
            return PD_ERR_NOMEM;
        }
    }
    if (e->sample_threads > 1) {
        r->drawn = malloc((size_t)(1 + r->spec_k) * sizeof *r->drawn);
        if (!r->drawn) {
            req_free(r);
            return PD_ERR_NOMEM;
        }
    }
    if (q->rng_state)
        pd_sampler_set_state(r->sampler, q->rng_state);
    r->ignore_eos = q->ignore_eos;
    r->on_token = q->on_token;
    r->on_finish = q->on_finish;
    r->user = q->user;
    r->slot = -1;
    r->logit = -1;
    r->id = ++e->next_id;
    r->arrival_s = pd_engine_now(e);
    if (n_pre) {
        memcpy(r->pre_blocks, q->kv_blocks, (size_t)n_pre * sizeof *r->pre_blocks);
        r->n_pre = n_pre;
        r->tokens[r->n_tokens++] = q->first_token;
        r->first_token_s = r->arrival_s;
        if (is_stop(e, r, q->first_token))
            r->finish_now = 1 + PD_ENGINE_FINISH_STOP;
        else if (r->n_tokens >= r->cap)
            r->finish_now = 1 + PD_ENGINE_FINISH_LENGTH;
    }
    list_push(&e->waiting, r, false);
    if (id_p)
        *id_p = r->id;
    return PD_OK;
}

/* Releases the request's blocks and slot; it stays on the running list. */
static void drop_blocks(pd_engine_t *e, req_t *r)
{
    if (r->pre_blocks) {
        pd_kv_pool_release(e->kv, r->pre_blocks, r->n_pre);
        free(r->pre_blocks);
        r->pre_blocks = NULL;
        r->n_pre = 0;
    }
    if (r->slot < 0)
        return;
    if (e->dkv && r->n_dblocks)
        pd_kv_pool_release(e->dkv, e->dtables + (size_t)r->slot * (size_t)e->max_blocks,
                           r->n_dblocks);
    r->n_dblocks = 0;
    r->d_computed = 0;
    pd_kv_pool_release(e->kv, e->tables + (size_t)r->slot * (size_t)e->max_blocks,
                       r->n_blocks);
    r->n_blocks = 0;
    r->n_committed = 0;
    r->n_computed = 0;
    e->free_slots[e->n_free_slots++] = r->slot;
    r->slot = -1;
}

static void finish(pd_engine_t *e, req_t *r, pd_engine_finish_t why, pd_status_t st)
{
    /* a finished prefill-only request hands its prompt's blocks over */
    bool hand_over = r->prefill_only && r->slot >= 0 && r->n_tokens > r->n_prompt &&
                     (why == PD_ENGINE_FINISH_LENGTH || why == PD_ENGINE_FINISH_STOP);
    int32_t n_kv = hand_over ? (r->n_prompt + e->bs - 1) / e->bs : 0;
    if (hand_over) {
        int32_t *row = row_of(e, r);
        if (r->n_blocks > n_kv) /* cannot happen: prefill never grows past the prompt */
            pd_kv_pool_release(e->kv, row + n_kv, r->n_blocks - n_kv);
        r->n_blocks = 0; /* the references move to the callee */
    }
    int32_t *kv_row = hand_over ? row_of(e, r) : NULL;
    drop_blocks(e, r);
    list_remove(r->running ? &e->running : &e->waiting, r);
    pd_engine_result_t res = {.id = r->id,
                              .finish = why,
                              .status = st,
                              .ids = r->tokens + r->n_prompt,
                              .n_gen = r->n_tokens - r->n_prompt,
                              .n_prompt = r->n_prompt,
                              .cached_tokens = r->cached_tokens,
                              .preemptions = r->preemptions,
                              .arrival_s = r->arrival_s,
                              .first_token_s = r->first_token_s,
                              .finish_s = pd_engine_now(e),
                              .kv_blocks = kv_row,
                              .n_kv_blocks = n_kv,
                              .spec_proposed = r->spec_proposed,
                              .spec_accepted = r->spec_accepted};
    pd_sampler_get_state(r->sampler, res.rng_state);
    if (r->on_finish)
        r->on_finish(r->user, &res);
    req_free(r);
}

static req_t *find_req(pd_engine_t *e, uint64_t id)
{
    req_list_t *lists[2] = {&e->running, &e->waiting};
    for (int i = 0; i < 2; i++)
        for (req_t *r = lists[i]->head; r; r = r->next)
            if (r->id == id)
                return r;
    return NULL;
}

pd_status_t pd_engine_cancel(pd_engine_t *e, uint64_t id)
{
    req_t *r = find_req(e, id);
    if (!r || r->cancelled)
        return PD_ERR_NOT_FOUND;
    if (e->in_step) {
        r->cancelled = true; /* finished once the step's batch is done */
        return PD_OK;
    }
    finish(e, r, PD_ENGINE_FINISH_CANCELLED, PD_OK);
    return PD_OK;
}

int32_t pd_engine_n_pending(const pd_engine_t *e)
{
    return e->waiting.n + e->running.n;
}

int32_t pd_engine_n_running(const pd_engine_t *e)
{
    return e->running.n;
}

pd_status_t pd_engine_rng_state(const pd_engine_t *e, uint64_t id, uint64_t out[4])
{
    req_t *r = find_req((pd_engine_t *)e, id);
    if (!r)
        return PD_ERR_NOT_FOUND;
    pd_sampler_get_state(r->sampler, out);
    return PD_OK;
}

pd_engine_stats_t pd_engine_stats(const pd_engine_t *e)
{
    return e->stats;
}

pd_kv_pool_t *pd_engine_kv(pd_engine_t *e)
{
    return e->kv;
}

int32_t pd_engine_max_seq_len(const pd_engine_t *e)
{
    return e->max_len;
}

void pd_engine_graph_stats(const pd_engine_t *e, pd_llm_graph_stats_t *stats_p)
{
    pd_llm_graph_stats(e->llm, stats_p);
    if (e->dllm) {
        pd_llm_graph_stats_t d;
        pd_llm_graph_stats(e->dllm, &d);
        stats_p->captures += d.captures;
        stats_p->replays += d.replays;
        stats_p->fallbacks += d.fallbacks;
        stats_p->eager += d.eager;
        stats_p->dropped += d.dropped;
        stats_p->cached += d.cached;
    }
}

/* ---- scheduling -------------------------------------------------------------------- */

static int32_t *row_of(pd_engine_t *e, const req_t *r)
{
    return e->tables + (size_t)r->slot * (size_t)e->max_blocks;
}

/* The chained hash of full block b of r's tokens (computing the chain up to it). */
static const pd_kv_hash_t *block_hash(pd_engine_t *e, req_t *r, int32_t b)
{
    for (; r->n_hashed <= b; r->n_hashed++) {
        int32_t i = r->n_hashed;
        r->hashes[i] = pd_kv_hash_block(e->kv, i ? &r->hashes[i - 1] : NULL,
                                        r->tokens + (size_t)i * (size_t)e->bs);
    }
    return &r->hashes[b];
}

/* Blocks so that r holds positions below upto; false (nothing taken) if the pool is
 * short. */
static bool grow(pd_engine_t *e, req_t *r, int32_t upto)
{
    int32_t need = (upto + e->bs - 1) / e->bs - r->n_blocks;
    if (need <= 0)
        return true;
    if (pd_kv_pool_alloc(e->kv, need, row_of(e, r) + r->n_blocks) != PD_OK)
        return false;
    r->n_blocks += need;
    return true;
}

static void preempt(pd_engine_t *e, req_t *r)
{
    r->n_draft = 0;
    r->d_room = 0;
    drop_blocks(e, r);
    list_remove(&e->running, r);
    r->running = false;
    r->preemptions++;
    e->stats.preemptions++;
    list_push(&e->waiting, r, true);
}

/* Takes the longest cached prefix of r's tokens (leaving at least one to compute). */
static void take_prefix(pd_engine_t *e, req_t *r)
{
    int32_t *row = row_of(e, r);
    int32_t n_full = (r->n_tokens - 1) / e->bs;
    int32_t b = 0;
    for (; b < n_full; b++) {
        const pd_kv_hash_t *h = block_hash(e, r, b);
        int32_t id = pd_kv_pool_lookup(e->kv, *h, b ? &r->hashes[b - 1] : NULL,
                                       r->tokens + (size_t)b * (size_t)e->bs);
        if (id < 0)
            break;
        row[b] = id;
    }
    r->n_blocks = r->n_committed = b;
    r->n_computed = b * e->bs;
}

static void schedule(pd_engine_t *e, req_t *r, int32_t n, int32_t *budget)
{
    r->sched = n;
    r->logit = -1;
    r->n_drawn = 0;
    e->sched[e->n_sched++] = r;
    *budget -= n;
}

/* n-gram prompt lookup: the tokens that followed the latest earlier occurrence of the
 * sequence's last n tokens (n from ngram_max down to ngram_min), at most spec_k, the
 * room left before max_tokens or the longest sequence, and `room` (the budget). */
/* The k a sequence proposes this step (see pd_engine_opts_t.spec_fixed_k). */
static int32_t adaptive_k(const pd_engine_t *e, req_t *r)
{
    if (e->spec_fixed)
        return r->spec_k;
    double rb = e->spec_rho * (double)e->running.n, pen = rb / (1.0 + rb);
    if (e->dllm) { /* a draft pass per proposed token, relative to a target step */
        const pd_engine_stats_t *s = &e->stats;
        pen += s->spec_draft_steps > 0 && s->steps > 0 && s->forward_s > 0
                   ? (s->spec_draft_step_s / (double)s->spec_draft_steps) /
                         (s->forward_s / (double)s->steps)
                   : 0.3;
    }
    double a = r->spec_acc, term = 1.0, len = 1.0, best_v = 1.0;
    int32_t best = 0;
    for (int32_t k = 1; k <= r->spec_k; k++) {
        term *= a;
        len += term; /* expected tokens from k proposals: 1 + a + ... + a^k */
        double v = len - pen * (double)k;
        if (v > best_v) {
            best_v = v;
            best = k;
        }
    }
    /* look again now and then, while even certain acceptance would pay (a probe costs
     * the draft a catch-up over everything since it last proposed) */
    if (best == 0 && pen < 1.0 && ++r->spec_idle >= 32) {
        r->spec_idle = 0;
        best = 1;
    }
    return best;
}

static int32_t spec_room(const pd_engine_t *e, req_t *r, int32_t room)
{
    int32_t len = r->n_tokens;
    int32_t want = adaptive_k(e, r);
    int32_t k = want < room ? want : room;
    if (r->cap - len - 1 < k) /* accepting all must leave room for the bonus token */
        k = r->cap - len - 1;
    if (e->max_len - len < k) /* positions len .. len + k - 1 must fit */
        k = e->max_len - len;
    if (e->dllm && e->dmax_ctx - len < k) /* and the draft's positions up to len+k-2 */
        k = e->dmax_ctx - len;
    return k > 0 ? k : 0;
}

static void propose(pd_engine_t *e, req_t *r, int32_t room)
{
    int32_t len = r->n_tokens;
    int32_t k = spec_room(e, r, room);
    if (k <= 0)
        return;
    const int32_t *t = r->tokens;
    for (int32_t n = e->ngram_max; n >= e->ngram_min; n--) {
        if (n >= len)
            continue;
        const int32_t *suffix = t + len - n;
        for (int32_t j = len - n - 1; j >= 0; j--) {
            if (t[j] != suffix[0] || memcmp(t + j, suffix, (size_t)n * sizeof *t) != 0)
                continue;
            int32_t avail = len - (j + n);
            int32_t d = avail < k ? avail : k;
            memcpy(r->draft, t + j + n, (size_t)d * sizeof *t);
            r->n_draft = d;
            return;
        }
    }
}

/* Draft blocks so that r's draft KV holds positions below upto. */
static bool dgrow(pd_engine_t *e, req_t *r, int32_t upto)
{
    int32_t need = (upto + e->bs - 1) / e->bs - r->n_dblocks;
    if (need <= 0)
        return true;
    int32_t *row = e->dtables + (size_t)r->slot * (size_t)e->max_blocks + r->n_dblocks;
    if (pd_kv_pool_alloc(e->dkv, need, row) != PD_OK)
        return false;
    r->n_dblocks += need;
    return true;
}

/* One batched pass of the draft over the staged rows; the argmax of each output row
 * is the next proposal of e->dreqs[i]. */
static bool draft_pass(pd_engine_t *e, int32_t T, int32_t n_out)
{
    pd_llm_batch_t b = {.T = T,
                        .ids = e->ids,
                        .pos = e->pos,
                        .seq = e->seq,
                        .n_seqs = e->max_seqs,
                        .bt_stride = e->max_blocks,
                        .block_tables = e->dtables,
                        .out_rows = e->out_rows,
                        .n_out = n_out};
    e->stats.spec_draft_passes++;
    if (pd_llm_forward_batch_ids(e->dllm, e->dkv, &b, e->row_ids) != PD_OK) {
        PD_LOG_WARN("engine: the draft model's pass failed; no proposals this step");
        return false;
    }
    for (int32_t i = 0; i < n_out; i++) {
        req_t *r = e->dreqs[i];
        r->draft[r->n_draft++] = e->row_ids[i];
    }
    return true;
}

/* The draft model's proposals for the scheduled sequences that want them (d_room):
 * first a pass that catches each one's draft KV up with its tokens (the prompt on its
 * first step, then the tokens accepted since; a catch-up longer than the budget left
 * runs in part and proposes nothing this step), then one pass per further proposal.
 * The draft proposes greedily; verification treats the proposal as deterministic. */
static void draft_propose(pd_engine_t *e)
{
    int32_t t = 0, nd = 0;
    for (int32_t i = 0; i < e->n_sched; i++) {
        req_t *r = e->sched[i];
        if (r->d_room <= 0)
            continue;
        int32_t c = r->n_tokens - r->d_computed, avail = e->max_T - t;
        bool full = c <= avail;
        int32_t take = full ? c : avail;
        if (take <= 0 ||
            !dgrow(e, r, r->d_computed + take + (full ? r->d_room - 1 : 0))) {
            r->d_room = 0;
            continue;
        }
        for (int32_t j = 0; j < take; j++, t++) {
            e->ids[t] = r->tokens[r->d_computed + j];
            e->pos[t] = r->d_computed + j;
            e->seq[t] = r->slot;
        }
        r->d_computed += take;
        if (full) {
            e->out_rows[nd] = t - 1;
            e->dreqs[nd++] = r;
        } else {
            r->d_room = 0;
        }
    }
    if (t == 0 || !draft_pass(e, t, nd))
        return;
    for (int32_t pass = 1;; pass++) {
        int32_t n = 0;
        for (int32_t i = 0; i < e->n_sched; i++) {
            req_t *r = e->sched[i];
            if (r->d_room <= 0 || r->n_draft == 0 || r->n_draft >= r->d_room)
                continue;
            e->ids[n] = r->draft[r->n_draft - 1];
            e->pos[n] = r->n_tokens + r->n_draft - 1;
            e->seq[n] = r->slot;
            e->out_rows[n] = n;
            e->dreqs[n++] = r;
            r->d_computed++;
        }
        if (n == 0)
            return;
        double t0 = pd_engine_now(e);
        bool ok = draft_pass(e, n, n);
        e->stats.spec_draft_step_s += pd_engine_now(e) - t0;
        e->stats.spec_draft_steps++;
        if (!ok)
            return;
    }
}

/* Fills e->sched; returns the tokens scheduled. */
static int32_t schedule_step(pd_engine_t *e)
{
    int32_t budget = e->max_T;
    bool preempted = false;
    e->n_sched = 0;
    for (req_t *r = e->running.head, *next; r && budget > 0; r = next) {
        next = r->next;
        int32_t n = r->n_tokens - r->n_computed;
        r->n_draft = 0;
        r->d_room = 0;
        if (n == 1 && r->spec_k && budget > 1) {
            if (e->dllm) { /* the draft runs once the batch is known */
                r->d_room = spec_room(e, r, budget - 1);
                n += r->d_room;
            } else {
                propose(e, r, budget - 1);
                n += r->n_draft;
            }
        }
        n = n < budget ? n : budget;
        bool self = false;
        while (!grow(e, r, r->n_computed + n)) {
            req_t *victim = e->running.tail;
            preempted = true;
            if (victim == r) {
                self = true;
                break;
            }
            if (victim == next)
                next = NULL; /* it was the last one after r */
            preempt(e, victim);
        }
        if (self) {
            preempt(e, r);
            break;
        }
        schedule(e, r, n, &budget);
    }
    while (!preempted && e->waiting.head && e->running.n < e->max_seqs && budget > 0) {
        req_t *r = e->waiting.head;
        r->slot = e->free_slots[--e->n_free_slots];
        bool prefilled = r->pre_blocks != NULL;
        if (prefilled) {
            /* prefilled: its prompt's KV is in hand (in the host copy of a device
             * pool, where the transfer put it, or with no host copy already in the
             * device pool: CUDA IPC); only the first token to compute */
            if (pd_kv_pool_host(e->kv) != PD_KV_HOST_NONE &&
                pd_kv_pool_upload(e->kv, -1, r->pre_blocks, r->n_pre) != PD_OK)
                PD_LOG_ERROR("request %llu: its KV could not be moved to the device "
                             "(the device's error is sticky: this step's pass fails and "
                             "ends its requests with an error)",
                             (unsigned long long)r->id);
            memcpy(row_of(e, r), r->pre_blocks, (size_t)r->n_pre * sizeof *r->pre_blocks);
            r->n_blocks = r->n_pre;
            r->n_computed = r->n_prompt;
            free(r->pre_blocks);
            r->pre_blocks = NULL;
            r->n_pre = 0;
        } else if (e->prefix_cache) {
            take_prefix(e, r);
        }
        int32_t n = r->n_tokens - r->n_computed;
        n = n < budget ? n : budget;
        if (!grow(e, r, r->n_computed + n)) {
            drop_blocks(e, r); /* the prefix it took, and its slot */
            break;
        }
        if (!r->started) {
            r->started = true;
            r->cached_tokens = prefilled ? 0 : r->n_computed;
            e->stats.cached_tokens += r->cached_tokens;
            e->stats.query_tokens += r->n_prompt;
        }
        list_remove(&e->waiting, r);
        list_push(&e->running, r, false);
        r->running = true;
        r->n_draft = 0;
        r->d_room = 0;
        schedule(e, r, n, &budget);
    }
    return e->max_T - budget;
}

/* ---- a step ------------------------------------------------------------------------ */

static bool is_stop(const pd_engine_t *e, const req_t *r, int32_t tok)
{
    if (!r->ignore_eos && tok >= 0 && (tok == e->eos || tok == e->bos))
        return true;
    for (int32_t i = 0; i < r->n_stop; i++)
        if (r->stop[i] == tok)
            return true;
    return false;
}

/* After the forward pass: commits full blocks, samples, finishes. */
/* Commits the full blocks whose KV is computed to the prefix cache. */
static void commit_full_blocks(pd_engine_t *e, req_t *r)
{
    if (!e->prefix_cache)
        return;
    int32_t *row = row_of(e, r);
    for (int32_t b = r->n_committed; b < r->n_computed / e->bs; b++) {
        const pd_kv_hash_t *h = block_hash(e, r, b);
        pd_kv_pool_commit(e->kv, row[b], *h, b ? &r->hashes[b - 1] : NULL,
                          r->tokens + (size_t)b * (size_t)e->bs);
        r->n_committed = b + 1;
    }
}

/* r's sampler on logit row `row` (against `proposed` when accepted is not NULL). */
static int32_t sample_row(const pd_engine_t *e, req_t *r, int32_t row,
                          const float *logits, int32_t proposed, bool *accepted)
{
    const float *x = logits + (size_t)row * (size_t)e->cfg.vocab_size;
    return accepted ? pd_sampler_sample_spec(r->sampler, x, proposed, accepted)
                    : pd_sampler_sample(r->sampler, x);
}

/* The token of logit row `row` for r: the device's argmax in a greedy step, else the
 * draw made ahead for that row (its random state restored, so that the sampler is
 * where the inline draw would have left it), else r's sampler on the row. */
static int32_t draw(pd_engine_t *e, req_t *r, int32_t row, const float *logits,
                    int32_t proposed, bool *accepted)
{
    if (e->greedy_step) {
        int32_t t = e->row_ids[row];
        if (accepted)
            *accepted = t == proposed;
        return t;
    }
    int32_t j = row - r->logit;
    if (j >= 0 && j < r->n_drawn) {
        const drawn_t *d = &r->drawn[j];
        pd_sampler_set_state(r->sampler, d->rng);
        if (accepted)
            *accepted = d->accepted;
        return d->tok;
    }
    return sample_row(e, r, row, logits, proposed, accepted);
}

/* Verifies a proposal: at each row the target's token is drawn against the proposed
 * one (pd_sampler_sample_spec: greedy keeps it when it is the argmax, sampling accepts
 * it with the target's probability and otherwise draws from the rest), kept while
 * accepted; the first rejection's draw (or a draw after the last proposed) is the
 * bonus. Returns the tokens emitted (accepted + 1); the KV of rejected positions stays
 * behind n_computed, to be overwritten. Finishes the request on a stop token or at its
 * length, so r may be gone when it returns -1. */
static int32_t verify(pd_engine_t *e, req_t *r, const float *logits)
{
    int32_t emitted = 0;
    e->stats.spec_steps++;
    e->stats.spec_proposed += r->n_draft;
    r->spec_proposed += r->n_draft;
    int64_t acc0 = r->spec_accepted;
    for (int32_t j = 0; j <= r->n_draft; j++) {
        bool accepted = false;
        int32_t tok = draw(e, r, r->logit + j, logits, j < r->n_draft ? r->draft[j] : -1,
                           j < r->n_draft ? &accepted : NULL);
        r->tokens[r->n_tokens++] = tok;
        emitted++;
        e->stats.gen_tokens++;
        if (accepted) {
            e->stats.spec_accepted++;
            r->spec_accepted++;
        }
        if (r->on_token)
            r->on_token(r->user, r->id, tok);
        if (is_stop(e, r, tok)) {
            finish(e, r, PD_ENGINE_FINISH_STOP, PD_OK);
            return -1;
        }
        if (r->n_tokens >= r->cap) {
            finish(e, r, PD_ENGINE_FINISH_LENGTH, PD_OK);
            return -1;
        }
        if (!accepted)
            break;
    }
    double obs = (double)(r->spec_accepted - acc0) / (double)r->n_draft;
    r->spec_acc = 0.8 * r->spec_acc + 0.2 * obs;
    return emitted;
}

/* Makes the draws that advance() will make for r this step, in its order and with its
 * ends (the first rejected proposal, a stop token, the length cap), and keeps each
 * with the random state after it. Reads r, its sampler and the logits only, so that
 * requests draw on different threads at once. */
static void predraw(const pd_engine_t *e, req_t *r, const float *logits)
{
    int32_t n_tokens = r->n_tokens;
    r->n_drawn = 0;
    pd_sampler_get_state(r->sampler, r->rng_before);
    for (int32_t j = 0; j <= r->n_draft; j++) {
        drawn_t *d = &r->drawn[j];
        d->accepted = false;
        d->tok = sample_row(e, r, r->logit + j, logits, j < r->n_draft ? r->draft[j] : -1,
                            j < r->n_draft ? &d->accepted : NULL);
        pd_sampler_get_state(r->sampler, d->rng);
        r->n_drawn++;
        if (is_stop(e, r, d->tok) || ++n_tokens >= r->cap || !d->accepted)
            break;
    }
}

static void draw_task(void *arg, int64_t task, int thread)
{
    (void)thread;
    pd_engine_t *e = arg;
    predraw(e, e->draws[task], e->step_logits);
}

/* Draws the step's sampled tokens ahead of advance(), one request per task on the
 * sampling threads, when the step has enough of them to pay for the threads. Every
 * request's draws stay in its own order on one thread, so the tokens are those of
 * inline draws: only their timing moves. A request cancelled by a callback before its
 * turn emits none of them and gets its random state back (advance). */
static void draw_ahead(pd_engine_t *e, const float *logits)
{
    int64_t rows = 0;
    e->n_draws = 0;
    for (int32_t i = 0; i < e->n_sched; i++) {
        req_t *r = e->sched[i];
        if (r->logit < 0 || r->cancelled)
            continue;
        e->draws[e->n_draws++] = r;
        rows += 1 + r->n_draft;
    }
    if (e->n_draws < 2 || rows * e->cfg.vocab_size < PARALLEL_MIN_LOGITS)
        return;
    e->step_logits = logits;
    if (e->spool)
        pd_threadpool_run(e->spool, e->n_draws, draw_task, e);
    else
        e->k->host_run(e->k, e->n_draws, draw_task, e);
    e->stats.sample_parallel_steps++;
}

/* After the forward pass: commits full blocks, samples, finishes. */
static void advance(pd_engine_t *e, req_t *r, const float *logits)
{
    if (r->cancelled && r->n_drawn > 0) /* drawn ahead, never to be emitted */
        pd_sampler_set_state(r->sampler, r->rng_before);
    if (r->n_draft > 0 && !r->cancelled) {
        int32_t p = r->n_computed; /* the pending token's position */
        int32_t emitted = verify(e, r, logits);
        if (emitted < 0)
            return; /* finished */
        /* valid KV: the pending token and the accepted proposals (the draft's too) */
        r->n_computed = p + emitted;
        if (r->d_computed > p + emitted)
            r->d_computed = p + emitted;
        r->n_draft = 0;
        commit_full_blocks(e, r);
        return;
    }
    r->n_draft = 0;
    int32_t prompt_part = r->n_prompt - r->n_computed;
    e->stats.prompt_tokens += prompt_part < 0          ? 0
                              : prompt_part < r->sched ? prompt_part
                                                       : r->sched;
    r->n_computed += r->sched;
    commit_full_blocks(e, r);
    if (r->logit < 0 || r->cancelled)
        return;
    int32_t tok = draw(e, r, r->logit, logits, -1, NULL);
    r->tokens[r->n_tokens++] = tok;
    e->stats.gen_tokens++;
    if (r->n_tokens == r->n_prompt + 1 && !r->first_token_s)
        r->first_token_s = pd_engine_now(e);
    if (r->on_token)
        r->on_token(r->user, r->id, tok);
    if (is_stop(e, r, tok))
        finish(e, r, PD_ENGINE_FINISH_STOP, PD_OK);
    else if (r->n_tokens >= r->cap)
        finish(e, r, PD_ENGINE_FINISH_LENGTH, PD_OK);
}

pd_status_t pd_engine_step(pd_engine_t *e, int32_t *n_seqs_p)
{
    if (n_seqs_p)
        *n_seqs_p = 0;
    if (e->in_step) {
        PD_LOG_ERROR("pd_engine_step called from an engine callback");
        return PD_ERR_INVALID;
    }
    /* prefilled requests whose first token already finished them */
    for (req_t *r = e->waiting.head, *next; r; r = next) {
        next = r->next;
        if (r->finish_now)
            finish(e, r, (pd_engine_finish_t)(r->finish_now - 1), PD_OK);
    }
    if (!e->waiting.head && !e->running.head)
        return PD_OK;
    e->in_step = true;
    int32_t T = schedule_step(e);
    if (e->dllm) {
        bool any = false;
        for (int32_t i = 0; i < e->n_sched; i++)
            any |= e->sched[i]->d_room > 0;
        if (any) {
            double t_d = pd_engine_now(e);
            draft_propose(e);
            e->stats.spec_draft_s += pd_engine_now(e) - t_d;
            T = 0;
            for (int32_t i = 0; i < e->n_sched; i++) {
                req_t *r = e->sched[i];
                if (r->n_tokens - r->n_computed == 1) /* decoding: room was reserved */
                    r->sched = 1 + r->n_draft;        /* what the draft gave */
                r->d_room = 0;
                T += r->sched;
            }
        }
    }
    if (e->n_sched == 0 && pd_kv_pool_n_free(e->kv) < pd_kv_pool_n_blocks(e->kv)) {
        /* Blocks are held outside the running batch: by waiting prefilled requests or
         * by the caller (a decode worker's reservations). Free the newest waiting
         * prefilled request's blocks (it will recompute its prompt, as a preemption),
         * so that the queue cannot stall on blocks held by requests behind its head;
         * otherwise wait for the caller to release or admit what it holds. */
        for (req_t *r = e->waiting.tail; r; r = r->prev)
            if (r->pre_blocks) {
                drop_blocks(e, r);
                r->preemptions++;
                e->stats.preemptions++;
                break;
            }
        e->in_step = false;
        return PD_OK;
    }
    if (e->n_sched == 0) {
        /* cannot happen: an idle pool fits any accepted request */
        req_t *r = e->waiting.head;
        PD_LOG_ERROR("engine: nothing schedulable (request %llu needs more than the "
                     "pool)",
                     (unsigned long long)(r ? r->id : 0));
        e->in_step = false;
        if (r)
            finish(e, r, PD_ENGINE_FINISH_ERROR, PD_ERR_INTERNAL);
        return PD_ERR_INTERNAL;
    }
    int32_t t = 0, n_out = 0;
    for (int32_t i = 0; i < e->n_sched; i++) {
        req_t *r = e->sched[i];
        for (int32_t j = 0; j < r->sched; j++, t++) {
            /* a proposal follows the pending token */
            e->ids[t] = j < r->sched - r->n_draft ? r->tokens[r->n_computed + j]
                                                  : r->draft[j - (r->sched - r->n_draft)];
            e->pos[t] = r->n_computed + j;
            e->seq[t] = r->slot;
        }
        if (r->n_draft > 0) {
            /* the pending token and the proposal: every row's logits verify */
            r->logit = n_out;
            r->n_logits = 1 + r->n_draft;
            for (int32_t j = 0; j <= r->n_draft; j++)
                e->out_rows[n_out++] = t - 1 - r->n_draft + j;
        } else if (r->n_computed + r->sched == r->n_tokens) {
            r->logit = n_out;
            r->n_logits = 1;
            e->out_rows[n_out++] = t - 1;
        }
        e->progress[i] = (pd_engine_progress_t){.id = r->id,
                                                .user = r->user,
                                                .pos_end = r->n_computed + r->sched,
                                                .n_prompt = r->n_prompt,
                                                .blocks = row_of(e, r),
                                                .n_blocks = r->n_blocks};
    }
    pd_llm_batch_t b = {.T = T,
                        .ids = e->ids,
                        .pos = e->pos,
                        .seq = e->seq,
                        .n_seqs = e->max_seqs,
                        .bt_stride = e->max_blocks,
                        .block_tables = e->tables,
                        .out_rows = e->out_rows,
                        .n_out = n_out};
    double t0 = pd_engine_now(e);
    const float *logits = NULL;
    /* On a device, a step whose every logit row is greedy takes the argmax there and
     * leaves the logits on the device (a batch of 256 rows of 32000 would otherwise
     * cross to the host every step). */
    e->greedy_step = e->k->device && n_out > 0;
    for (int32_t i = 0; i < e->n_sched && e->greedy_step; i++)
        if (e->sched[i]->logit >= 0 && !pd_sampler_is_greedy(e->sched[i]->sampler))
            e->greedy_step = false;
    pd_status_t st = e->greedy_step
                         ? pd_llm_forward_batch_ids(e->llm, e->kv, &b, e->row_ids)
                         : pd_llm_forward_batch(e->llm, e->kv, &b, &logits);
    double t1 = pd_engine_now(e);
    e->stats.forward_s += t1 - t0;
    e->stats.steps++;
    e->stats.seqs_in_steps += e->n_sched;
    if (e->n_sched > e->stats.max_batch_seqs)
        e->stats.max_batch_seqs = e->n_sched;
    int h = 0;
    while (h < 7 && (2 << h) <= e->n_sched)
        h++;
    e->stats.hist[h]++;
    int32_t n_sched = e->n_sched;
    if (st == PD_OK && !e->greedy_step && e->sample_threads > 1)
        draw_ahead(e, logits);
    for (int32_t i = 0; i < n_sched; i++) {
        req_t *r = e->sched[i];
        if (st != PD_OK)
            finish(e, r, PD_ENGINE_FINISH_ERROR, st);
        else
            advance(e, r, logits);
    }
    e->greedy_step = false;
    e->stats.sample_s += pd_engine_now(e) - t1;
    e->in_step = false;
    /* cancellations from callbacks */
    req_list_t *lists[2] = {&e->running, &e->waiting};
    for (int i = 0; i < 2; i++)
        for (req_t *r = lists[i]->head, *next; r; r = next) {
            next = r->next;
            if (r->cancelled)
                finish(e, r, PD_ENGINE_FINISH_CANCELLED, PD_OK);
        }
    if (n_seqs_p)
        *n_seqs_p = n_sched;
    return st;
}
