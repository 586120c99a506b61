/* router_impl.h - what router.c (sockets, loop, registration, HEALTH/STATS) and
 * request.c (the request state machine) share inside pd-router. Not a public header.
 * Threading: the loop thread only. */
#ifndef PD_ROUTER_IMPL_H
#define PD_ROUTER_IMPL_H

#include <uv.h>

#include "common/digest.h"
#include "common/rpc.h"
#include "common/tokenizer.h"
#include "router/registry.h"
#include "router/router.h"

typedef struct pd_req pd_req_t;

struct pd_router {
    pd_router_opts_t o;
    const pd_model_t *model;
    const pd_tokenizer_t *tok;
    int32_t n_vocab, ctx_len, n_layers, n_kv_heads, head_dim;
    uint8_t digest[PD_DIGEST_BYTES];
    char digest_hex[2 * PD_DIGEST_BYTES + 1];
    char model_name[256];

    void *zctx, *client, *worker;
    char client_ep[256], worker_ep[256];

    uv_loop_t loop;
    uv_poll_t client_poll, worker_poll;
    uv_check_t check;
    uv_timer_t tick;
    uv_signal_t sigterm, sigint;
    bool handles_open;

    pd_registry_t *reg;
    uint32_t block_size; /* 0 until fixed by a flag or the first worker */
    int kv_dtype;        /* -1 until fixed */
    char ipc_node[80];   /* CUDA IPC transport: the node of the first worker ("" until) */
    uint64_t *lost;      /* workers declared lost whose requests await re-running */
    size_t n_lost, cap_lost;

    pd_req_t *head, *tail; /* requests in flight, oldest first */
    size_t n_reqs;
    uint64_t next_task_id;
    uint64_t seed_state;

    uint64_t requests_total, requests_failed, retries, tokens_out, bad_frames;
    bool draining;
    uint64_t drain_deadline_ms;
    bool stopped;
};

/* router.c: sends. A client send that fails (peer gone, or its queue full) returns
 * -1; the caller drops the request. A worker send that fails declares the worker
 * lost (its requests are re-run after the current message is handled). */
int pd_router_send_client(pd_router_t *rt, const uint8_t *ident, size_t len,
                          const Pd__Envelope *env);
void pd_router_send_worker(pd_router_t *rt, pd_worker_t *w, const Pd__Envelope *env,
                           const void *data, size_t data_len);
/* Sends TASK_CANCEL(task) to worker id when it is alive. */
void pd_router_cancel_task(pd_router_t *rt, uint64_t worker_id, uint64_t task_id);
void pd_router_worker_lost(pd_router_t *rt, pd_worker_t *w, const char *why);

/* request.c */
void pd_req_generate(pd_router_t *rt, const pd_rpc_msg_t *m);
void pd_req_cancel(pd_router_t *rt, const pd_rpc_msg_t *m);
/* A task message (KV_*, TOKEN_CHUNK, TASK_FAILED) from the registered worker w. */
void pd_req_worker_msg(pd_router_t *rt, pd_worker_t *w, pd_rpc_msg_t *m);
/* Abandons (and re-runs) every attempt that uses worker id. */
void pd_req_worker_gone(pd_router_t *rt, uint64_t worker_id);
/* Deadlines and queue timeouts. */
void pd_req_tick(pd_router_t *rt);
/* Tries to dispatch every queued request (a worker registered or reported load). */
void pd_req_dispatch_queued(pd_router_t *rt);
/* Ends every request with ERROR(code) and cancels its tasks (shutdown). */
void pd_req_abort_all(pd_router_t *rt, Pd__ErrorCode code, const char *why);
/* Frees every request without sending anything (teardown). */
void pd_req_free_all(pd_router_t *rt);

#endif
