/* request.c - the life of one Generate inside the router: validation, queueing,
 * dispatch of an attempt (a fresh task id, a decode and a prefill worker), relaying
 * the attempt's KV handshake, turning TOKEN_CHUNKs into the client's CHUNKs, and
 * ending it (finish, cancel, deadline, client gone, retries exhausted).
 *
 * A request holds its ids in one array: the prompt, then every token already sent
 * to the client; a re-run prefills all of them and continues at index n_out, so the
 * client's stream has no gap and no repeat (indices at or below n_out are dropped).
 * States: QUEUED (no attempt running: no worker could take it yet, or a re-run waits
 * for one) and RUNNING (task_id, p_id, d_id name the attempt). Every function that
 * may end a request returns false when it did: the caller must not touch it again.
 * Threading: the router's loop thread. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/sampler.h"
#include "router/router_impl.h"

typedef enum req_state { REQ_QUEUED, REQ_RUNNING } req_state_t;

struct pd_req {
    pd_req_t *prev, *next;
    uint64_t id; /* the client's */
    uint8_t ident[PD_RPC_MAX_IDENT];
    size_t ident_len;
    uint64_t trace_id;
    uint64_t deadline_rt;    /* CLOCK_REALTIME ms; 0: none */
    uint64_t queue_until_ms; /* monotonic: a queued request without deadline gives up */
    int32_t *ids;            /* [n_prompt + n_out]: the prompt, then the tokens sent */
    size_t n_prompt, n_out, cap;
    int32_t *stop_ids;
    size_t n_stop;
    int32_t max_tokens; /* > 0: at most this many; -1: until the context is full */
    bool ignore_eos, no_text;
    int32_t spec_k;
    uint64_t spec_proposed, spec_accepted;
    float temperature, top_p, min_p;
    int32_t top_k;
    uint64_t seed;
    uint64_t *rng; /* sampler state after ids[n_prompt + n_out - 1]; empty: from seed */
    size_t n_rng;
    req_state_t state;
    /* the current attempt */
    uint64_t task_id, p_id, d_id;
    bool local, p_done, kv_done, first_held;
    int32_t first_token;
    size_t attempt_first; /* n_out when the attempt started */
    uint64_t avoid_id;
    uint32_t retries, cached_tokens;
    double t_accept, t_dispatch, t_first; /* monotonic ms; 0: not yet */
    char p_name[128], d_name[128];
    pd_detok_t detok;
};

