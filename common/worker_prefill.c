/* worker_prefill.c - the prefill side of a worker: a task's KV announced layer by
 * layer (KV_READY) or sent in KV_DATA frames, KV_DONE, and its blocks held for the
 * reader until KV_RELEASE, TASK_CANCEL or the lease. See worker_impl.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"
#include "common/worker_impl.h"

/* ---- I/O thread: the prefill side ---------------------------------------- */

ptask_t *wk_ptask_find(worker_t *w, uint64_t task)
{
    for (ptask_t *t = w->ptasks; t; t = t->next)
        if (t->task == task)
            return t;
    return NULL;
}

void wk_ptask_drop(worker_t *w, ptask_t *t, bool cancel_engine)
{
    for (ptask_t **p = &w->ptasks; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            break;
        }
    if (t->prefilled)
        wk_cmd_release(w, t->blocks, t->n_blocks); /* takes the array */
    else {
        free(t->blocks);
        if (cancel_engine)
            wk_cmd_cancel(w, t->task);
    }
    free(t->sent);
    free(t->ready);
    free(t->cur);
    free(t);
}

/* ZeroMQ transport: rows [from, to) of one layer, K then V, in frames of KV_DATA_POS
 * positions, read from the held (or still computing, for finished layers) blocks. */
static void send_kv_rows(worker_t *w, ptask_t *t, const int32_t *blocks, int32_t layer,
                         int32_t from, int32_t to)
{
    size_t row = w->row_bytes;
    size_t cap = (size_t)KV_DATA_POS * row * 2;
    uint8_t *buf = malloc(cap);
    if (!buf) {
        PD_LOG_ERROR("worker: out of memory for KV data");
        return;
    }
    const uint8_t *kb =
        (const uint8_t *)pd_kv_pool_k(w->kv, 0) + (size_t)layer * w->layer_bytes;
    const uint8_t *vb =
        (const uint8_t *)pd_kv_pool_v(w->kv, 0) + (size_t)layer * w->layer_bytes;
    for (int32_t p0 = from; p0 < to; p0 += KV_DATA_POS) {
        int32_t n = to - p0 < KV_DATA_POS ? to - p0 : KV_DATA_POS;
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *base = kv ? vb : kb;
            for (int32_t i = 0; i < n; i++) {
                int32_t pos = p0 + i;
                size_t off = ((size_t)blocks[pos / w->bs] * (size_t)w->bs +
                              (size_t)(pos % w->bs)) *
                             row;
                memcpy(buf + ((size_t)kv * (size_t)n + (size_t)i) * row, base + off, row);
            }
        }
        Pd__Envelope env;
        pd_rpc_envelope_init(&env, PD__METHOD__KV_DATA, t->task);
        Pd__KvData d = PD__KV_DATA__INIT;
        d.layer = (uint32_t)layer;
        d.pos0 = (uint32_t)p0;
        d.n_pos = (uint32_t)n;
        env.kv_data = &d;
        wk_send_env(w, &env, buf, 2 * (size_t)n * row);
        w->kv_bytes += (int64_t)(2 * (size_t)n * row);
    }
    free(buf);
}

/* ZeroMQ transport: sends every computed row not sent yet, once the decode worker
 * has its blocks (KV_TARGET); then KV_DONE if the prefill is complete. */
static void send_kv_done(worker_t *w, ptask_t *t);
static void zmq_flush(worker_t *w, ptask_t *t)
{
    if (!t->target_rcvd || !t->cur)
        return;
    for (int32_t l = 0; l < w->n_layers; l++)
        if (t->ready[l] > t->sent[l]) {
            send_kv_rows(w, t, t->cur, l, t->sent[l], t->ready[l]);
            t->sent[l] = t->ready[l];
        }
    if (t->done_pending) {
        t->done_pending = false;
        send_kv_done(w, t);
        wk_ptask_drop(w, t, false); /* the rows are out: nothing to hold */
    }
}

static bool take_cur(ptask_t *t, const int32_t *blocks, int32_t n)
{
    if (n > t->n_cur) {
        int32_t *c = realloc(t->cur, (size_t)n * sizeof *c);
        if (!c)
            return false;
        t->cur = c;
    }
    memcpy(t->cur, blocks, (size_t)n * sizeof *blocks);
    t->n_cur = n;
    return true;
}

void wk_on_ev_layer(worker_t *w, msg_t *m)
{
    ptask_t *t = wk_ptask_find(w, m->task);
    if (!t || t->prefilled)
        return;
    if (w->o.transport == PD__KV_TRANSPORT__ZMQ) {
        if (take_cur(t, m->blocks, m->n_blocks) && m->b > t->ready[m->a])
            t->ready[m->a] = m->b;
        zmq_flush(w, t);
        return;
    }
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_READY, t->task);
    Pd__KvReady r = PD__KV_READY__INIT;
    r.n_src_blocks = (size_t)m->n_blocks;
    r.src_blocks = m->blocks;
    r.layers_done = (uint32_t)m->a + 1;
    r.n_tokens = (uint32_t)m->b;
    env.kv_ready = &r;
    wk_send_env(w, &env, NULL, 0);
}

