/* router.h - pd-router: the front door of the service. It binds a ROUTER socket for
 * clients and one for workers, keeps the worker registry, takes Generate requests,
 * picks a prefill and a decode worker for each attempt, relays the KV handshake
 * between them, and streams detokenized chunks back to the client; dead workers'
 * requests are re-run, deadlines and cancels stop requests on every worker.
 * The wire contract is docs/protocol.md.
 *
 * Design: one libuv loop owns both sockets (uv_poll on ZMQ_FD, drained after every
 * wake-up and every send through a uv_check handle, since ZMQ_FD is edge-triggered),
 * a periodic timer (liveness, deadlines, queue timeouts, drain) and SIGTERM/SIGINT
 * handlers (drain: refuse new Generates, finish what runs, then return).
 * Ownership: the router borrows the model (it must outlive the router) and owns
 * everything else. Threading: every function from one thread; pd_router_run blocks
 * that thread until the router has drained. */
#ifndef PD_ROUTER_H
#define PD_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/model.h"
#include "common/status.h"
#include "router/registry.h"

typedef struct pd_router_opts {
    const char *client_endpoint; /* default tcp://127.0.0.1:5555; port 0: any */
    const char *worker_endpoint; /* default tcp://127.0.0.1:5556 */
    const char *model_name;      /* reported in HEALTH (the model file's base name) */
    pd_policy_t policy;
    uint32_t local_prefill_max; /* prompts of at most this many tokens prefill on D */
    uint32_t heartbeat_ms;
    uint32_t dead_ms;
    uint32_t lease_ms;
    uint32_t max_retries;
    size_t max_frame_bytes;
    uint32_t block_size; /* 0: the first registered worker's */
    int kv_dtype;        /* pd_dtype_t; -1: the first registered worker's */
    Pd__KvTransport kv_transport;
    uint64_t drain_timeout_ms;
    uint64_t queue_timeout_ms; /* a request no worker can take waits this long */
} pd_router_opts_t;

void pd_router_opts_default(pd_router_opts_t *o);

typedef struct pd_router pd_router_t;

/* Binds both sockets and sets up the loop. On failure (a bind error, logged) nothing
 * is left open and *rt_p is untouched. */
pd_status_t pd_router_new(const pd_router_opts_t *opts, const pd_model_t *model,
                          pd_router_t **rt_p);
/* The endpoints actually bound (the port filled in when 0 was asked). */
const char *pd_router_client_endpoint(const pd_router_t *rt);
const char *pd_router_worker_endpoint(const pd_router_t *rt);
/* Serves until SIGTERM/SIGINT and the drain that follows. PD_OK on a clean drain. */
pd_status_t pd_router_run(pd_router_t *rt);
/* Closes the sockets (linger 0) and frees every request. Accepts NULL. */
void pd_router_destroy(pd_router_t **rt_p);

#endif
