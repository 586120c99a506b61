/* worker.c - see worker.h. The engine thread's side is at the top (commands in,
 * events out), then the I/O thread's: the router connection, the prefill side's held
 * blocks, the decode side's reservations and reads, and the poll loop. */
#define _GNU_SOURCE
#include "common/worker.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/engine.h"
#include "common/kvxfer.h"
#include "common/log.h"
#include "common/model.h"
#include "common/rpc.h"

#define MAX_DATA_FRAME  (64u << 20)
#define KV_DATA_POS     256 /* positions per KV_DATA frame */
#define REGISTER_RETRY  1000
#define MAX_PROMPT_WIRE (1 << 20)

/* ---- options ------------------------------------------------------------------------ */

typedef struct wopts {
    pd_worker_role_t role;
    const char *model, *tokenizer, *router, *name;
    int threads;
    pd_engine_opts_t eo;
    Pd__KvTransport transport;
    int32_t layerwise_min;
    int drain_timeout_s;
    bool local_prefill;
} wopts_t;

/* ---- the queues between the threads --------------------------------------------------- */

enum {
    /* commands (I/O -> engine) */
    CMD_PREFILL = 1, /* a prefill-only request */
    CMD_DECODE,      /* a whole request (local prefill) */
    CMD_ADMIT,       /* a prefilled request */
    CMD_RESERVE,     /* n blocks for task */
    CMD_RELEASE,     /* blocks back to the pool */
    CMD_CANCEL,      /* stop task (and forget its pending reservation) */
    /* events (engine -> I/O) */
    EV_LAYER,
    EV_PREFILLED,
    EV_TOKEN,
    EV_FINISH,
    EV_RESERVED,
    EV_FAILED,
};

typedef struct msg msg_t;
struct msg {
    msg_t *next;
    int type;
    uint64_t task;
    int32_t a, b;    /* layer, pos_end / token, index / first token / n blocks to reserve */
    int32_t *ids;    /* prompt (commands) */
    int32_t n_ids;
    int32_t *blocks; /* block ids */
    int32_t n_blocks;
    int32_t *stop;
    int32_t n_stop;
    pd_sampler_params_t sp;
    int32_t max_tokens, first_index;
    bool ignore_eos, has_rng, layerwise;
    uint64_t rng[4];
    uint64_t checksum;
    int32_t cached;
    const char *reason; /* static string */
    pd_status_t st;
};

typedef struct queue {
    msg_t *head, *tail;
} queue_t;

static void q_push(queue_t *q, msg_t *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
}

static void msg_free(msg_t *m)
{
    if (!m)
        return;
    free(m->ids);
    free(m->blocks);
    free(m->stop);
    free(m);
}

static int32_t *dup_ids(const int32_t *src, int32_t n)
{
    if (n <= 0)
        return NULL;
    int32_t *d = malloc((size_t)n * sizeof *d);
    if (d)
        memcpy(d, src, (size_t)n * sizeof *d);
    return d;
}

/* ---- the worker ------------------------------------------------------------------------ */

typedef struct etask etask_t; /* engine thread's view of a task */
typedef struct dtask dtask_t; /* decode side (I/O thread) */
typedef struct ptask ptask_t; /* prefill side (I/O thread) */
typedef struct peer peer_t;   /* a prefill worker this decode worker reads from */

typedef struct load {
    int32_t free_blocks, total_blocks, running, waiting;
    int64_t queued_prefill, tasks_done, tokens_out;
} load_t;

typedef struct worker {
    wopts_t o;
    pd_model_t *model;
    pd_kernels_t *kernels;
    pd_engine_t *engine;
    pd_kv_pool_t *kv; /* the engine's; its memory is read by both threads, disjointly */
    int32_t bs, n_layers, vocab;
    size_t row_bytes, layer_bytes;
    uint8_t digest[PD_DIGEST_BYTES];

    /* threads */
    pthread_t engine_thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    queue_t cmds, events;
    bool quit;
    int evfd;
    load_t load; /* published by the engine thread under mu */

    /* engine thread only */
    etask_t *etasks;
    queue_t reserves; /* CMD_RESERVE waiting for blocks, in order */
    int64_t queued_prefill, tasks_done, tokens_out;

    /* I/O thread only */
    void *zctx, *sock;
    pd_ucx_t *ucx;
    pd_ucx_region_t *reg_k, *reg_v;
    bool registered, draining;
    uint64_t worker_id;
    uint64_t reg_seq; /* this registration's number: the request id of REGISTER and of
                         every heartbeat, so replies to an older one are told apart */
    uint32_t heartbeat_ms;
    uint64_t next_heartbeat, next_register, drain_deadline;
    dtask_t *dtasks;
    ptask_t *ptasks;
    peer_t *peers;
    int64_t kv_bytes;
    int sigpipe[2];
} worker_t;

static worker_t *g_worker; /* for the signal handler's pipe */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- engine thread ------------------------------------------------------------------------ */

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

static msg_t *new_msg(int type, uint64_t task)
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

static void on_layer(void *user, int32_t layer, const pd_engine_progress_t *seqs, int32_t n)
{
    worker_t *w = user;
    for (int32_t i = 0; i < n; i++) {
        etask_t *t = seqs[i].user;
        if (!t || t->kind != K_PREFILL || !t->layerwise)
            continue;
        msg_t *m = new_msg(EV_LAYER, t->task);
        if (!m)
            continue;
        m->a = layer;
        m->b = seqs[i].pos_end;
        m->n_blocks = (seqs[i].pos_end + w->bs - 1) / w->bs;
        m->blocks = dup_ids(seqs[i].blocks, m->n_blocks);
        if (!m->blocks) {
            msg_free(m);
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
    msg_t *m = new_msg(EV_TOKEN, t->task);
    if (!m)
        return;
    m->a = tok;
    m->b = t->first_index + t->n_out++;
    m->has_rng = pd_engine_rng_state(w->engine, id, m->rng) == PD_OK;
    w->tokens_out++;
    emit(w, m);
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
        m = new_msg(EV_PREFILLED, t->task);
        if (m) {
            m->a = r->ids[0];
            m->n_blocks = r->n_kv_blocks;
            m->blocks = dup_ids(r->kv_blocks, r->n_kv_blocks);
            m->checksum = pd_kv_checksum(w->kv, r->kv_blocks, r->n_prompt);
            memcpy(m->rng, r->rng_state, sizeof m->rng);
            m->has_rng = true;
            m->cached = r->cached_tokens;
            m->b = r->n_prompt;
        }
        if (!m || !m->blocks) {
            /* out of memory: give the blocks back and fail the task */
            pd_kv_pool_release(w->kv, r->kv_blocks, r->n_kv_blocks);
            msg_free(m);
            m = new_msg(EV_FAILED, t->task);
            if (m)
                m->st = PD_ERR_NOMEM;
        }
    } else if (r->finish == PD_ENGINE_FINISH_ERROR) {
        m = new_msg(EV_FAILED, t->task);
        if (m)
            m->st = r->status;
    } else if (t->kind == K_DECODE && r->finish != PD_ENGINE_FINISH_CANCELLED) {
        m = new_msg(EV_FINISH, t->task);
        if (m) {
            m->reason = pd_engine_finish_str(r->finish);
            m->cached = r->cached_tokens;
        }
    }
    if (m)
        emit(w, m);
    free(t);
}

static void engine_fail(worker_t *w, uint64_t task, pd_status_t st)
{
    msg_t *m = new_msg(EV_FAILED, task);
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
                msg_free(r);
            else
                q_push(&keep, r);
        }
        w->reserves = keep;
        break;
    }
    default:
        break;
    }
    msg_free(c);
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
        msg_t *m = new_msg(EV_RESERVED, r->task);
        if (!m) {
            pd_kv_pool_release(w->kv, blocks, r->a);
            free(blocks);
            engine_fail(w, r->task, PD_ERR_NOMEM);
        } else {
            m->blocks = blocks;
            m->n_blocks = r->a;
            emit(w, m);
        }
        msg_free(r);
    }
}