static double now_f(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static pd_req_t *find_task(pd_router_t *rt, uint64_t task)
{
    for (pd_req_t *r = rt->head; r; r = r->next)
        if (r->state == REQ_RUNNING && r->task_id == task)
            return r;
    return NULL;
}

static pd_req_t *find_client(pd_router_t *rt, const uint8_t *ident, size_t len,
                             uint64_t id)
{
    for (pd_req_t *r = rt->head; r; r = r->next)
        if (r->id == id && r->ident_len == len && !memcmp(r->ident, ident, len))
            return r;
    return NULL;
}

static void req_free(pd_router_t *rt, pd_req_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        rt->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        rt->tail = r->prev;
    rt->n_reqs--;
    free(r->ids);
    free(r->stop_ids);
    free(r->rng);
    free(r);
}

/* TASK_CANCEL to the attempt's workers, but not to except_id (the one that failed). */
static void cancel_attempt(pd_router_t *rt, pd_req_t *r, uint64_t except_id)
{
    if (r->state != REQ_RUNNING)
        return;
    if (!r->local && !r->p_done && r->p_id != except_id)
        pd_router_cancel_task(rt, r->p_id, r->task_id);
    if (r->d_id != except_id)
        pd_router_cancel_task(rt, r->d_id, r->task_id);
    r->p_done = true;
    r->state = REQ_QUEUED;
}

/* Ends r with an ERROR to its client. */
static void req_fail(pd_router_t *rt, pd_req_t *r, Pd__ErrorCode code, const char *why)
{
    PD_LOG_INFO("request %llu: %s: %s", (unsigned long long)r->id,
                pd_rpc_error_name(code), why);
    cancel_attempt(rt, r, 0);
    pd_rpc_send_error(rt->client, r->ident, r->ident_len, r->id, code, "%s", why);
    rt->requests_failed++;
    req_free(rt, r);
}

static void fill_usage(const pd_req_t *r, Pd__Usage *u)
{
    double now = now_f();
    u->prompt_tokens = (uint32_t)r->n_prompt;
    u->completion_tokens = (uint32_t)r->n_out;
    u->cached_tokens = r->cached_tokens;
    u->seed = r->seed;
    u->queue_ms = r->t_dispatch ? r->t_dispatch - r->t_accept : now - r->t_accept;
    u->ttft_ms = r->t_first ? r->t_first - r->t_accept : 0;
    u->e2e_ms = now - r->t_accept;
    u->retries = r->retries;
    u->spec_proposed = r->spec_proposed;
    u->spec_accepted = r->spec_accepted;
    u->prefill_worker = (char *)r->p_name;
    u->decode_worker = (char *)r->d_name;
    u->n_prompt_ids = r->n_prompt;
    u->prompt_ids = r->ids;
}

/* Sends the chunk of the n_new tokens from output index `from` (already in r->ids)
 * and, with finish, the last chunk (usage), after which r is freed. Returns whether
 * r is still alive (false after a finish or when the client is gone). */
static bool req_emit(pd_router_t *rt, pd_req_t *r, size_t from, size_t n_new,
                     const char *finish)
{
    Pd__Chunk c = PD__CHUNK__INIT;
    c.index = (uint32_t)from;
    c.n_ids = n_new;
    c.ids = r->ids + r->n_prompt + from;
    char *text = NULL;
    if (!r->no_text) {
        size_t piece = pd_tokenizer_max_piece_len(rt->tok) + 16;
        size_t cap = (n_new + 1) * piece + 1, len = 0;
        text = malloc(cap);
        if (!text)
            abort();
        text[0] = 0;
        for (size_t i = 0; i < n_new; i++)
            len += pd_detok_feed(&r->detok, c.ids[i], text + len, cap - len);
        if (finish)
            len += pd_detok_flush(&r->detok, text + len, cap - len);
        c.text = text;
    }
    if (n_new && !r->t_first)
        r->t_first = now_f();
    rt->tokens_out += n_new;
    Pd__Usage u = PD__USAGE__INIT;
    if (finish) {
        c.finish_reason = (char *)finish;
        fill_usage(r, &u);
        c.usage = &u;
    }
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__CHUNK, r->id);
    env.trace_id = r->trace_id;
    env.chunk = &c;
    int rc = pd_router_send_client(rt, r->ident, r->ident_len, &env);
    free(text);
    if (rc != 0) {
        PD_LOG_INFO("request %llu: the client is gone; cancelling",
                    (unsigned long long)r->id);
        cancel_attempt(rt, r, 0);
        req_free(rt, r);
        return false;
    }
    if (finish) {
        PD_LOG_DEBUG("request %llu: finished (%s), %zu tokens, %u retries",
                     (unsigned long long)r->id, finish, r->n_out, r->retries);
        req_free(rt, r);
        return false;
    }
    return true;
}

static void append_token(pd_req_t *r, int32_t id)
{
    if (r->n_prompt + r->n_out == r->cap) {
        size_t cap = r->cap * 2;
        int32_t *ids = realloc(r->ids, cap * sizeof *ids);
        if (!ids)
            abort();
        r->ids = ids;
        r->cap = cap;
    }
    r->ids[r->n_prompt + r->n_out++] = id;
}

static void set_rng(pd_req_t *r, const uint64_t *s, size_t n)
{
    if (!n)
        return;
    if (n != r->n_rng) {
        uint64_t *p = realloc(r->rng, n * sizeof *p);
        if (!p)
            abort();
        r->rng = p;
        r->n_rng = n;
    }
    memcpy(r->rng, s, n * sizeof *s);
}

static Pd__Sampling req_sampling(const pd_req_t *r)
{
    Pd__Sampling s = PD__SAMPLING__INIT;
    s.temperature = r->temperature;
    s.top_p = r->top_p;
    s.top_k = r->top_k;
    s.min_p = r->min_p;
    s.seed = r->seed;
    s.has_seed = true;
    return s;
}

