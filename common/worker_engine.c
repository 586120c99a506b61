/* worker_engine.c - the worker's engine thread: commands in (start a prefill or a
 * decode, reserve or release blocks, cancel), engine callbacks turned into events for
 * the I/O thread, reservations granted in order. See worker_impl.h. */
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

static void q_push(queue_t *q, msg_t *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
}

void wk_msg_free(msg_t *m)
{
    if (!m)
        return;
    free(m->ids);
    free(m->blocks);
    free(m->stop);
    free(m);
}

int32_t *wk_dup_ids(const int32_t *src, int32_t n)
{
    if (n <= 0)
        return NULL;
    int32_t *d = malloc((size_t)n * sizeof *d);
    if (d)
        memcpy(d, src, (size_t)n * sizeof *d);
    return d;
}

/* ---- engine thread ------------------------------------------------------- */

enum { K_PREFILL = 1, K_DECODE };

struct etask {
    etask_t *next;
    worker_t *w;
    uint64_t task, eid;
    int kind;
    bool layerwise;
    int32_t n_prompt, first_index, n_out;
};

static void emit(worker_t *w, msg_t *m)
{
    pthread_mutex_lock(&w->mu);
    q_push(&w->events, m);
    pthread_mutex_unlock(&w->mu);
    uint64_t one = 1;
    ssize_t r = write(w->evfd, &one, sizeof one);
    (void)r;
}

msg_t *wk_new_msg(int type, uint64_t task)
{
    msg_t *m = calloc(1, sizeof *m);
    if (m) {
        m->type = type;
        m->task = task;
    }
    return m;
}

static void etask_remove(worker_t *w, etask_t *t)
{
    for (etask_t **p = &w->etasks; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            return;
        }
}

void wk_on_layer(void *user, int32_t layer, const pd_engine_progress_t *seqs, int32_t n)
{
    worker_t *w = user;
    bool synced = !w->xfer_eng; /* host transports: the mirror copy already waited */
    for (int32_t i = 0; i < n; i++) {
        etask_t *t = seqs[i].user;
        if (!t || t->kind != K_PREFILL || !t->layerwise)
            continue;
        if (!synced) {
            /* CUDA IPC: readers copy straight from the device pool, so the layer's
             * rows must be written before it is announced */
            synced = true;
            if (w->kernels->sync(w->kernels) != PD_OK)
                return; /* the pass fails with this error and fails its tasks */
        }
        msg_t *m = wk_new_msg(EV_LAYER, t->task);
        if (!m)
            continue;
        m->a = layer;
        m->b = seqs[i].pos_end;
        m->n_blocks = (seqs[i].pos_end + w->bs - 1) / w->bs;
        m->blocks = wk_dup_ids(seqs[i].blocks, m->n_blocks);
        if (!m->blocks) {
            wk_msg_free(m);
            continue;
        }
        emit(w, m);
    }
}

static void on_token(void *user, uint64_t id, int32_t tok)
{
    etask_t *t = user;
    worker_t *w = t->w;
    if (t->kind != K_DECODE)
        return;
    msg_t *m = wk_new_msg(EV_TOKEN, t->task);
    if (!m)
        return;
    m->a = tok;
    m->b = t->first_index + t->n_out++;
    m->has_rng = pd_engine_rng_state(w->engine, id, m->rng) == PD_OK;
    w->tokens_out++;
    emit(w, m);
}

/* KV_DONE's checksum of a prefilled prompt: XXH3 over the host copy, or with CUDA IPC
 * PD-SUM64 over the device rows the reader copies (after the engine's stream has
 * written them). PD_ERR_IO when the GPU fails (logged). */
static pd_status_t prefill_checksum(worker_t *w, const pd_engine_result_t *r,
                                    uint64_t *sum)
{
    if (!w->xfer_eng) {
        *sum = pd_kv_checksum(w->kv, r->kv_blocks, r->n_prompt);
        return PD_OK;
    }
    pd_status_t st = w->kernels->sync(w->kernels);
    if (st == PD_OK)
        st = pd_devxfer_kv_sum64(w->xfer_eng, pd_kv_pool_compute_k(w->kv, 0),
                                 pd_kv_pool_compute_v(w->kv, 0), w->layer_bytes,
                                 w->n_layers, w->bs, w->row_bytes, r->kv_blocks,
                                 r->n_prompt, sum);
    if (st != PD_OK)
        PD_LOG_ERROR("worker: the KV checksum of a prefilled prompt failed on the GPU");
    return st;
}