static void publish_load(worker_t *w)
{
    load_t l = {.free_blocks = pd_kv_pool_n_free(w->kv),
                .total_blocks = pd_kv_pool_n_blocks(w->kv),
                .running = pd_engine_n_running(w->engine),
                .waiting = pd_engine_n_pending(w->engine) - pd_engine_n_running(w->engine),
                .queued_prefill = w->queued_prefill,
                .tasks_done = w->tasks_done,
                .tokens_out = w->tokens_out};
    pthread_mutex_lock(&w->mu);
    w->load = l;
    pthread_mutex_unlock(&w->mu);
}

static void *engine_main(void *arg)
{
    worker_t *w = arg;
    publish_load(w);
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
                msg_free(c);
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
        publish_load(w);
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
        msg_free(r);
    }
    w->reserves.tail = NULL;
    while (w->etasks)
        pd_engine_cancel(w->engine, w->etasks->eid);
    return NULL;
}

static void send_cmd(worker_t *w, msg_t *m)
{
    pthread_mutex_lock(&w->mu);
    q_push(&w->cmds, m);
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

static void cmd_release(worker_t *w, int32_t *blocks, int32_t n)
{
    if (n <= 0) {
        free(blocks);
        return;
    }
    msg_t *m = new_msg(CMD_RELEASE, 0);
    if (!m) {
        PD_LOG_ERROR("worker: out of memory releasing %d blocks (they stay held)", n);
        free(blocks);
        return;
    }
    m->blocks = blocks;
    m->n_blocks = n;
    send_cmd(w, m);
}

static void cmd_cancel(worker_t *w, uint64_t task)
{
    msg_t *m = new_msg(CMD_CANCEL, task);
    if (m)
        send_cmd(w, m);
}

/* ---- I/O thread: sending ---------------------------------------------------------------- */

static void send_env(worker_t *w, Pd__Envelope *env, const void *data, size_t len)
{
    if (pd_rpc_send(w->sock, NULL, 0, env, data, len) != 0)
        PD_LOG_WARN("worker: cannot send %s: %s", pd_rpc_method_name(env->method),
                    zmq_strerror(errno));
}

static void send_failed(worker_t *w, uint64_t task, Pd__ErrorCode code, const char *what)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__TASK_FAILED, task);
    Pd__TaskFailed tf = PD__TASK_FAILED__INIT;
    Pd__Error err = PD__ERROR__INIT;
    err.code = code;
    err.message = (char *)what;
    tf.error = &err;
    env.task_failed = &tf;
    send_env(w, &env, NULL, 0);
}

static Pd__ErrorCode status_code(pd_status_t st)
{
    switch (st) {
    case PD_ERR_INVALID:
    case PD_ERR_RANGE:
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    case PD_ERR_NOMEM:
        return PD__ERROR_CODE__UNAVAILABLE;
    default:
        return PD__ERROR_CODE__INTERNAL;
    }
}

/* ---- I/O thread: the prefill side ---------------------------------------------------------- */

struct ptask {
    ptask_t *next;
    uint64_t task;
    int32_t n_prompt;
    bool layerwise, prefilled;
    int32_t *blocks; /* held after the prefill */
    int32_t n_blocks;
    int32_t *sent;   /* ZeroMQ transport: positions sent per layer */
    int32_t *ready;  /* ... and computed per layer */
    int32_t *cur;    /* ... in these blocks (the latest table seen) */
    int32_t n_cur;
    bool target_rcvd, done_pending; /* KV_TARGET seen; KV_DONE waits for it */
    int32_t first_token, cached;
    uint64_t checksum, rng[4];
    uint32_t lease_ms;
    uint64_t hold_until; /* mono ms */
};

static ptask_t *ptask_find(worker_t *w, uint64_t task)
{
    for (ptask_t *t = w->ptasks; t; t = t->next)
        if (t->task == task)
            return t;
    return NULL;
}