static void send_tasks(pd_router_t *rt, pd_req_t *r, pd_worker_t *p, pd_worker_t *d)
{
    size_t n = r->n_prompt + r->n_out;
    Pd__Sampling s = req_sampling(r);
    Pd__DecodeTask dt = PD__DECODE_TASK__INIT;
    dt.n_ids = n;
    dt.ids = r->ids;
    dt.sampling = &s;
    dt.max_tokens = r->max_tokens > 0 ? r->max_tokens - (int32_t)r->n_out : -1;
    dt.ignore_eos = r->ignore_eos;
    dt.spec_k = r->spec_k;
    dt.n_stop_ids = r->n_stop;
    dt.stop_ids = r->stop_ids;
    dt.first_index = (uint32_t)r->n_out;
    dt.prefill_worker_id = p ? p->id : 0;
    if (p && p->has_ucx && rt->o.kv_transport == PD__KV_TRANSPORT__UCX)
        dt.source = &p->ucx;
    if (p && p->has_dev && rt->o.kv_transport == PD__KV_TRANSPORT__CUDA_IPC)
        dt.device_source = &p->dev;
    dt.kv_transport = rt->o.kv_transport;
    dt.lease_ms = rt->o.lease_ms;
    dt.local_prefill = r->local;
    if (r->local) {
        dt.n_rng_state = r->n_rng;
        dt.rng_state = r->rng;
    }
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__DECODE_TASK, r->task_id);
    env.deadline_ms = r->deadline_rt;
    env.trace_id = r->trace_id;
    env.decode_task = &dt;
    pd_router_send_worker(rt, d, &env, NULL, 0);
    if (!p)
        return;
    Pd__PrefillTask pt = PD__PREFILL_TASK__INIT;
    pt.n_ids = n;
    pt.ids = r->ids;
    pt.sampling = &s;
    pt.n_rng_state = r->n_rng;
    pt.rng_state = r->rng;
    pt.decode_worker_id = d->id;
    pt.lease_ms = rt->o.lease_ms;
    pd_rpc_envelope_init(&env, PD__METHOD__PREFILL_TASK, r->task_id);
    env.deadline_ms = r->deadline_rt;
    env.trace_id = r->trace_id;
    env.prefill_task = &pt;
    pd_router_send_worker(rt, p, &env, NULL, 0);
}

/* Starts an attempt when workers can take it; else r stays queued. */
static bool req_dispatch(pd_router_t *rt, pd_req_t *r)
{
    size_t n = r->n_prompt + r->n_out;
    if ((r->max_tokens > 0 && r->n_out >= (size_t)r->max_tokens) ||
        n >= (size_t)rt->ctx_len)
        return req_emit(rt, r, r->n_out, 0, "length"); /* all sent before a loss */
    uint32_t bs = rt->block_size ? rt->block_size : 16;
    uint32_t need = (uint32_t)((n + bs - 1) / bs);
    pd_worker_t *p = NULL, *d = NULL;
    bool local = false;
    if (rt->o.local_prefill_max && n <= rt->o.local_prefill_max) {
        d = pd_registry_pick_decode(rt->reg, need, true, r->avoid_id);
        local = d != NULL;
    }
    if (!d) {
        d = pd_registry_pick_decode(rt->reg, need, false, r->avoid_id);
        if (!d)
            return true;
        p = pd_registry_pick_prefill(rt->reg, rt->o.policy, r->ids, n, r->avoid_id);
        if (!p) { /* no prefill worker: a decode worker that prefills itself */
            d = pd_registry_pick_decode(rt->reg, need, true, r->avoid_id);
            if (!d)
                return true;
            local = true;
        }
    }
    r->state = REQ_RUNNING;
    r->task_id = ++rt->next_task_id;
    r->p_id = p ? p->id : 0;
    r->d_id = d->id;
    r->local = local;
    r->p_done = local;
    r->kv_done = r->first_held = false;
    r->attempt_first = r->n_out;
    if (!r->t_dispatch)
        r->t_dispatch = now_f();
    snprintf(r->p_name, sizeof r->p_name, "%s", p ? p->name : d->name);
    snprintf(r->d_name, sizeof r->d_name, "%s", d->name);
    d->est_tasks++;
    d->est_blocks += need;
    if (p)
        p->est_tokens += n;
    PD_LOG_DEBUG("request %llu: task %llu on %s%s%s (%zu ids, first index %zu)",
                 (unsigned long long)r->id, (unsigned long long)r->task_id, d->name,
                 local ? " (local prefill)" : " <- ", local ? "" : p->name, n, r->n_out);
    send_tasks(rt, r, p, d);
    return true;
}

/* Abandons the running attempt (failed_id failed or died) and re-runs the request,
 * or fails it with WORKER_LOST when its re-runs are spent. */