static void on_finish(void *user, const pd_engine_result_t *r)
{
    etask_t *t = user;
    worker_t *w = t->w;
    etask_remove(w, t);
    w->tasks_done++;
    if (t->kind == K_PREFILL)
        w->queued_prefill -= t->n_prompt;
    msg_t *m = NULL;
    if (t->kind == K_PREFILL && r->kv_blocks) {
        pd_status_t st = PD_ERR_NOMEM;
        m = wk_new_msg(EV_PREFILLED, t->task);
        if (m) {
            m->a = r->ids[0];
            m->n_blocks = r->n_kv_blocks;
            m->blocks = wk_dup_ids(r->kv_blocks, r->n_kv_blocks);
            st = m->blocks ? prefill_checksum(w, r, &m->checksum) : PD_ERR_NOMEM;
            memcpy(m->rng, r->rng_state, sizeof m->rng);
            m->has_rng = true;
            m->cached = r->cached_tokens;
            m->b = r->n_prompt;
        }
        if (st != PD_OK) {
            /* out of memory, or the GPU failed: give the blocks back, fail the task */
            pd_kv_pool_release(w->kv, r->kv_blocks, r->n_kv_blocks);
            wk_msg_free(m);
            m = wk_new_msg(EV_FAILED, t->task);
            if (m)
                m->st = st;
        }
    } else if (r->finish == PD_ENGINE_FINISH_ERROR) {
        m = wk_new_msg(EV_FAILED, t->task);
        if (m)
            m->st = r->status;
    } else if (t->kind == K_DECODE && r->finish != PD_ENGINE_FINISH_CANCELLED) {
        m = wk_new_msg(EV_FINISH, t->task);
        if (m) {
            m->reason = pd_engine_finish_str(r->finish);
            m->cached = r->cached_tokens;
            m->spec_proposed = r->spec_proposed;
            m->spec_accepted = r->spec_accepted;
        }
    }
    if (m)
        emit(w, m);
    free(t);
}

static void engine_fail(worker_t *w, uint64_t task, pd_status_t st)
{
    msg_t *m = wk_new_msg(EV_FAILED, task);
    if (m) {
        m->st = st;
        emit(w, m);
    }
}

static void run_cmd(worker_t *w, msg_t *c)
{
    switch (c->type) {
    case CMD_PREFILL:
    case CMD_DECODE:
    case CMD_ADMIT: {
        etask_t *t = calloc(1, sizeof *t);
        if (!t) {
            engine_fail(w, c->task, PD_ERR_NOMEM);
            if (c->type == CMD_ADMIT)
                pd_kv_pool_release(w->kv, c->blocks, c->n_blocks);
            break;
        }
        t->w = w;
        t->task = c->task;
        t->kind = c->type == CMD_PREFILL ? K_PREFILL : K_DECODE;
        t->layerwise = c->layerwise;
        t->n_prompt = c->n_ids;
        t->first_index = c->first_index;
        t->n_out = c->type == CMD_ADMIT ? 1 : 0; /* the first token came with the KV */
        pd_engine_request_t rq = {.prompt = c->ids,
                                  .n_prompt = c->n_ids,
                                  .max_tokens = c->max_tokens,
                                  .ignore_eos = c->ignore_eos,
                                  .stop_ids = c->stop,
                                  .n_stop = c->n_stop,
                                  .sampling = c->sp,
                                  .on_token = on_token,
                                  .on_finish = on_finish,
                                  .user = t,
                                  .rng_state = c->has_rng ? c->rng : NULL,
                                  .prefill_only = c->type == CMD_PREFILL,
                                  .kv_blocks = c->type == CMD_ADMIT ? c->blocks : NULL,
                                  .spec_k = c->spec_k,
                                  .first_token = c->a};
        pd_status_t st = pd_engine_add(w->engine, &rq, &t->eid);
        if (st != PD_OK) {
            if (c->type == CMD_ADMIT)
                pd_kv_pool_release(w->kv, c->blocks, c->n_blocks);
            free(t);
            engine_fail(w, c->task, st);
            break;
        }
        t->next = w->etasks;
        w->etasks = t;
        if (t->kind == K_PREFILL)
            w->queued_prefill += c->n_ids;
        break;
    }
    case CMD_RESERVE:
        q_push(&w->reserves, c); /* granted by drain_reserves */
        return;
    case CMD_RELEASE:
        pd_kv_pool_release(w->kv, c->blocks, c->n_blocks);
        break;
    case CMD_CANCEL: {
        for (etask_t *t = w->etasks; t; t = t->next)
            if (t->task == c->task) {
                pd_engine_cancel(w->engine, t->eid); /* on_finish frees t */
                break;
            }
        /* a reservation not granted yet */
        queue_t keep = {0};
        for (msg_t *r = w->reserves.head, *n; r; r = n) {
            n = r->next;
            if (r->task == c->task)
                wk_msg_free(r);
            else
                q_push(&keep, r);
        }
        w->reserves = keep;
        break;
    }
    default:
        break;
    }
    wk_msg_free(c);
}