static void ptask_drop(worker_t *w, ptask_t *t, bool cancel_engine)
{
    for (ptask_t **p = &w->ptasks; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            break;
        }
    if (t->prefilled)
        cmd_release(w, t->blocks, t->n_blocks); /* takes the array */
    else {
        free(t->blocks);
        if (cancel_engine)
            cmd_cancel(w, t->task);
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
    const uint8_t *kb = (const uint8_t *)pd_kv_pool_k(w->kv, 0) + (size_t)layer * w->layer_bytes;
    const uint8_t *vb = (const uint8_t *)pd_kv_pool_v(w->kv, 0) + (size_t)layer * w->layer_bytes;
    for (int32_t p0 = from; p0 < to; p0 += KV_DATA_POS) {
        int32_t n = to - p0 < KV_DATA_POS ? to - p0 : KV_DATA_POS;
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *base = kv ? vb : kb;
            for (int32_t i = 0; i < n; i++) {
                int32_t pos = p0 + i;
                size_t off = ((size_t)blocks[pos / w->bs] * (size_t)w->bs +
                              (size_t)(pos % w->bs)) * row;
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
        send_env(w, &env, buf, 2 * (size_t)n * row);
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
        ptask_drop(w, t, false); /* the rows are out: nothing to hold */
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

static void on_ev_layer(worker_t *w, msg_t *m)
{
    ptask_t *t = ptask_find(w, m->task);
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
    send_env(w, &env, NULL, 0);
}

static void on_ev_prefilled(worker_t *w, msg_t *m)
{
    ptask_t *t = ptask_find(w, m->task);
    if (!t) { /* cancelled meanwhile */
        cmd_release(w, m->blocks, m->n_blocks);
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
            send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
            ptask_drop(w, t, false);
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
    send_env(w, &env, NULL, 0);
}

static void on_kv_target(worker_t *w, uint64_t task)
{
    ptask_t *t = ptask_find(w, task);
    if (!t)
        return;
    t->target_rcvd = true;
    if (w->o.transport == PD__KV_TRANSPORT__ZMQ)
        zmq_flush(w, t);
}

static void on_prefill_task(worker_t *w, const Pd__Envelope *env)
{
    const Pd__PrefillTask *pt = env->prefill_task;
    if (w->draining) {
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "worker draining");
        return;
    }
    if (ptask_find(w, env->request_id)) {
        send_failed(w, env->request_id, PD__ERROR_CODE__DUPLICATE, "task already here");
        return;
    }
    if (pt->n_ids < 1 || pt->n_ids > MAX_PROMPT_WIRE ||
        (pt->n_rng_state != 0 && pt->n_rng_state != 4)) {
        send_failed(w, env->request_id, PD__ERROR_CODE__INVALID_ARGUMENT,
                    "a prefill task needs 1.. prompt ids and 0 or 4 rng words");
        return;
    }
    ptask_t *t = calloc(1, sizeof *t);
    msg_t *c = new_msg(CMD_PREFILL, env->request_id);
    if (t) {
        t->sent = calloc((size_t)w->n_layers, sizeof *t->sent);
        t->ready = calloc((size_t)w->n_layers, sizeof *t->ready);
    }
    if (c)
        c->ids = dup_ids(pt->ids, (int32_t)pt->n_ids);
    if (!t || !c || !t->sent || !t->ready || !c->ids) {
        if (t) {
            free(t->sent);
            free(t->ready);
        }
        free(t);
        msg_free(c);
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
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
    send_cmd(w, c);
}

/* ---- I/O thread: the decode side ----------------------------------------------------------- */

/* A prefill worker's pool as its registration describes it; the UCX endpoint is
 * made when the first read is due (the worker has just shown it is alive), not when
 * the task arrives. */
struct peer {
    peer_t *next;
    uint64_t wid;
    pd_ucx_peer_t *p;
    size_t layer_bytes; /* the remote pool's */
    uint8_t *addr, *rkey[2];
    size_t addr_len, rkey_len[2];
    uint64_t base[2], len[2];
};

static void peer_free_desc(peer_t *pe)
{
    free(pe->addr);
    free(pe->rkey[0]);
    free(pe->rkey[1]);
    pe->addr = pe->rkey[0] = pe->rkey[1] = NULL;
}

static uint8_t *dup_bytes(const ProtobufCBinaryData *b)
{
    uint8_t *d = malloc(b->len ? b->len : 1);
    if (d && b->len)
        memcpy(d, b->data, b->len);
    return d;
}

enum { D_RESERVING = 1, D_PULLING, D_RUNNING };

struct dtask {
    dtask_t *next;
    uint64_t task;
    int state;
    bool local;
    int32_t *prompt;
    int32_t n_prompt;
    pd_sampler_params_t sp;
    int32_t max_tokens, first_index;
    bool ignore_eos;
    int32_t *stop;
    int32_t n_stop;
    uint64_t prefill_wid;
    peer_t *peer;
    int32_t *blocks; /* reserved */
    int32_t n_blocks;
    int32_t *src; /* the prefill worker's blocks */
    int32_t n_src;
    int32_t *ready;  /* per layer: positions announced */
    int32_t *pulled; /* per layer: positions read (or copied) */
    bool done_rcvd, get_failed;
    int32_t first_token, cached;
    uint64_t checksum, rng[4];
    int64_t outstanding;
    uint64_t lease_until;
    double t_first_get, t_kv_done; /* seconds (now_s): the transfer's timeline */
    int64_t bytes_read;
    /* the chunk being gathered */
    int32_t *out;
    int32_t n_out, cap_out;
    uint32_t out_index;
    uint64_t out_rng[4];
    bool has_out_rng;
    const char *finish;
};

static dtask_t *dtask_find(worker_t *w, uint64_t task)
{
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->task == task)
            return t;
    return NULL;
}

static void dtask_free(dtask_t *t)
{
    free(t->prompt);
    free(t->stop);
    free(t->blocks);
    free(t->src);
    free(t->ready);
    free(t->pulled);
    free(t->out);
    free(t);
}

static void dtask_unlink(worker_t *w, dtask_t *t)
{
    for (dtask_t **p = &w->dtasks; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            return;
        }
}

/* Force-closes a peer: every read from it completes (failed) now. */
static void peer_close(worker_t *w, peer_t *pe)
{
    (void)w;
    if (pe && pe->p)
        pd_ucx_peer_destroy(&pe->p);
}

/* Ends a decode task that is not running in the engine: its reads are stopped (the
 * peer is closed if any is in flight, so no byte lands later), then its blocks go back. */
static void dtask_abandon(worker_t *w, dtask_t *t)
{
    if (t->outstanding > 0)
        peer_close(w, t->peer); /* runs the callbacks: outstanding becomes 0 */
    dtask_unlink(w, t);
    if (t->state == D_RUNNING || t->local) {
        cmd_cancel(w, t->task);
    } else if (t->state == D_RESERVING) {
        cmd_cancel(w, t->task); /* the reservation may still be granted: see on_reserved */
    } else {
        cmd_release(w, t->blocks, t->n_blocks);
        t->blocks = NULL;
    }
    dtask_free(t);
}

static void get_done(void *user, pd_status_t st)
{
    dtask_t *t = user;
    t->outstanding--;
    if (st != PD_OK)
        t->get_failed = true;
}

/* The peer entry of prefill worker wid, described by src (a changed description, as
 * after the worker registered again, replaces the old one and its endpoint). */
static peer_t *peer_get(worker_t *w, uint64_t wid, const Pd__UcxSource *src)
{
    if (!src || !src->worker_address.len || !src->rkey_k.len || !src->rkey_v.len ||
        !src->len_k)
        return NULL;
    peer_t *pe = NULL;
    for (pe = w->peers; pe; pe = pe->next)
        if (pe->wid == wid)
            break;
    if (pe && pe->addr_len == src->worker_address.len &&
        !memcmp(pe->addr, src->worker_address.data, pe->addr_len) &&
        pe->base[0] == src->base_k && pe->base[1] == src->base_v)
        return pe;
    if (!pe) {
        pe = calloc(1, sizeof *pe);
        if (!pe)
            return NULL;
        pe->wid = wid;
        pe->next = w->peers;
        w->peers = pe;
    }
    if (pe->p)
        pd_ucx_peer_destroy(&pe->p);
    peer_free_desc(pe);
    pe->addr = dup_bytes(&src->worker_address);
    pe->rkey[0] = dup_bytes(&src->rkey_k);
    pe->rkey[1] = dup_bytes(&src->rkey_v);
    if (!pe->addr || !pe->rkey[0] || !pe->rkey[1]) {
        peer_free_desc(pe);
        return NULL;
    }
    pe->addr_len = src->worker_address.len;
    pe->rkey_len[0] = src->rkey_k.len;
    pe->rkey_len[1] = src->rkey_v.len;
    pe->base[0] = src->base_k;
    pe->base[1] = src->base_v;
    pe->len[0] = src->len_k;
    pe->len[1] = src->len_v;
    pe->layer_bytes = (size_t)(src->len_k / (uint64_t)w->n_layers);
    return pe;
}

/* The endpoint, made now if there is none (or the old one failed). */
static bool peer_connect(worker_t *w, peer_t *pe)
{
    if (pe->p && !pd_ucx_peer_failed(pe->p))
        return true;
    if (pe->p)
        pd_ucx_peer_destroy(&pe->p);
    if (!pe->addr)
        return false;
    const void *rk[2] = {pe->rkey[0], pe->rkey[1]};
    return pd_ucx_peer_new(w->ucx, pe->addr, pe->addr_len, 2, rk, pe->rkey_len, pe->base,
                           pe->len, &pe->p) == PD_OK;
}

/* Reads what has been announced and not read yet: per layer, whole blocks (the last,
 * partial one once the prompt is complete), runs of consecutive block ids on both
 * sides coalesced into one get per K and V. */
static void dtask_pull(worker_t *w, dtask_t *t)
{
    if (t->state != D_PULLING || !t->peer || t->get_failed)
        return;
    bool due = t->done_rcvd;
    for (int32_t l = 0; l < w->n_layers && !due; l++)
        due = t->ready[l] > t->pulled[l];
    if (!due)
        return;
    if (!peer_connect(w, t->peer)) {
        PD_LOG_ERROR("worker: task %llu: cannot reach prefill worker %llu over UCX",
                     (unsigned long long)t->task, (unsigned long long)t->prefill_wid);
        t->get_failed = true;
        return;
    }
    size_t bb = w->row_bytes * (size_t)w->bs;
    for (int32_t l = 0; l < w->n_layers; l++) {
        int32_t avail = t->done_rcvd ? t->n_prompt : t->ready[l];
        int32_t target = avail >= t->n_prompt ? t->n_prompt : avail / w->bs * w->bs;
        if (target <= t->pulled[l])
            continue;
        int32_t b0 = t->pulled[l] / w->bs, b1 = (target + w->bs - 1) / w->bs;
        if (b1 > t->n_src || b1 > t->n_blocks) {
            t->get_failed = true; /* the announcement does not match the prompt */
            PD_LOG_ERROR("worker: task %llu announces %d blocks for %d reserved",
                         (unsigned long long)t->task, t->n_src, t->n_blocks);
            return;
        }
        for (int32_t b = b0; b < b1;) {
            int32_t e = b + 1;
            while (e < b1 && t->src[e] == t->src[e - 1] + 1 &&
                   t->blocks[e] == t->blocks[e - 1] + 1)
                e++;
            size_t len = (size_t)(e - b) * bb;
            for (int kv = 0; kv < 2; kv++) {
                uint64_t roff = (uint64_t)l * t->peer->layer_bytes + (uint64_t)t->src[b] * bb;
                uint8_t *dst = (uint8_t *)(kv ? pd_kv_pool_v(w->kv, l) : pd_kv_pool_k(w->kv, l)) +
                               (size_t)t->blocks[b] * bb;
                if (!t->t_first_get)
                    t->t_first_get = now_s();
                t->outstanding++;
                t->bytes_read += (int64_t)len;
                pd_status_t st = pd_ucx_get(t->peer->p, kv, roff, dst, len,
                                            kv ? w->reg_v : w->reg_k, get_done, t);
                if (st != PD_OK) {
                    t->outstanding--;
                    t->get_failed = true;
                    return;
                }
                w->kv_bytes += (int64_t)len;
            }
            b = e;
        }
        t->pulled[l] = target;
    }
}

static void chunk_push(dtask_t *t, int32_t tok, uint32_t index, const uint64_t *rng)
{
    if (t->n_out == 0)
        t->out_index = index;
    if (t->n_out == t->cap_out) {
        int32_t cap = t->cap_out ? 2 * t->cap_out : 16;
        int32_t *o = realloc(t->out, (size_t)cap * sizeof *o);
        if (!o)
            return; /* dropped: the router re-runs on a gap? no: logged */
        t->out = o;
        t->cap_out = cap;
    }
    t->out[t->n_out++] = tok;
    if (rng) {
        memcpy(t->out_rng, rng, sizeof t->out_rng);
        t->has_out_rng = true;
    }
}

static void chunk_flush(worker_t *w, dtask_t *t)
{
    if (!t->n_out && !t->finish)
        return;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__TOKEN_CHUNK, t->task);
    Pd__TokenChunk c = PD__TOKEN_CHUNK__INIT;
    c.index = t->n_out ? t->out_index : (uint32_t)t->first_index;
    c.n_ids = (size_t)t->n_out;
    c.ids = t->out;
    c.finish_reason = (char *)(t->finish ? t->finish : "");
    if (t->has_out_rng) {
        c.n_rng_state = 4;
        c.rng_state = t->out_rng;
    }
    c.cached_tokens = (uint32_t)t->cached;
    env.token_chunk = &c;
    send_env(w, &env, NULL, 0);
    t->n_out = 0;
}

/* All KV read and KV_DONE in: check, release the source, admit. True when the task
 * left the PULLING state (admitted, or failed and gone). */
static bool dtask_check(worker_t *w, dtask_t *t)
{
    if (t->state != D_PULLING || t->outstanding > 0)
        return false;
    Pd__Envelope env;
    Pd__KvRelease rel = PD__KV_RELEASE__INIT;
    if (t->get_failed) {
        pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
        env.kv_release = &rel;
        send_env(w, &env, NULL, 0);
        send_failed(w, t->task, PD__ERROR_CODE__INTERNAL, "reading the KV failed");
        dtask_abandon(w, t);
        return true;
    }
    if (!t->done_rcvd)
        return false;
    for (int32_t l = 0; l < w->n_layers; l++)
        if (t->pulled[l] < t->n_prompt)
            return false;
    double t_read = now_s();
    uint64_t sum = pd_kv_checksum(w->kv, t->blocks, t->n_prompt);
    if (t->bytes_read > 0 && t_read > t->t_first_get)
        PD_LOG_INFO("worker: task %llu: KV of %d tokens, %lld bytes read in %.3f ms "
                    "(%.3f GB/s), the last %.3f ms after KV_DONE",
                    (unsigned long long)t->task, t->n_prompt, (long long)t->bytes_read,
                    (t_read - t->t_first_get) * 1e3,
                    (double)t->bytes_read / (t_read - t->t_first_get) * 1e-9,
                    (t_read - t->t_kv_done) * 1e3);
    rel.ok = sum == t->checksum;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
    env.kv_release = &rel;
    send_env(w, &env, NULL, 0);
    if (!rel.ok) {
        PD_LOG_ERROR("worker: task %llu: KV checksum %016llx, the prefill worker sent "
                     "%016llx",
                     (unsigned long long)t->task, (unsigned long long)sum,
                     (unsigned long long)t->checksum);
        send_failed(w, t->task, PD__ERROR_CODE__CHECKSUM_MISMATCH, "KV checksum mismatch");
        dtask_abandon(w, t);
        return true;
    }
    msg_t *c = new_msg(CMD_ADMIT, t->task);
    if (!c) {
        send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        dtask_abandon(w, t);
        return true;
    }
    c->ids = t->prompt;
    c->n_ids = t->n_prompt;
    t->prompt = NULL;
    c->blocks = t->blocks;
    c->n_blocks = t->n_blocks;
    t->blocks = NULL;
    c->stop = t->stop;
    c->n_stop = t->n_stop;
    t->stop = NULL;
    c->sp = t->sp;
    c->max_tokens = t->max_tokens;
    c->ignore_eos = t->ignore_eos;
    c->first_index = t->first_index;
    c->a = t->first_token;
    memcpy(c->rng, t->rng, sizeof c->rng);
    c->has_rng = true;
    t->state = D_RUNNING;
    chunk_push(t, t->first_token, (uint32_t)t->first_index, t->rng);
    send_cmd(w, c);
    return true;
}

static void on_decode_task(worker_t *w, const Pd__Envelope *env)
{
    const Pd__DecodeTask *dt = env->decode_task;
    if (w->draining) {
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "worker draining");
        return;
    }
    if (dtask_find(w, env->request_id)) {
        send_failed(w, env->request_id, PD__ERROR_CODE__DUPLICATE, "task already here");
        return;
    }
    if (dt->n_ids < 1 || dt->n_ids > MAX_PROMPT_WIRE ||
        (dt->n_rng_state != 0 && dt->n_rng_state != 4)) {
        send_failed(w, env->request_id, PD__ERROR_CODE__INVALID_ARGUMENT,
                    "a decode task needs 1.. prompt ids and 0 or 4 rng words");
        return;
    }
    if (dt->local_prefill && !w->o.local_prefill) {
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                    "this decode worker does not prefill (--local-prefill)");
        return;
    }
    dtask_t *t = calloc(1, sizeof *t);
    if (!t) {
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return;
    }
    t->task = env->request_id;
    t->local = dt->local_prefill;
    t->n_prompt = (int32_t)dt->n_ids;
    t->prompt = dup_ids(dt->ids, t->n_prompt);
    t->n_stop = (int32_t)dt->n_stop_ids;
    t->stop = dup_ids(dt->stop_ids, t->n_stop);
    t->ready = calloc((size_t)w->n_layers, sizeof *t->ready);
    t->pulled = calloc((size_t)w->n_layers, sizeof *t->pulled);
    t->sp = pd_sampler_params_default();
    if (dt->sampling) {
        t->sp.temperature = dt->sampling->temperature;
        t->sp.top_p = dt->sampling->top_p > 0 ? dt->sampling->top_p : 1.0f;
        t->sp.top_k = dt->sampling->top_k;
        t->sp.min_p = dt->sampling->min_p;
        t->sp.seed = dt->sampling->seed;
    }
    t->max_tokens = dt->max_tokens;
    t->ignore_eos = dt->ignore_eos;
    t->first_index = (int32_t)dt->first_index;
    t->prefill_wid = dt->prefill_worker_id;
    t->lease_until = pd_rpc_mono_ms() + (dt->lease_ms ? dt->lease_ms : 10000);
    if (!t->prompt || (t->n_stop && !t->stop) || !t->ready || !t->pulled) {
        dtask_free(t);
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return;
    }
    if (t->local) {
        msg_t *c = new_msg(CMD_DECODE, t->task);
        if (!c) {
            dtask_free(t);
            send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
            return;
        }
        c->ids = dup_ids(t->prompt, t->n_prompt);
        c->n_ids = t->n_prompt;
        c->stop = dup_ids(t->stop, t->n_stop);
        c->n_stop = t->n_stop;
        c->sp = t->sp;
        c->max_tokens = t->max_tokens;
        c->ignore_eos = t->ignore_eos;
        c->first_index = t->first_index;
        if (dt->n_rng_state == 4) {
            memcpy(c->rng, dt->rng_state, sizeof c->rng);
            c->has_rng = true;
        }
        t->state = D_RUNNING;
        t->next = w->dtasks;
        w->dtasks = t;
        send_cmd(w, c);
        return;
    }
    if (w->o.transport == PD__KV_TRANSPORT__UCX) {
        t->peer = peer_get(w, t->prefill_wid, dt->source);
        if (!t->peer) {
            dtask_free(t);
            send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                        "the task names no UCX address for its prefill worker");
            return;
        }
    }
    msg_t *c = new_msg(CMD_RESERVE, t->task);
    if (!c) {
        dtask_free(t);
        send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return;
    }
    c->a = (t->n_prompt + w->bs - 1) / w->bs;
    t->state = D_RESERVING;
    t->next = w->dtasks;
    w->dtasks = t;
    send_cmd(w, c);
}