static void req_abandon(pd_router_t *rt, pd_req_t *r, uint64_t failed_id, const char *why)
{
    PD_LOG_WARN("request %llu: task %llu abandoned (%s) after %zu tokens",
                (unsigned long long)r->id, (unsigned long long)r->task_id, why, r->n_out);
    cancel_attempt(rt, r, failed_id);
    r->state = REQ_QUEUED;
    r->task_id = r->p_id = r->d_id = 0;
    r->avoid_id = failed_id;
    if (r->retries >= rt->o.max_retries) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s; %u re-runs spent", why, r->retries);
        req_fail(rt, r, PD__ERROR_CODE__WORKER_LOST, msg);
        return;
    }
    r->retries++;
    rt->retries++;
    r->queue_until_ms = pd_rpc_mono_ms() + rt->o.queue_timeout_ms;
    req_dispatch(rt, r);
}

/* ---- GENERATE ---- */

static Pd__ErrorCode check_sampling(const Pd__Sampling *s, char *why, size_t cap)
{
    if (!s)
        return 0;
    if (!isfinite(s->temperature) || s->temperature < 0) {
        snprintf(why, cap, "temperature %g must be finite and >= 0",
                 (double)s->temperature);
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    }
    if (!(s->top_p >= 0 && s->top_p <= 1)) {
        snprintf(why, cap, "top_p %g outside [0, 1]", (double)s->top_p);
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    }
    if (!(s->min_p >= 0 && s->min_p <= 1)) {
        snprintf(why, cap, "min_p %g outside [0, 1]", (double)s->min_p);
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    }
    return 0;
}

/* Fills r's prompt from g (tokenized unless prompt_ids). */
static Pd__ErrorCode take_prompt(pd_router_t *rt, const Pd__GenerateRequest *g,
                                 pd_req_t *r, char *why, size_t cap)
{
    size_t ctx = (size_t)rt->ctx_len, n = 0;
    if (g->n_prompt_ids) {
        if (g->n_prompt_ids >= ctx) {
            snprintf(why, cap, "the prompt has %zu tokens; the context holds %zu",
                     g->n_prompt_ids, ctx);
            return PD__ERROR_CODE__INVALID_ARGUMENT;
        }
        for (size_t i = 0; i < g->n_prompt_ids; i++)
            if (g->prompt_ids[i] < 0 || g->prompt_ids[i] >= rt->n_vocab) {
                snprintf(why, cap, "prompt_ids[%zu] = %d outside the vocabulary [0, %d)",
                         i, g->prompt_ids[i], rt->n_vocab);
                return PD__ERROR_CODE__INVALID_ARGUMENT;
            }
        n = g->n_prompt_ids;
    } /* an empty text prompt is BOS alone, as in pdctl generate */
    r->cap = ctx + 1;
    r->ids = malloc(r->cap * sizeof *r->ids);
    if (!r->ids)
        abort();
    if (g->n_prompt_ids) {
        memcpy(r->ids, g->prompt_ids, n * sizeof *r->ids);
    } else {
        const char *text = g->prompt ? g->prompt : "";
        pd_status_t st =
            pd_tokenizer_encode(rt->tok, text, strlen(text), true, r->ids, r->cap, &n);
        if (st != PD_OK || n >= ctx) {
            snprintf(why, cap, "the prompt has %zu tokens; the context holds %zu", n,
                     ctx);
            return PD__ERROR_CODE__INVALID_ARGUMENT;
        }
    }
    r->n_prompt = n;
    return 0;
}