/* Grants waiting reservations in order while the pool has the blocks. */
static void drain_reserves(worker_t *w)
{
    while (w->reserves.head) {
        msg_t *r = w->reserves.head;
        if (pd_kv_pool_n_free(w->kv) < r->a)
            return;
        int32_t *blocks = malloc((size_t)r->a * sizeof *blocks);
        if (!blocks || pd_kv_pool_alloc(w->kv, r->a, blocks) != PD_OK) {
            free(blocks);
            return;
        }
        w->reserves.head = r->next;
        if (!w->reserves.head)
            w->reserves.tail = NULL;
        msg_t *m = wk_new_msg(EV_RESERVED, r->task);
        if (!m) {
            pd_kv_pool_release(w->kv, blocks, r->a);
            free(blocks);
            engine_fail(w, r->task, PD_ERR_NOMEM);
        } else {
            m->blocks = blocks;
            m->n_blocks = r->a;
            emit(w, m);
        }
        wk_msg_free(r);
    }
}

void wk_publish_load(worker_t *w)
{
    pd_engine_stats_t st = pd_engine_stats(w->engine);
    load_t l = {.free_blocks = pd_kv_pool_n_free(w->kv),
                .total_blocks = pd_kv_pool_n_blocks(w->kv),
                .running = pd_engine_n_running(w->engine),
                .waiting =
                    pd_engine_n_pending(w->engine) - pd_engine_n_running(w->engine),
                .queued_prefill = w->queued_prefill,
                .tasks_done = w->tasks_done,
                .tokens_out = w->tokens_out,
                .spec_proposed = st.spec_proposed,
                .spec_accepted = st.spec_accepted,
                .steps = st.steps,
                .forward_s = st.forward_s,
                .sample_s = st.sample_s,
                .sample_threads = pd_engine_sample_threads(w->engine)};
    pthread_mutex_lock(&w->mu);
    w->load = l;
    pthread_mutex_unlock(&w->mu);
}

void *wk_engine_main(void *arg)
{
    worker_t *w = arg;
    wk_publish_load(w);
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->quit && !w->cmds.head && pd_engine_n_pending(w->engine) == 0) {
            if (w->reserves.head) {
                /* blocks come back only through commands; still, look again soon */
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 5 * 1000000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&w->cond, &w->mu, &ts);
                break;
            }
            pthread_cond_wait(&w->cond, &w->mu);
        }
        bool quit = w->quit;
        msg_t *c = w->cmds.head;
        w->cmds.head = w->cmds.tail = NULL;
        pthread_mutex_unlock(&w->mu);
        if (quit) {
            while (c) {
                msg_t *n = c->next;
                wk_msg_free(c);
                c = n;
            }
            break;
        }
        while (c) {
            msg_t *n = c->next;
            run_cmd(w, c);
            c = n;
        }
        drain_reserves(w);
        int32_t ran = 0;
        if (pd_engine_n_pending(w->engine))
            pd_engine_step(w->engine, &ran); /* errors finish their requests */
        drain_reserves(w);
        wk_publish_load(w);
        if (ran == 0 && pd_engine_n_pending(w->engine)) {
            /* waiting for blocks held by reservations: look again shortly */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 2 * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_mutex_lock(&w->mu);
            if (!w->cmds.head && !w->quit)
                pthread_cond_timedwait(&w->cond, &w->mu, &ts);
            pthread_mutex_unlock(&w->mu);
        }
    }
    /* drop what is left: pending reservations, requests in flight */
    while (w->reserves.head) {
        msg_t *r = w->reserves.head;
        w->reserves.head = r->next;
        wk_msg_free(r);
    }
    w->reserves.tail = NULL;
    while (w->etasks)
        pd_engine_cancel(w->engine, w->etasks->eid);
    return NULL;
}

void wk_send_cmd(worker_t *w, msg_t *m)
{
    pthread_mutex_lock(&w->mu);
    q_push(&w->cmds, m);
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

void wk_cmd_release(worker_t *w, int32_t *blocks, int32_t n)
{
    if (n <= 0) {
        free(blocks);
        return;
    }
    msg_t *m = wk_new_msg(CMD_RELEASE, 0);
    if (!m) {
        PD_LOG_ERROR("worker: out of memory releasing %d blocks (they stay held)", n);
        free(blocks);
        return;
    }
    m->blocks = blocks;
    m->n_blocks = n;
    wk_send_cmd(w, m);
}

void wk_cmd_cancel(worker_t *w, uint64_t task)
{
    msg_t *m = wk_new_msg(CMD_CANCEL, task);
    if (m)
        wk_send_cmd(w, m);
}