static void on_ev_reserved(worker_t *w, msg_t *m)
{
    dtask_t *t = dtask_find(w, m->task);
    if (!t || t->state != D_RESERVING) { /* abandoned meanwhile */
        cmd_release(w, m->blocks, m->n_blocks);
        m->blocks = NULL;
        return;
    }
    t->blocks = m->blocks;
    t->n_blocks = m->n_blocks;
    m->blocks = NULL;
    t->state = D_PULLING;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_TARGET, t->task);
    Pd__KvTarget kt = PD__KV_TARGET__INIT;
    kt.n_blocks = (uint32_t)t->n_blocks;
    kt.lease_until_ms = pd_rpc_realtime_ms() + (t->lease_until - pd_rpc_mono_ms());
    env.kv_target = &kt;
    send_env(w, &env, NULL, 0);
    dtask_pull(w, t);
    dtask_check(w, t);
}

static bool take_src(dtask_t *t, const int32_t *src, size_t n)
{
    if (n == 0)
        return true;
    if (n > (size_t)t->n_prompt)
        return false;
    if ((int32_t)n > t->n_src) {
        int32_t *s = realloc(t->src, n * sizeof *s);
        if (!s)
            return false;
        t->src = s;
    }
    memcpy(t->src, src, n * sizeof *src);
    t->n_src = (int32_t)n;
    return true;
}