static Pd__ErrorCode take_params(pd_router_t *rt, const Pd__GenerateRequest *g,
                                 pd_req_t *r, char *why, size_t cap)
{
    Pd__ErrorCode code = check_sampling(g->sampling, why, cap);
    if (code)
        return code;
    if (g->max_tokens < -1) {
        snprintf(why, cap, "max_tokens %d < -1", g->max_tokens);
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < g->n_stop_ids; i++)
        if (g->stop_ids[i] < 0 || g->stop_ids[i] >= rt->n_vocab) {
            snprintf(why, cap, "stop_ids[%zu] = %d outside the vocabulary", i,
                     g->stop_ids[i]);
            return PD__ERROR_CODE__INVALID_ARGUMENT;
        }
    r->max_tokens = g->max_tokens == 0 ? 256 : g->max_tokens;
    r->ignore_eos = g->ignore_eos;
    r->no_text = g->no_text;
    r->spec_k = g->spec_k < -1 ? -1 : g->spec_k;
    const Pd__Sampling *s = g->sampling;
    r->temperature = s ? s->temperature : 0;
    r->top_p = s && s->top_p > 0 ? s->top_p : 1; /* 0: off, as 1 */
    r->top_k = s ? s->top_k : 0;
    r->min_p = s ? s->min_p : 0;
    r->seed = s && s->has_seed ? s->seed : splitmix64(&rt->seed_state);
    pd_sampler_params_t sp = {.temperature = r->temperature,
                              .top_k = r->top_k,
                              .top_p = r->top_p,
                              .min_p = r->min_p,
                              .seed = r->seed};
    if (pd_sampler_params_check(&sp) != PD_OK) {
        snprintf(why, cap, "%s", "sampling parameters out of range");
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    }
    if (g->n_stop_ids) {
        r->stop_ids = malloc(g->n_stop_ids * sizeof *r->stop_ids);
        if (!r->stop_ids)
            abort();
        memcpy(r->stop_ids, g->stop_ids, g->n_stop_ids * sizeof *r->stop_ids);
        r->n_stop = g->n_stop_ids;
    }
    return 0;
}

void pd_req_generate(pd_router_t *rt, const pd_rpc_msg_t *m)
{
    const Pd__Envelope *env = m->env;
    char why[256] = "";
    Pd__ErrorCode code = 0;
    pd_req_t *r = NULL;
    if (rt->draining) {
        code = PD__ERROR_CODE__UNAVAILABLE;
        snprintf(why, sizeof why, "%s", "the router is draining");
    } else if (find_client(rt, m->ident, m->ident_len, env->request_id)) {
        code = PD__ERROR_CODE__DUPLICATE;
        snprintf(why, sizeof why, "request %llu is already in flight",
                 (unsigned long long)env->request_id);
    } else if (env->deadline_ms && env->deadline_ms <= pd_rpc_realtime_ms()) {
        code = PD__ERROR_CODE__DEADLINE_EXCEEDED;
        snprintf(why, sizeof why, "%s", "the deadline has passed");
    } else {
        r = calloc(1, sizeof *r);
        if (!r)
            abort();
        code = take_params(rt, env->generate, r, why, sizeof why);
        if (!code)
            code = take_prompt(rt, env->generate, r, why, sizeof why);
    }
    if (code) {
        PD_LOG_INFO("request %llu refused: %s: %s", (unsigned long long)env->request_id,
                    pd_rpc_error_name(code), why);
        pd_rpc_send_error(rt->client, m->ident, m->ident_len, env->request_id, code, "%s",
                          why);
        if (r) {
            free(r->ids);
            free(r->stop_ids);
            free(r);
        }
        return;
    }
    r->id = env->request_id;
    memcpy(r->ident, m->ident, m->ident_len);
    r->ident_len = m->ident_len;
    r->trace_id = env->trace_id;
    r->deadline_rt = env->deadline_ms;
    r->queue_until_ms = pd_rpc_mono_ms() + rt->o.queue_timeout_ms;
    r->t_accept = now_f();
    /* prime the detokenizer with the prompt so the first piece keeps its space */
    pd_detok_init(&r->detok, rt->tok);
    char scratch[1024];
    if (pd_tokenizer_max_piece_len(rt->tok) + 16 <= sizeof scratch) {
        for (size_t i = 0; i < r->n_prompt; i++)
            pd_detok_feed(&r->detok, r->ids[i], scratch, sizeof scratch);
        pd_detok_flush(&r->detok, scratch, sizeof scratch);
    }
    r->prev = rt->tail;
    if (rt->tail)
        rt->tail->next = r;
    else
        rt->head = r;
    rt->tail = r;
    rt->n_reqs++;
    rt->requests_total++;
    PD_LOG_DEBUG("request %llu: %zu prompt tokens, max_tokens %d, seed %llu",
                 (unsigned long long)r->id, r->n_prompt, r->max_tokens,
                 (unsigned long long)r->seed);
    req_dispatch(rt, r);
}

void pd_req_cancel(pd_router_t *rt, const pd_rpc_msg_t *m)
{
    uint64_t id = m->env->request_id;
    pd_req_t *r = find_client(rt, m->ident, m->ident_len, id);
    if (r) {
        PD_LOG_INFO("request %llu: cancelled by the client", (unsigned long long)id);
        cancel_attempt(rt, r, 0);
        req_emit(rt, r, r->n_out, 0, "cancelled");
    }
    Pd__CancelReply cr = PD__CANCEL_REPLY__INIT;
    cr.found = r != NULL;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__CANCEL_REPLY, id);
    env.cancel_reply = &cr;
    pd_router_send_client(rt, m->ident, m->ident_len, &env);
}