void wk_on_ev_prefilled(worker_t *w, msg_t *m)
{
    ptask_t *t = wk_ptask_find(w, m->task);
    if (!t) { /* cancelled meanwhile */
        wk_cmd_release(w, m->blocks, m->n_blocks);
        m->blocks = NULL;
        return;
    }
    t->prefilled = true;
    t->blocks = m->blocks;
    t->n_blocks = m->n_blocks;
    m->blocks = NULL;
    t->hold_until = pd_rpc_mono_ms() + t->lease_ms;
    t->first_token = m->a;
    t->checksum = m->checksum;
    t->cached = m->cached;
    memcpy(t->rng, m->rng, sizeof t->rng);
    if (w->o.transport == PD__KV_TRANSPORT__ZMQ) {
        if (!take_cur(t, t->blocks, t->n_blocks)) {
            wk_send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
            wk_ptask_drop(w, t, false);
            return;
        }
        for (int32_t l = 0; l < w->n_layers; l++)
            t->ready[l] = t->n_prompt;
        t->done_pending = true;
        zmq_flush(w, t);
        return;
    }
    send_kv_done(w, t);
}

static void send_kv_done(worker_t *w, ptask_t *t)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_DONE, t->task);
    Pd__KvDone d = PD__KV_DONE__INIT;
    d.first_token = t->first_token;
    d.checksum = t->checksum;
    d.n_tokens = (uint32_t)t->n_prompt;
    d.n_rng_state = 4;
    d.rng_state = t->rng;
    d.n_src_blocks = (size_t)t->n_blocks;
    d.src_blocks = t->blocks;
    d.cached_tokens = (uint32_t)t->cached;
    env.kv_done = &d;
    wk_send_env(w, &env, NULL, 0);
}

void wk_on_kv_target(worker_t *w, uint64_t task)
{
    ptask_t *t = wk_ptask_find(w, task);
    if (!t)
        return;
    t->target_rcvd = true;
    if (w->o.transport == PD__KV_TRANSPORT__ZMQ)
        zmq_flush(w, t);
}

void wk_on_prefill_task(worker_t *w, const Pd__Envelope *env)
{
    const Pd__PrefillTask *pt = env->prefill_task;
    if (w->draining) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                       "worker draining");
        return;
    }
    if (wk_ptask_find(w, env->request_id)) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__DUPLICATE,
                       "task already here");
        return;
    }
    if (pt->n_ids < 1 || pt->n_ids > MAX_PROMPT_WIRE ||
        (pt->n_rng_state != 0 && pt->n_rng_state != 4)) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__INVALID_ARGUMENT,
                       "a prefill task needs 1.. prompt ids and 0 or 4 rng words");
        return;
    }
    ptask_t *t = calloc(1, sizeof *t);
    msg_t *c = wk_new_msg(CMD_PREFILL, env->request_id);
    if (t) {
        t->sent = calloc((size_t)w->n_layers, sizeof *t->sent);
        t->ready = calloc((size_t)w->n_layers, sizeof *t->ready);
    }
    if (c)
        c->ids = wk_dup_ids(pt->ids, (int32_t)pt->n_ids);
    if (!t || !c || !t->sent || !t->ready || !c->ids) {
        if (t) {
            free(t->sent);
            free(t->ready);
        }
        free(t);
        wk_msg_free(c);
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return;
    }
    t->task = env->request_id;
    t->n_prompt = (int32_t)pt->n_ids;
    t->lease_ms = pt->lease_ms ? pt->lease_ms : 10000;
    t->layerwise = t->n_prompt >= w->o.layerwise_min;
    t->next = w->ptasks;
    w->ptasks = t;
    c->n_ids = (int32_t)pt->n_ids;
    c->sp = pd_sampler_params_default();
    if (pt->sampling) {
        c->sp.temperature = pt->sampling->temperature;
        c->sp.top_p = pt->sampling->top_p > 0 ? pt->sampling->top_p : 1.0f;
        c->sp.top_k = pt->sampling->top_k;
        c->sp.min_p = pt->sampling->min_p;
        c->sp.seed = pt->sampling->seed;
    }
    if (pt->n_rng_state == 4) {
        memcpy(c->rng, pt->rng_state, sizeof c->rng);
        c->has_rng = true;
    }
    /* the ZeroMQ transport streams every prompt's layers as they finish */
    c->layerwise = t->layerwise || w->o.transport == PD__KV_TRANSPORT__ZMQ;
    wk_send_cmd(w, c);
}