static void on_kv_ready(worker_t *w, const Pd__Envelope *env)
{
    dtask_t *t = dtask_find(w, env->request_id);
    const Pd__KvReady *r = env->kv_ready;
    if (!t || t->local || t->state == D_RUNNING)
        return;
    if (!take_src(t, r->src_blocks, r->n_src_blocks) || r->n_tokens > (uint32_t)t->n_prompt ||
        r->layers_done > (uint32_t)w->n_layers) {
        t->get_failed = true;
    } else {
        for (uint32_t l = 0; l < r->layers_done; l++)
            if ((int32_t)r->n_tokens > t->ready[l])
                t->ready[l] = (int32_t)r->n_tokens;
    }
    dtask_pull(w, t);
    dtask_check(w, t);
}

static void on_kv_done(worker_t *w, const Pd__Envelope *env)
{
    dtask_t *t = dtask_find(w, env->request_id);
    const Pd__KvDone *d = env->kv_done;
    if (!t || t->local || t->state == D_RUNNING)
        return;
    if (d->n_tokens != (uint32_t)t->n_prompt || d->n_rng_state != 4 ||
        d->first_token < 0 || d->first_token >= w->vocab ||
        (w->o.transport == PD__KV_TRANSPORT__UCX &&
         (d->n_src_blocks != (size_t)(t->n_prompt + w->bs - 1) / (size_t)w->bs ||
          !take_src(t, d->src_blocks, d->n_src_blocks)))) {
        PD_LOG_ERROR("worker: task %llu: a malformed KV_DONE", (unsigned long long)t->task);
        t->get_failed = true;
    } else {
        t->done_rcvd = true;
        t->t_kv_done = now_s();
        t->first_token = d->first_token;
        t->checksum = d->checksum;
        t->cached = (int32_t)d->cached_tokens;
        memcpy(t->rng, d->rng_state, sizeof t->rng);
    }
    dtask_pull(w, t);
    dtask_check(w, t);
}

static void on_kv_data(worker_t *w, const pd_rpc_msg_t *msg)
{
    const Pd__Envelope *env = msg->env;
    dtask_t *t = dtask_find(w, env->request_id);
    if (!t || t->state != D_PULLING) /* unknown, abandoned or not reserved yet */
        return;
    const Pd__KvData *d = env->kv_data;
    size_t row = w->row_bytes;
    size_t len = msg->has_data ? zmq_msg_size((zmq_msg_t *)&msg->data) : 0;
    if (d->layer >= (uint32_t)w->n_layers || d->pos0 != (uint32_t)t->pulled[d->layer] ||
        d->n_pos == 0 || d->pos0 + d->n_pos > (uint32_t)t->n_prompt ||
        len != 2 * (size_t)d->n_pos * row) {
        PD_LOG_ERROR("worker: task %llu: KV_DATA out of order or of the wrong size",
                     (unsigned long long)t->task);
        t->get_failed = true;
        dtask_check(w, t);
        return;
    }
    const uint8_t *src = zmq_msg_data((zmq_msg_t *)&msg->data);
    for (int kv = 0; kv < 2; kv++) {
        uint8_t *base = kv ? pd_kv_pool_v(w->kv, (int)d->layer) : pd_kv_pool_k(w->kv, (int)d->layer);
        for (uint32_t i = 0; i < d->n_pos; i++) {
            uint32_t pos = d->pos0 + i;
            size_t off = ((size_t)t->blocks[pos / (uint32_t)w->bs] * (size_t)w->bs +
                          pos % (uint32_t)w->bs) * row;
            memcpy(base + off, src + ((size_t)kv * d->n_pos + i) * row, row);
        }
    }
    w->kv_bytes += (int64_t)len;
    t->pulled[d->layer] = (int32_t)(d->pos0 + d->n_pos);
    dtask_check(w, t);
}

static void on_ev_token(worker_t *w, msg_t *m)
{
    dtask_t *t = dtask_find(w, m->task);
    if (t)
        chunk_push(t, m->a, (uint32_t)m->b, m->has_rng ? m->rng : NULL);
}

static void on_ev_finish(worker_t *w, msg_t *m)
{
    dtask_t *t = dtask_find(w, m->task);
    if (!t)
        return;
    t->finish = m->reason;
    if (m->cached > t->cached)
        t->cached = m->cached;
    chunk_flush(w, t);
    dtask_unlink(w, t);
    dtask_free(t);
}

static void on_ev_failed(worker_t *w, msg_t *m)
{
    ptask_t *p = ptask_find(w, m->task);
    dtask_t *d = dtask_find(w, m->task);
    if (!p && !d)
        return;
    char what[128];
    snprintf(what, sizeof what, "engine: %s", pd_status_str(m->st));
    send_failed(w, m->task, status_code(m->st), what);
    if (p)
        ptask_drop(w, p, false);
    if (d) {
        if (d->state == D_RESERVING) /* the reservation failed: nothing held */
            d->state = D_PULLING;
        if (d->outstanding > 0)
            peer_close(w, d->peer);
        dtask_unlink(w, d);
        if (d->blocks)
            cmd_release(w, d->blocks, d->n_blocks);
        d->blocks = NULL;
        dtask_free(d);
    }
}

/* ---- I/O thread: the router -------------------------------------------------------------------- */

static void fill_load(worker_t *w, Pd__WorkerLoad *l)
{
    pthread_mutex_lock(&w->mu);
    load_t x = w->load;
    pthread_mutex_unlock(&w->mu);
    l->free_blocks = (uint32_t)x.free_blocks;
    l->total_blocks = (uint32_t)x.total_blocks;
    l->running = (uint32_t)x.running;
    l->waiting = (uint32_t)(x.waiting > 0 ? x.waiting : 0);
    /* decode tasks still reserving or reading their KV are load the engine cannot see
     * yet: count them as waiting, so that the router balances bursts */
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->state != D_RUNNING)
            l->waiting++;
    l->queued_prefill_tokens = (uint64_t)(x.queued_prefill > 0 ? x.queued_prefill : 0);
    uint32_t reserved = 0, held = 0;
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->blocks)
            reserved += (uint32_t)t->n_blocks;
    for (ptask_t *t = w->ptasks; t; t = t->next)
        if (t->prefilled)
            held += (uint32_t)t->n_blocks;
    l->reserved_blocks = reserved;
    l->held_blocks = held;
    l->tasks_done = (uint64_t)x.tasks_done;
    l->tokens_out = (uint64_t)x.tokens_out;
    l->kv_bytes = (uint64_t)w->kv_bytes;
    l->draining = w->draining;
}