/* ---- worker messages ---- */

static bool is_stop(const pd_router_t *rt, const pd_req_t *r, int32_t id)
{
    if (id < 0 || id >= rt->n_vocab)
        return true;
    if (!r->ignore_eos &&
        (id == pd_tokenizer_eos(rt->tok) || id == pd_tokenizer_bos(rt->tok)))
        return true;
    for (size_t i = 0; i < r->n_stop; i++)
        if (r->stop_ids[i] == id)
            return true;
    return false;
}

/* KV_DONE: relayed to D; the first token goes to the client at once (unless it ends
 * the request: then D's chunk says how). */
static void on_kv_done(pd_router_t *rt, pd_req_t *r, pd_rpc_msg_t *m)
{
    const Pd__KvDone *kd = m->env->kv_done;
    pd_worker_t *d = pd_registry_by_id(rt->reg, r->d_id);
    if (d)
        pd_router_send_worker(rt, d, m->env, NULL, 0);
    if (r->kv_done)
        return;
    r->kv_done = true;
    r->cached_tokens = kd->cached_tokens;
    if (r->n_out != r->attempt_first)
        return;
    if (is_stop(rt, r, kd->first_token) ||
        (r->max_tokens > 0 && r->n_out >= (size_t)r->max_tokens)) {
        r->first_held = true;
        r->first_token = kd->first_token;
        return;
    }
    append_token(r, kd->first_token);
    set_rng(r, kd->rng_state, kd->n_rng_state);
    req_emit(rt, r, r->n_out - 1, 1, NULL);
}

/* A decode worker's finish_reason as the client will see it: "stop", "length" or
 * "cancelled" (engine.c's words for a task that ended), "" for none; NULL for
 * anything else (a worker's string goes to clients only from this list). */
static const char *known_finish(const char *f)
{
    static const char *const known[] = {"stop", "length", "cancelled"};
    if (!f || !f[0])
        return "";
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (!strcmp(f, known[i]))
            return known[i];
    return NULL;
}

static void on_token_chunk(pd_router_t *rt, pd_req_t *r, const Pd__TokenChunk *tc)
{
    size_t idx = tc->index, from = r->n_out;
    const char *finish = known_finish(tc->finish_reason);
    if (!finish) { /* before any of its tokens is taken: the re-run starts at n_out */
        req_abandon(rt, r, 0,
                    "a chunk whose finish_reason is not stop, length or cancelled");
        return;
    }
    if (r->first_held && idx == r->n_out + 1 && r->n_out == r->attempt_first)
        append_token(r, r->first_token); /* D numbered after the first token */
    r->first_held = false;
    if (idx > r->n_out) {
        char why[128];
        snprintf(why, sizeof why, "chunk at index %zu, expected %zu", idx, r->n_out);
        req_abandon(rt, r, 0, why);
        return;
    }
    for (size_t j = 0; j < tc->n_ids; j++) {
        if (idx + j < r->n_out)
            continue;
        if (r->max_tokens > 0 && r->n_out >= (size_t)r->max_tokens)
            break;
        append_token(r, tc->ids[j]);
    }
    if (idx + tc->n_ids == r->n_out)
        set_rng(r, tc->rng_state, tc->n_rng_state);
    if (tc->cached_tokens)
        r->cached_tokens = tc->cached_tokens;
    r->spec_proposed += tc->spec_proposed; /* summed over attempts */
    r->spec_accepted += tc->spec_accepted;
    if (!finish[0])
        finish = NULL;
    if (finish) {
        cancel_attempt(rt, r, r->d_id); /* P, if it still holds blocks */
    }
    if (r->n_out > from || finish)
        req_emit(rt, r, from, r->n_out - from, finish);
}

static void relay(pd_router_t *rt, uint64_t to_id, pd_rpc_msg_t *m)
{
    pd_worker_t *to = pd_registry_by_id(rt->reg, to_id);
    if (!to)
        return; /* its death is being handled */
    pd_router_send_worker(rt, to, m->env, m->has_data ? zmq_msg_data(&m->data) : NULL,
                          m->has_data ? zmq_msg_size(&m->data) : 0);
}

