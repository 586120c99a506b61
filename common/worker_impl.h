/* worker_impl.h - the worker's private parts, shared by its four files (not a public
 * header: common/worker.h is). worker.c: options, setup, the I/O thread's poll loop and
 * the router connection; worker_engine.c: the engine thread and the queues between
 * the threads; worker_prefill.c: the prefill side (held blocks, KV_READY/KV_DONE,
 * KV_DATA); worker_decode.c: the decode side (reservations, UCX reads, admission,
 * token chunks). Every wk_ function runs on the I/O thread unless it says otherwise.
 * Threading and ownership: see worker.h. */
#ifndef PD_WORKER_IMPL_H
#define PD_WORKER_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "common/digest.h"
#include "common/engine.h"
#include "common/kvxfer.h"
#include "common/model.h"
#include "common/rpc.h"
#include "common/worker.h"
#include "kernels/devxfer.h"

#define MAX_DATA_FRAME  (64u << 20)
#define KV_DATA_POS     256 /* positions per KV_DATA frame */
#define REGISTER_RETRY  1000
#define MAX_PROMPT_WIRE (1 << 20)

/* ---- options ------------------------------------------------------------- */

typedef struct wopts {
    pd_worker_role_t role;
    const char *model, *tokenizer, *router, *name;
    int threads;
    pd_engine_opts_t eo;
    Pd__KvTransport transport;
    int32_t layerwise_min;
    int peer_idle_ms; /* --kv-peer-idle-ms: close an unused peer after this (0: never) */
    int drain_timeout_s;
    bool local_prefill;
    int spec_on;    /* --spec: 1 ngram, 2 draft, -1 off, 0 not given */
    const char *draft_model;
    int32_t spec_k; /* --spec-k */
    const char *device; /* --device cpu|cuda|cuda:N */
    bool bf16_weights;  /* --weight-dtype bf16 */
} wopts_t;

/* ---- the queues between the threads -------------------------------------- */

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
    int32_t a, b; /* layer, pos_end / token, index / first token / n blocks to reserve */
    int32_t *ids; /* prompt (commands) */
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
    int32_t spec_k;                       /* commands: the request's */
    int64_t spec_proposed, spec_accepted; /* EV_FINISH */
    const char *reason; /* static string */
    pd_status_t st;
};

typedef struct queue {
    msg_t *head, *tail;
} queue_t;

/* ---- the worker ---------------------------------------------------------- */

typedef struct etask etask_t; /* engine thread's view of a task */
typedef struct dtask dtask_t; /* decode side (I/O thread) */
typedef struct ptask ptask_t; /* prefill side (I/O thread) */
typedef struct peer peer_t;   /* a prefill worker this decode worker reads from */

typedef struct load {
    int32_t free_blocks, total_blocks, running, waiting;
    int64_t queued_prefill, tasks_done, tokens_out;
    int64_t spec_proposed, spec_accepted;
    int64_t steps;
    double forward_s, sample_s;
    int32_t sample_threads;
} load_t;

typedef struct worker {
    wopts_t o;
    pd_model_t *model, *draft;
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

    /* CUDA IPC transport: copy streams (I/O thread, engine thread), this pool's
     * handles, the node's boot id and the GPU's name */
    pd_devxfer_t *xfer, *xfer_eng;
    uint8_t ipc_k[PD_IPC_HANDLE_BYTES], ipc_v[PD_IPC_HANDLE_BYTES];
    char node[64], gpu[32];
    int sigpipe[2];
} worker_t;

struct ptask {
    ptask_t *next;
    uint64_t task;
    int32_t n_prompt;
    bool layerwise, prefilled;
    int32_t *blocks; /* held after the prefill */
    int32_t n_blocks;
    int32_t *sent;  /* ZeroMQ transport: positions sent per layer */
    int32_t *ready; /* ... and computed per layer */
    int32_t *cur;   /* ... in these blocks (the latest table seen) */
    int32_t n_cur;
    bool target_rcvd, done_pending; /* KV_TARGET seen; KV_DONE waits for it */
    int32_t first_token, cached;
    uint64_t checksum, rng[4];
    uint32_t lease_ms;
    uint64_t hold_until; /* mono ms */
};

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
    /* CUDA IPC transport: the pool's handles, mapped at the first read (dev[]) */
    bool ipc;
    uint8_t handle[2][PD_IPC_HANDLE_BYTES];
    uint8_t *dev[2];
    uint64_t used_ms; /* the last time a task held it (pd_rpc_mono_ms) */
};

enum { D_RESERVING = 1, D_PULLING, D_RUNNING };

struct dtask {
    dtask_t *next;
    uint64_t task;
    int state;
    bool local;
    int32_t *prompt;
    int32_t n_prompt;
    pd_sampler_params_t sp;
    int64_t spec_proposed, spec_accepted; /* at the finish */
    int32_t spec_k;
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

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* worker_engine.c: the engine thread and the command queue */
void wk_msg_free(msg_t *m);
int32_t *wk_dup_ids(const int32_t *src, int32_t n);
msg_t *wk_new_msg(int type, uint64_t task);
void wk_on_layer(void *user, int32_t layer, const pd_engine_progress_t *seqs, int32_t n);
void *wk_engine_main(void *arg);
/* Publishes the engine's load (free and total blocks, queue lengths) for the
 * heartbeats. The engine thread calls it after every step; pd_worker_main calls it once
 * before that thread starts, so that no heartbeat reports an empty load. */
void wk_publish_load(worker_t *w);
void wk_send_cmd(worker_t *w, msg_t *m);
void wk_cmd_release(worker_t *w, int32_t *blocks, int32_t n);
void wk_cmd_cancel(worker_t *w, uint64_t task);

/* worker.c: messages to the router */
void wk_send_env(worker_t *w, Pd__Envelope *env, const void *data, size_t len);
void wk_send_failed(worker_t *w, uint64_t task, Pd__ErrorCode code, const char *what);
Pd__ErrorCode wk_status_code(pd_status_t st);

/* worker_prefill.c: the prefill side */
ptask_t *wk_ptask_find(worker_t *w, uint64_t task);
void wk_ptask_drop(worker_t *w, ptask_t *t, bool cancel_engine);
void wk_on_ev_layer(worker_t *w, msg_t *m);
void wk_on_ev_prefilled(worker_t *w, msg_t *m);
void wk_on_kv_target(worker_t *w, uint64_t task);
void wk_on_prefill_task(worker_t *w, const Pd__Envelope *env);

/* worker_decode.c: the decode side */
void wk_peer_free_desc(worker_t *w, peer_t *pe);
dtask_t *wk_dtask_find(worker_t *w, uint64_t task);
void wk_dtask_free(dtask_t *t);
void wk_peer_close(worker_t *w, peer_t *pe);
void wk_peers_prune(worker_t *w, uint64_t now_ms);
void wk_dtask_abandon(worker_t *w, dtask_t *t);
void wk_chunk_flush(worker_t *w, dtask_t *t);
bool wk_dtask_check(worker_t *w, dtask_t *t);
void wk_on_decode_task(worker_t *w, const Pd__Envelope *env);
void wk_on_ev_reserved(worker_t *w, msg_t *m);
void wk_on_kv_ready(worker_t *w, const Pd__Envelope *env);
void wk_on_kv_done(worker_t *w, const Pd__Envelope *env);
void wk_on_kv_data(worker_t *w, const pd_rpc_msg_t *msg);
void wk_on_ev_token(worker_t *w, msg_t *m);
void wk_on_ev_finish(worker_t *w, msg_t *m);
void wk_on_ev_failed(worker_t *w, msg_t *m);

#endif