static void send_register(worker_t *w)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__REGISTER, w->reg_seq);
    Pd__Register r = PD__REGISTER__INIT;
    r.role = w->o.role == PD_WORKER_PREFILL ? PD__ROLE__PREFILL : PD__ROLE__DECODE;
    r.name = (char *)w->o.name;
    const char *base = strrchr(w->o.model, '/');
    r.model = (char *)(base ? base + 1 : w->o.model);
    r.model_digest.data = w->digest;
    r.model_digest.len = PD_DIGEST_BYTES;
    Pd__KvLayout lay = PD__KV_LAYOUT__INIT;
    const pd_model_config_t *c = pd_model_config(w->model);
    lay.block_size = (uint32_t)w->bs;
    lay.dtype = (uint32_t)pd_kv_pool_dtype(w->kv);
    lay.n_layers = (uint32_t)c->n_layers;
    lay.n_kv_heads = (uint32_t)c->n_kv_heads;
    lay.head_dim = (uint32_t)c->head_dim;
    lay.n_blocks = (uint32_t)pd_kv_pool_n_blocks(w->kv);
    r.layout = &lay;
    r.kv_transport = w->o.transport;
    Pd__UcxSource src = PD__UCX_SOURCE__INIT;
    if (w->ucx) {
        const void *addr = NULL;
        size_t alen = 0;
        if (pd_ucx_address(w->ucx, &addr, &alen) == PD_OK) {
            src.worker_address.data = (uint8_t *)addr;
            src.worker_address.len = alen;
        }
        size_t kl = 0, vl = 0;
        const void *rk = pd_ucx_region_rkey(w->reg_k, &kl), *rv = pd_ucx_region_rkey(w->reg_v, &vl);
        src.rkey_k.data = (uint8_t *)rk;
        src.rkey_k.len = kl;
        src.rkey_v.data = (uint8_t *)rv;
        src.rkey_v.len = vl;
        src.base_k = (uint64_t)(uintptr_t)pd_kv_pool_k(w->kv, 0);
        src.base_v = (uint64_t)(uintptr_t)pd_kv_pool_v(w->kv, 0);
        src.len_k = src.len_v = (uint64_t)w->layer_bytes * (uint64_t)w->n_layers;
        r.ucx = &src;
    }
    r.max_seq_len = (uint32_t)pd_engine_max_seq_len(w->engine);
    r.vocab = (uint32_t)w->vocab;
    r.pid = (uint32_t)getpid();
    r.can_prefill = w->o.role == PD_WORKER_PREFILL || w->o.local_prefill;
    env.register_ = &r;
    send_env(w, &env, NULL, 0);
    w->next_register = pd_rpc_mono_ms() + REGISTER_RETRY;
}

static void send_heartbeat(worker_t *w)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__HEARTBEAT, w->reg_seq);
    Pd__Heartbeat hb = PD__HEARTBEAT__INIT;
    Pd__WorkerLoad l = PD__WORKER_LOAD__INIT;
    fill_load(w, &l);
    hb.worker_id = w->worker_id;
    hb.load = &l;
    env.heartbeat = &hb;
    send_env(w, &env, NULL, 0);
    w->next_heartbeat = pd_rpc_mono_ms() + w->heartbeat_ms;
}

/* Forgets every task (the router no longer knows this worker): engine requests are
 * cancelled, reads stopped, blocks released. */
static void drop_all(worker_t *w)
{
    while (w->dtasks)
        dtask_abandon(w, w->dtasks);
    while (w->ptasks)
        ptask_drop(w, w->ptasks, true);
}

static void on_register_reply(worker_t *w, uint64_t rid, const Pd__RegisterReply *r,
                              int *exit_code)
{
    if (rid != w->reg_seq)
        return; /* about an earlier registration (e.g. heartbeats queued while stopped) */
    if (r->accepted) {
        if (!w->registered)
            PD_LOG_INFO("worker %s: registered as %llu", w->o.name,
                        (unsigned long long)r->worker_id);
        w->registered = true;
        w->worker_id = r->worker_id;
        w->heartbeat_ms = r->heartbeat_ms ? r->heartbeat_ms : 100;
        w->next_heartbeat = pd_rpc_mono_ms();
        return;
    }
    if (w->registered) {
        PD_LOG_WARN("worker %s: the router no longer knows this worker (%s): dropping "
                    "every task and registering again",
                    w->o.name, r->reason ? r->reason : "");
        w->registered = false;
        drop_all(w);
        w->reg_seq++;
        send_register(w);
        return;
    }
    PD_LOG_ERROR("worker %s: registration refused: %s", w->o.name,
                 r->reason ? r->reason : "(no reason)");
    *exit_code = 1;
}

static void on_task_cancel(worker_t *w, uint64_t task)
{
    ptask_t *p = ptask_find(w, task);
    if (p)
        ptask_drop(w, p, true);
    dtask_t *d = dtask_find(w, task);
    if (d)
        dtask_abandon(w, d);
}

static void on_kv_release(worker_t *w, uint64_t task)
{
    ptask_t *p = ptask_find(w, task);
    if (p && p->prefilled)
        ptask_drop(w, p, false);
}

static void handle(worker_t *w, pd_rpc_msg_t *m, int *exit_code)
{
    if (!m->env) {
        PD_LOG_WARN("worker: a bad frame from the router: %s", m->err_msg);
        return;
    }
    const Pd__Envelope *env = m->env;
    switch (env->method) {
    case PD__METHOD__REGISTER_REPLY:
        on_register_reply(w, env->request_id, env->register_reply, exit_code);
        break;
    case PD__METHOD__PREFILL_TASK:
        on_prefill_task(w, env);
        break;
    case PD__METHOD__DECODE_TASK:
        on_decode_task(w, env);
        break;
    case PD__METHOD__KV_TARGET:
        on_kv_target(w, env->request_id);
        break;
    case PD__METHOD__KV_READY:
        on_kv_ready(w, env);
        break;
    case PD__METHOD__KV_DONE:
        on_kv_done(w, env);
        break;
    case PD__METHOD__KV_DATA:
        on_kv_data(w, m);
        break;
    case PD__METHOD__KV_RELEASE:
        on_kv_release(w, env->request_id);
        break;
    case PD__METHOD__TASK_CANCEL:
        on_task_cancel(w, env->request_id);
        break;
    case PD__METHOD__DRAIN:
        if (!w->draining) {
            PD_LOG_INFO("worker %s: draining (asked by the router)", w->o.name);
            w->draining = true;
            w->drain_deadline = pd_rpc_mono_ms() + (uint64_t)w->o.drain_timeout_s * 1000u;
        }
        break;
    case PD__METHOD__ERROR:
        PD_LOG_WARN("worker: the router answered %s: %s",
                    pd_rpc_error_name(env->error ? env->error->code : 0),
                    env->error && env->error->message ? env->error->message : "");
        break;
    default:
        PD_LOG_WARN("worker: unexpected %s from the router", pd_rpc_method_name(env->method));
        break;
    }
}

static void handle_events(worker_t *w)
{
    uint64_t n;
    ssize_t r = read(w->evfd, &n, sizeof n);
    (void)r;
    pthread_mutex_lock(&w->mu);
    msg_t *m = w->events.head;
    w->events.head = w->events.tail = NULL;
    pthread_mutex_unlock(&w->mu);
    while (m) {
        msg_t *next = m->next;
        switch (m->type) {
        case EV_LAYER:
            on_ev_layer(w, m);
            break;
        case EV_PREFILLED:
            on_ev_prefilled(w, m);
            break;
        case EV_TOKEN:
            on_ev_token(w, m);
            break;
        case EV_FINISH:
            on_ev_finish(w, m);
            break;
        case EV_RESERVED:
            on_ev_reserved(w, m);
            break;
        case EV_FAILED:
            on_ev_failed(w, m);
            break;
        default:
            break;
        }
        msg_free(m);
        m = next;
    }
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->n_out)
            chunk_flush(w, t);
}

static void check_timers(worker_t *w)
{
    uint64_t now = pd_rpc_mono_ms();
    for (dtask_t *t = w->dtasks, *next; t; t = next) {
        next = t->next;
        if (t->state != D_RUNNING && !t->local && now >= t->lease_until) {
            PD_LOG_WARN("worker: task %llu: the KV lease ended before the KV arrived",
                        (unsigned long long)t->task);
            Pd__Envelope env;
            Pd__KvRelease rel = PD__KV_RELEASE__INIT;
            pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
            env.kv_release = &rel;
            send_env(w, &env, NULL, 0);
            send_failed(w, t->task, PD__ERROR_CODE__LEASE_EXPIRED, "KV lease expired");
            dtask_abandon(w, t);
            next = w->dtasks; /* abandoning may have closed a peer: start over */
        }
    }
    for (ptask_t *t = w->ptasks, *next; t; t = next) {
        next = t->next;
        if (t->prefilled && now >= t->hold_until) {
            PD_LOG_WARN("worker: task %llu: no KV_RELEASE within the lease; releasing",
                        (unsigned long long)t->task);
            ptask_drop(w, t, false);
        }
    }
    if (!w->registered && now >= w->next_register)
        send_register(w);
    if (w->registered && now >= w->next_heartbeat)
        send_heartbeat(w);
}