void pd_req_worker_msg(pd_router_t *rt, pd_worker_t *w, pd_rpc_msg_t *m)
{
    Pd__Method meth = m->env->method;
    uint64_t t = m->env->request_id;
    pd_req_t *r = find_task(rt, t);
    if (!r) {
        if (meth == PD__METHOD__TASK_FAILED || meth == PD__METHOD__KV_RELEASE) {
            PD_LOG_DEBUG("%s for finished task %llu from %s", pd_rpc_method_name(meth),
                         (unsigned long long)t, w->name);
            return;
        }
        PD_LOG_INFO("%s for unknown task %llu from %s: answering TASK_CANCEL",
                    pd_rpc_method_name(meth), (unsigned long long)t, w->name);
        pd_router_cancel_task(rt, w->id, t);
        return;
    }
    bool from_p = !r->local && w->id == r->p_id, from_d = w->id == r->d_id;
    bool ok;
    switch (meth) {
    case PD__METHOD__KV_TARGET:
    case PD__METHOD__KV_RELEASE:
        ok = from_d && !r->local;
        break;
    case PD__METHOD__KV_READY:
    case PD__METHOD__KV_DATA:
    case PD__METHOD__KV_DONE:
        ok = from_p;
        break;
    case PD__METHOD__TOKEN_CHUNK:
        ok = from_d;
        break;
    default: /* TASK_FAILED */
        ok = from_p || from_d;
        break;
    }
    if (!ok) {
        PD_LOG_WARN("%s for task %llu from %s, which is not its sender in that task; "
                    "dropped",
                    pd_rpc_method_name(meth), (unsigned long long)t, w->name);
        return;
    }
    switch (meth) {
    case PD__METHOD__KV_TARGET:
        if (!r->p_done)
            relay(rt, r->p_id, m);
        break;
    case PD__METHOD__KV_RELEASE:
        if (!r->p_done)
            relay(rt, r->p_id, m);
        r->p_done = true;
        break;
    case PD__METHOD__KV_READY:
    case PD__METHOD__KV_DATA:
        relay(rt, r->d_id, m);
        break;
    case PD__METHOD__KV_DONE:
        on_kv_done(rt, r, m);
        break;
    case PD__METHOD__TOKEN_CHUNK:
        on_token_chunk(rt, r, m->env->token_chunk);
        break;
    default: {
        if (from_p && r->p_done)
            break; /* P's part was over; D carries on */
        const Pd__Error *e = m->env->task_failed->error;
        char why[300];
        snprintf(why, sizeof why, "%s failed it: %s %s", w->name,
                 e ? pd_rpc_error_name(e->code) : "?", e && e->message ? e->message : "");
        req_abandon(rt, r, w->id, why);
        break;
    }
    }
}

void pd_req_worker_gone(pd_router_t *rt, uint64_t worker_id)
{
    pd_req_t *next;
    for (pd_req_t *r = rt->head; r; r = next) {
        next = r->next;
        if (r->state != REQ_RUNNING)
            continue;
        if (r->d_id == worker_id || (r->p_id == worker_id && !r->p_done))
            req_abandon(rt, r, worker_id, "worker lost");
    }
}

void pd_req_tick(pd_router_t *rt)
{
    uint64_t now_rt = pd_rpc_realtime_ms(), now = pd_rpc_mono_ms();
    pd_req_t *next;
    for (pd_req_t *r = rt->head; r; r = next) {
        next = r->next;
        if (r->deadline_rt && now_rt >= r->deadline_rt)
            req_fail(rt, r, PD__ERROR_CODE__DEADLINE_EXCEEDED, "the deadline passed");
        else if (r->state == REQ_QUEUED && !r->deadline_rt && now >= r->queue_until_ms)
            req_fail(rt, r, PD__ERROR_CODE__UNAVAILABLE,
                     "no worker could take the request");
    }
}

void pd_req_dispatch_queued(pd_router_t *rt)
{
    pd_req_t *next;
    for (pd_req_t *r = rt->head; r; r = next) {
        next = r->next;
        if (r->state == REQ_QUEUED)
            req_dispatch(rt, r);
    }
}

void pd_req_abort_all(pd_router_t *rt, Pd__ErrorCode code, const char *why)
{
    while (rt->head)
        req_fail(rt, rt->head, code, why);
}

void pd_req_free_all(pd_router_t *rt)
{
    while (rt->head)
        req_free(rt, rt->head);
}