/* ---- setup, the loop, the CLI ------------------------------------------------------------------ */

static void on_signal(int sig)
{
    (void)sig;
    if (g_worker) {
        char c = 1;
        ssize_t r = write(g_worker->sigpipe[1], &c, 1);
        (void)r;
    }
}

static void usage(FILE *f, pd_worker_role_t role)
{
    const char *n = role == PD_WORKER_PREFILL ? "pd-prefill" : "pd-decode";
    fprintf(f,
            "usage: %s --model M [--tokenizer T] [--router ENDPOINT] [--name NAME]\n"
            "         [--threads N] [--max-num-seqs N] [--batch N] [--kv-memory SIZE]\n"
            "         [--kv-blocks N] [--block-size N] [--kv-dtype auto|f32|f16]\n"
            "         [--no-prefix-cache] [--kv-transport ucx|zmq] [--kv-layerwise-min N]\n"
            "         [--drain-timeout S]%s [--log-level L]\n"
            "  Joins the router at ENDPOINT (its worker endpoint; default\n"
            "  tcp://127.0.0.1:5556) as a %s worker. Defaults: one thread per CPU,\n"
            "  64 sequences, 512 tokens per step, a KV pool of 1 GiB at most, blocks of\n"
            "  16, the ucx transport, layer-wise KV streaming from 256 prompt tokens,\n"
            "  30 s to drain on SIGTERM.\n",
            n, role == PD_WORKER_DECODE ? " [--local-prefill]" : "",
            role == PD_WORKER_PREFILL ? "prefill" : "decode");
}

static int parse_size(const char *s, int64_t *out)
{
    char *end = NULL;
    double v = strtod(s, &end);
    if (!end || end == s || !(v >= 0))
        return -1;
    double mul = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib") || !strcasecmp(end, "kb"))
        mul = 1024.0;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib") || !strcasecmp(end, "mb"))
        mul = 1024.0 * 1024;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib") || !strcasecmp(end, "gb"))
        mul = 1024.0 * 1024 * 1024;
    else if (*end)
        return -1;
    if (v * mul > 1e15)
        return -1;
    *out = (int64_t)(v * mul);
    return 0;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, pd_worker_role_t role, wopts_t *o)
{
    memset(o, 0, sizeof *o);
    o->role = role;
    o->router = "tcp://127.0.0.1:5556";
    o->transport = PD__KV_TRANSPORT__UCX;
    o->layerwise_min = 256;
    o->drain_timeout_s = 30;
    o->eo.eos = o->eo.bos = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout, role);
            return 1;
        }
        if (!strcmp(a, "--no-prefix-cache")) {
            o->eo.no_prefix_cache = true;
            continue;
        }
        if (!strcmp(a, "--local-prefill") && role == PD_WORKER_DECODE) {
            o->local_prefill = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value (or is unknown)\n", argv[0], a);
            return -1;
        }
        const char *v = argv[++i];
        long n = 0;
        int64_t sz = 0;
        int bad = 0;
        if (!strcmp(a, "--model"))
            o->model = v;
        else if (!strcmp(a, "--tokenizer"))
            o->tokenizer = v;
        else if (!strcmp(a, "--router"))
            o->router = v;
        else if (!strcmp(a, "--name"))
            o->name = v;
        else if (!strcmp(a, "--threads"))
            bad = parse_int(v, 1, 1024, &n) || !(o->threads = (int)n);
        else if (!strcmp(a, "--max-num-seqs"))
            bad = parse_int(v, 1, 4096, &n) || !(o->eo.max_num_seqs = (int32_t)n);
        else if (!strcmp(a, "--batch"))
            bad = parse_int(v, 1, 1 << 20, &n) || !(o->eo.max_batch_tokens = (int32_t)n);
        else if (!strcmp(a, "--kv-blocks"))
            bad = parse_int(v, 1, 1 << 28, &n) || !(o->eo.kv_blocks = (int32_t)n);
        else if (!strcmp(a, "--block-size"))
            bad = parse_int(v, 1, 1024, &n) || !(o->eo.block_size = (int32_t)n);
        else if (!strcmp(a, "--kv-layerwise-min"))
            bad = parse_int(v, 0, INT_MAX, &n) || ((o->layerwise_min = (int32_t)n), 0);
        else if (!strcmp(a, "--drain-timeout"))
            bad = parse_int(v, 0, 86400, &n) || ((o->drain_timeout_s = (int)n), 0);
        else if (!strcmp(a, "--kv-memory"))
            bad = parse_size(v, &sz) || sz <= 0 || ((o->eo.kv_memory = sz), 0);
        else if (!strcmp(a, "--kv-dtype")) {
            if (!strcmp(v, "auto"))
                o->eo.kv_type = PD_KV_AUTO;
            else if (!strcmp(v, "f32"))
                o->eo.kv_type = PD_KV_F32;
            else if (!strcmp(v, "f16"))
                o->eo.kv_type = PD_KV_F16;
            else
                bad = 1;
        } else if (!strcmp(a, "--kv-transport")) {
            if (!strcmp(v, "ucx"))
                o->transport = PD__KV_TRANSPORT__UCX;
            else if (!strcmp(v, "zmq"))
                o->transport = PD__KV_TRANSPORT__ZMQ;
            else
                bad = 1;
        } else if (!strcmp(a, "--log-level")) {
            int lv = pd_log_level_parse(v);
            if (lv < 0)
                bad = 1;
            else
                pd_log_set_level((pd_log_level_t)lv);
        } else {
            fprintf(stderr, "%s: unknown option %s\n", argv[0], a);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "%s: bad value for %s: %s\n", argv[0], a, v);
            return -1;
        }
    }
    if (!o->model) {
        fprintf(stderr, "%s: --model is required\n", argv[0]);
        return -1;
    }
    return 0;
}

static int setup(worker_t *w)
{
    if (pd_model_open(w->o.model, w->o.tokenizer, &w->model) != PD_OK)
        return -1;
    pd_model_digest(w->model, w->digest);
    const pd_tokenizer_t *tok = pd_model_tokenizer(w->model);
    w->o.eo.eos = pd_tokenizer_eos(tok);
    w->o.eo.bos = pd_tokenizer_bos(tok);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = w->o.threads > 0 ? w->o.threads : (int)(ncpu > 0 ? ncpu : 1);
    if (pd_kernels_cpu_new(threads, NULL, &w->kernels) != PD_OK)
        return -1;
    w->o.eo.on_layer.fn = on_layer;
    w->o.eo.on_layer.user = w;
    if (pd_engine_new(w->model, w->kernels, &w->o.eo, &w->engine) != PD_OK)
        return -1;
    w->kv = pd_engine_kv(w->engine);
    w->bs = pd_kv_pool_block_size(w->kv);
    w->n_layers = pd_kv_pool_n_layers(w->kv);
    w->vocab = pd_model_config(w->model)->vocab_size;
    w->row_bytes = pd_kv_pool_row_bytes(w->kv);
    w->layer_bytes = pd_kv_pool_layer_bytes(w->kv);
    if (w->o.transport == PD__KV_TRANSPORT__UCX) {
        size_t total = w->layer_bytes * (size_t)w->n_layers;
        if (pd_ucx_new(&w->ucx) != PD_OK ||
            pd_ucx_region_new(w->ucx, pd_kv_pool_k(w->kv, 0), total, &w->reg_k) != PD_OK ||
            pd_ucx_region_new(w->ucx, pd_kv_pool_v(w->kv, 0), total, &w->reg_v) != PD_OK)
            return -1;
    }
    w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->evfd < 0 || pipe(w->sigpipe) != 0) {
        PD_LOG_ERROR("worker: eventfd/pipe: %s", strerror(errno));
        return -1;
    }
    w->zctx = zmq_ctx_new();
    w->sock = w->zctx ? zmq_socket(w->zctx, ZMQ_DEALER) : NULL;
    if (!w->sock) {
        PD_LOG_ERROR("worker: zmq socket: %s", zmq_strerror(errno));
        return -1;
    }
    int zero = 0, linger = 2000;
    int64_t maxmsg = (int64_t)MAX_DATA_FRAME + (1 << 20);
    zmq_setsockopt(w->sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(w->sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(w->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_connect(w->sock, w->o.router) != 0) {
        PD_LOG_ERROR("worker: cannot connect to %s: %s", w->o.router, zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static void teardown(worker_t *w)
{
    if (w->engine_thread) {
        pthread_mutex_lock(&w->mu);
        w->quit = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->engine_thread, NULL);
    }
    /* the engine is gone: drop the I/O side without commands */
    while (w->dtasks) {
        dtask_t *t = w->dtasks;
        if (t->outstanding > 0)
            peer_close(w, t->peer);
        w->dtasks = t->next;
        dtask_free(t);
    }
    while (w->ptasks) {
        ptask_t *t = w->ptasks;
        w->ptasks = t->next;
        free(t->blocks);
        free(t->sent);
        free(t->ready);
        free(t->cur);
        free(t);
    }
    while (w->peers) {
        peer_t *p = w->peers;
        w->peers = p->next;
        if (p->p)
            pd_ucx_peer_destroy(&p->p);
        peer_free_desc(p);
        free(p);
    }
    pthread_mutex_lock(&w->mu);
    msg_t *q[2] = {w->cmds.head, w->events.head};
    w->cmds.head = w->cmds.tail = w->events.head = w->events.tail = NULL;
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < 2; i++)
        while (q[i]) {
            msg_t *n = q[i]->next;
            msg_free(q[i]);
            q[i] = n;
        }
    if (w->reg_k)
        pd_ucx_region_destroy(&w->reg_k);
    if (w->reg_v)
        pd_ucx_region_destroy(&w->reg_v);
    if (w->ucx)
        pd_ucx_destroy(&w->ucx);
    if (w->sock)
        zmq_close(w->sock);
    if (w->zctx)
        zmq_ctx_term(w->zctx);
    if (w->evfd > 0)
        close(w->evfd);
    if (w->sigpipe[0] > 0) {
        close(w->sigpipe[0]);
        close(w->sigpipe[1]);
    }
    pd_engine_destroy(&w->engine);
    pd_kernels_destroy(&w->kernels);
    pd_model_destroy(&w->model);
}

static int run(worker_t *w)
{
    int exit_code = -1;
    w->reg_seq = 1;
    send_register(w);
    double t_iter = now_s();
    while (exit_code < 0) {
        double t_now = now_s();
        if (t_now - t_iter > 0.25) /* the heartbeats stop while the loop is stuck */
            PD_LOG_WARN("worker %s: the I/O loop was stuck for %.0f ms", w->o.name,
                        (t_now - t_iter) * 1e3);
        t_iter = t_now;
        bool ucx_busy = false;
        if (w->ucx) {
            double t0 = now_s();
            for (int i = 0; i < 64 && pd_ucx_progress(w->ucx); i++)
                ;
            if (now_s() - t0 > 0.25)
                PD_LOG_WARN("worker %s: UCX progress took %.0f ms", w->o.name,
                            (now_s() - t0) * 1e3);
            ucx_busy = !pd_ucx_arm(w->ucx);
        }
        zmq_pollitem_t items[4] = {
            {.socket = w->sock, .events = ZMQ_POLLIN},
            {.fd = w->evfd, .events = ZMQ_POLLIN},
            {.fd = w->sigpipe[0], .events = ZMQ_POLLIN},
            {.fd = w->ucx ? pd_ucx_fd(w->ucx) : -1, .events = ZMQ_POLLIN},
        };
        int n_items = w->ucx ? 4 : 3;
        long timeout = ucx_busy ? 0 : 20;
        if (zmq_poll(items, n_items, timeout) < 0 && errno != EINTR) {
            PD_LOG_ERROR("worker: zmq_poll: %s", zmq_strerror(errno));
            exit_code = 1;
            break;
        }
        if (items[2].revents & ZMQ_POLLIN) {
            char buf[16];
            ssize_t r = read(w->sigpipe[0], buf, sizeof buf);
            (void)r;
            if (!w->draining) {
                PD_LOG_INFO("worker %s: draining (signal)", w->o.name);
                w->draining = true;
                w->drain_deadline =
                    pd_rpc_mono_ms() + (uint64_t)w->o.drain_timeout_s * 1000u;
                if (w->registered)
                    send_heartbeat(w);
            }
        }
        for (int i = 0; i < 256; i++) {
            pd_rpc_msg_t m;
            int r = pd_rpc_recv(w->sock, false, 0, MAX_DATA_FRAME, &m);
            if (r <= 0)
                break;
            handle(w, &m, &exit_code);
            pd_rpc_msg_clear(&m);
        }
        handle_events(w);
        if (w->ucx) {
            pd_ucx_progress(w->ucx);
            /* completions may have finished a task's reads; a check that changes a
             * task may remove others (a closed peer), so start over after one */
            for (int guard = 0; guard < 100000; guard++) {
                dtask_t *t = w->dtasks;
                while (t && !(t->state == D_PULLING && t->outstanding == 0 &&
                              (t->done_rcvd || t->get_failed) && dtask_check(w, t)))
                    t = t->next;
                if (!t)
                    break;
            }
        }
        check_timers(w);
        if (w->draining) {
            bool idle = !w->dtasks && !w->ptasks;
            if (idle || pd_rpc_mono_ms() >= w->drain_deadline) {
                if (!idle) {
                    PD_LOG_WARN("worker %s: drain timeout: handing back the tasks left",
                                w->o.name);
                    for (dtask_t *t = w->dtasks; t; t = t->next)
                        send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "worker drained");
                    for (ptask_t *t = w->ptasks; t; t = t->next)
                        send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "worker drained");
                    drop_all(w);
                }
                if (w->registered) {
                    Pd__Envelope env;
                    pd_rpc_envelope_init(&env, PD__METHOD__DEREGISTER, 0);
                    Pd__Deregister d = PD__DEREGISTER__INIT;
                    d.worker_id = w->worker_id;
                    env.deregister = &d;
                    send_env(w, &env, NULL, 0);
                }
                PD_LOG_INFO("worker %s: drained", w->o.name);
                exit_code = 0;
            }
        }
    }
    return exit_code;
}

int pd_worker_main(int argc, char **argv, pd_worker_role_t role)
{
    worker_t *w = calloc(1, sizeof *w);
    if (!w)
        return 1;
    pd_log_set_level(PD_LOG_LEVEL_INFO); /* a service logs its life; --log-level overrides */
    int pr = parse_args(argc, argv, role, &w->o);
    if (pr != 0) {
        if (pr < 0)
            usage(stderr, role);
        free(w);
        return pr < 0 ? 2 : 0;
    }
    char name[128];
    if (!w->o.name) {
        char host[64] = "host";
        gethostname(host, sizeof host - 1);
        snprintf(name, sizeof name, "%s:%d-%s", host, (int)getpid(),
                 role == PD_WORKER_PREFILL ? "prefill" : "decode");
        w->o.name = name;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->evfd = -1;
    int code = 1;
    if (setup(w) == 0) {
        g_worker = w;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        if (pthread_create(&w->engine_thread, NULL, engine_main, w) != 0) {
            PD_LOG_ERROR("worker: cannot start the engine thread");
        } else {
            PD_LOG_INFO("worker %s: %s, %d KV blocks of %d, transport %s, router %s",
                        w->o.name, role == PD_WORKER_PREFILL ? "prefill" : "decode",
                        pd_kv_pool_n_blocks(w->kv), w->bs,
                        w->o.transport == PD__KV_TRANSPORT__UCX ? "ucx" : "zmq", w->o.router);
            code = run(w);
        }
        g_worker = NULL;
    }
    teardown(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    free(w);
    return code;
}
