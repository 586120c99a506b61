/* router.c - pd-router's loop: the two ROUTER sockets, frame checks, worker
 * registration, heartbeats and liveness, HEALTH/STATS, drain on SIGTERM; requests
 * themselves are request.c's. See router.h.
 *
 * ZMQ_FD is edge-triggered: the poll handles only wake the loop; pump() drains both
 * sockets while ZMQ_EVENTS says POLLIN, and runs from every poll callback and from a
 * uv_check handle (after every loop iteration, so after every send a timer or a
 * handler made). pump() handles at most PUMP_MAX messages per call so timers are
 * not starved; the periodic tick guarantees it runs again. A worker whose send
 * fails, or that falls silent, is declared lost at once (fenced: lookups skip it),
 * and its requests are re-run from process_lost(), after the message at hand, so no
 * handler sees its request freed under it. Threading: the loop thread only. */
#include "router/router.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/utf8.h"
#include "router/router_impl.h"

#define HARD_MAX_MSG   (64ll << 20) /* ZMQ_MAXMSGSIZE: larger frames are dropped */
#define MAX_DATA_FRAME (64u << 20)
#define PUMP_MAX       4096
#define DEAD_KEEP_MS   60000 /* a dead worker stays in STATS this long */

void pd_router_opts_default(pd_router_opts_t *o)
{
    *o = (pd_router_opts_t){
        .client_endpoint = "tcp://127.0.0.1:5555",
        .worker_endpoint = "tcp://127.0.0.1:5556",
        .model_name = "",
        .policy = PD_POLICY_PREFIX_AWARE,
        .heartbeat_ms = 100,
        .dead_ms = 3000,
        .lease_ms = 10000,
        .max_retries = 3,
        .max_frame_bytes = PD_RPC_MAX_FRAME_DEFAULT,
        .kv_dtype = -1,
        .kv_transport = PD__KV_TRANSPORT__UCX,
        .drain_timeout_ms = 30000,
        .queue_timeout_ms = 30000,
    };
}

static const char *transport_name(Pd__KvTransport t)
{
    return t == PD__KV_TRANSPORT__UCX        ? "ucx"
           : t == PD__KV_TRANSPORT__ZMQ      ? "zmq"
           : t == PD__KV_TRANSPORT__CUDA_IPC ? "cuda-ipc"
                                             : "none";
}

static const char *role_name(Pd__Role r)
{
    return r == PD__ROLE__PREFILL ? "prefill" : r == PD__ROLE__DECODE ? "decode" : "none";
}

/* ---- sends ---- */

int pd_router_send_client(pd_router_t *rt, const uint8_t *ident, size_t len,
                          const Pd__Envelope *env)
{
    if (pd_rpc_send(rt->client, ident, len, env, NULL, 0) == 0)
        return 0;
    PD_LOG_INFO("%s to a client failed: %s", pd_rpc_method_name(env->method),
                zmq_strerror(errno));
    return -1;
}

void pd_router_send_worker(pd_router_t *rt, pd_worker_t *w, const Pd__Envelope *env,
                           const void *data, size_t data_len)
{
    if (!w->alive)
        return;
    if (pd_rpc_send(rt->worker, w->ident, w->ident_len, env, data, data_len) == 0)
        return;
    char why[160];
    snprintf(why, sizeof why, "%s could not be sent: %s", pd_rpc_method_name(env->method),
             zmq_strerror(errno));
    pd_router_worker_lost(rt, w, why);
}

void pd_router_cancel_task(pd_router_t *rt, uint64_t worker_id, uint64_t task_id)
{
    pd_worker_t *w = pd_registry_by_id(rt->reg, worker_id);
    if (!w)
        return;
    Pd__TaskCancel tc = PD__TASK_CANCEL__INIT;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__TASK_CANCEL, task_id);
    env.task_cancel = &tc;
    pd_router_send_worker(rt, w, &env, NULL, 0);
}

void pd_router_worker_lost(pd_router_t *rt, pd_worker_t *w, const char *why)
{
    if (!w->alive)
        return;
    PD_LOG_WARN("worker %s (%s, id %" PRIu64 ") lost: %s", w->name, role_name(w->role),
                w->id, why);
    pd_registry_mark_dead(rt->reg, w, pd_rpc_mono_ms());
    if (rt->n_lost == rt->cap_lost) {
        size_t cap = rt->cap_lost ? 2 * rt->cap_lost : 8;
        uint64_t *l = realloc(rt->lost, cap * sizeof *l);
        if (!l)
            abort();
        rt->lost = l;
        rt->cap_lost = cap;
    }
    rt->lost[rt->n_lost++] = w->id;
}

/* Re-runs the requests of the workers lost since the last call. */
static void process_lost(pd_router_t *rt)
{
    while (rt->n_lost) {
        uint64_t id = rt->lost[--rt->n_lost];
        pd_req_worker_gone(rt, id);
    }
}

static void reply_register_id(pd_router_t *rt, const pd_rpc_msg_t *m, uint64_t request_id,
                              bool accepted, uint64_t worker_id, const char *reason)
{
    Pd__RegisterReply rr = PD__REGISTER_REPLY__INIT;
    rr.accepted = accepted;
    char clean[3 * 300 + 1]; /* the reason may quote the worker's own strings */
    size_t n = strlen(reason);
    pd_utf8_sanitize(reason, n < 300 ? n : 300, clean);
    rr.reason = clean;
    rr.worker_id = worker_id;
    rr.heartbeat_ms = rt->o.heartbeat_ms;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__REGISTER_REPLY, request_id);
    env.register_reply = &rr;
    if (pd_rpc_send(rt->worker, m->ident, m->ident_len, &env, NULL, 0) != 0)
        PD_LOG_INFO("REGISTER_REPLY to a worker failed: %s", zmq_strerror(errno));
}

/* The reply to a REGISTER or HEARTBEAT: under the message's own request id. */
static void reply_register(pd_router_t *rt, const pd_rpc_msg_t *m, bool accepted,
                           uint64_t worker_id, const char *reason)
{
    reply_register_id(rt, m, m->env ? m->env->request_id : m->err_request_id, accepted,
                      worker_id, reason);
}

/* ---- workers ---- */

/* The CUDA IPC transport's part of a registration: a worker on a GPU, on the node of
 * the workers before it (IPC handles open only there), and a prefill worker's two
 * handles. */
static bool check_register_ipc(pd_router_t *rt, const Pd__Register *rg, char *why,
                               size_t cap)
{
    const Pd__DeviceSource *d = rg->device_source;
    if (!rg->device || strncmp(rg->device, "cuda", 4)) {
        snprintf(why, cap,
                 "the cuda-ipc KV transport needs workers on a GPU (--device cuda); this "
                 "one is on %s",
                 rg->device && rg->device[0] ? rg->device : "cpu");
    } else if (!d || !d->node || !d->node[0] || strlen(d->node) >= sizeof rt->ipc_node) {
        snprintf(why, cap, "%s",
                 "cuda-ipc transport without a device source (a node id of 1..79 bytes)");
    } else if (rt->ipc_node[0] && strcmp(d->node, rt->ipc_node)) {
        snprintf(why, cap,
                 "on node %.40s, but the cluster's cuda-ipc workers are on node %.40s "
                 "(CUDA IPC works within one node: use --kv-transport ucx across nodes)",
                 d->node, rt->ipc_node);
    } else if (rg->role == PD__ROLE__PREFILL &&
               (d->ipc_k.len != 64 || d->ipc_v.len != 64 || !d->len_k ||
                d->len_k != d->len_v || !rg->layout || !rg->layout->n_layers ||
                d->len_k % rg->layout->n_layers)) {
        snprintf(why, cap, "%s",
                 "cuda-ipc prefill worker without two 64-byte IPC handles and equal K/V "
                 "pool lengths, whole layers each");
    } else {
        return true;
    }
    return false;
}

/* A worker's name goes to clients (usage, STATS) and into the logs, and names are
 * matched whole: valid UTF-8, no control characters, shorter than pd_worker_t's
 * name (never cut). Empty is allowed: the worker is then "unnamed". */
static bool name_ok(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n >= sizeof((pd_worker_t *)0)->name ||
        !pd_utf8_valid((const unsigned char *)name, n))
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f)
            return false;
    return true;
}

static bool check_register(pd_router_t *rt, const Pd__Register *rg, char *why, size_t cap)
{
    const Pd__KvLayout *l = rg->layout;
    if (rg->role != PD__ROLE__PREFILL && rg->role != PD__ROLE__DECODE) {
        snprintf(why, cap, "role %d is neither prefill nor decode", (int)rg->role);
    } else if (!name_ok(rg->name)) {
        snprintf(why, cap,
                 "the worker name must be valid UTF-8 of at most %zu bytes, without "
                 "control characters",
                 sizeof((pd_worker_t *)0)->name - 1);
    } else if (rg->model_digest.len != PD_DIGEST_BYTES ||
               memcmp(rg->model_digest.data, rt->digest, PD_DIGEST_BYTES)) {
        char hex[2 * PD_DIGEST_BYTES + 1] = "(none)";
        if (rg->model_digest.len == PD_DIGEST_BYTES)
            pd_digest_hex(rg->model_digest.data, hex);
        snprintf(why, cap, "model digest %s is not the router's model's (%s)", hex,
                 rt->digest_hex);
    } else if (!l) {
        snprintf(why, cap, "%s", "no KV layout");
    } else if ((int32_t)l->n_layers != rt->n_layers ||
               (int32_t)l->n_kv_heads != rt->n_kv_heads ||
               (int32_t)l->head_dim != rt->head_dim) {
        snprintf(
            why, cap,
            "KV layout of %u layers, %u KV heads, head dim %u; the model has %d, %d, %d",
            l->n_layers, l->n_kv_heads, l->head_dim, rt->n_layers, rt->n_kv_heads,
            rt->head_dim);
    } else if (!l->block_size || (l->dtype != 0 && l->dtype != 1)) {
        snprintf(why, cap, "KV block size %u / dtype %u unsupported (f32 0, f16 1)",
                 l->block_size, l->dtype);
    } else if (rt->block_size && l->block_size != rt->block_size) {
        snprintf(why, cap, "KV block size %u differs from the cluster's %u",
                 l->block_size, rt->block_size);
    } else if (rt->kv_dtype >= 0 && (int)l->dtype != rt->kv_dtype) {
        snprintf(why, cap, "KV dtype %s differs from the cluster's %s",
                 l->dtype ? "f16" : "f32", rt->kv_dtype ? "f16" : "f32");
    } else if (rg->kv_transport != rt->o.kv_transport) {
        snprintf(why, cap, "KV transport %s; the router's is %s",
                 transport_name(rg->kv_transport), transport_name(rt->o.kv_transport));
    } else if (rg->role == PD__ROLE__PREFILL &&
               rg->kv_transport == PD__KV_TRANSPORT__UCX &&
               (!rg->ucx || !rg->ucx->worker_address.len)) {
        snprintf(why, cap, "%s", "UCX transport without a UCX worker address");
    } else if (rg->kv_transport == PD__KV_TRANSPORT__CUDA_IPC) {
        return check_register_ipc(rt, rg, why, cap);
    } else {
        return true;
    }
    return false;
}

static void on_register(pd_router_t *rt, const pd_rpc_msg_t *m)
{
    const Pd__Register *rg = m->env->register_;
    char why[300];
    if (!check_register(rt, rg, why, sizeof why)) {
        PD_LOG_WARN("registration of worker '%s' (%s) refused: %s",
                    name_ok(rg->name) ? rg->name : "(a bad name)", role_name(rg->role),
                    why);
        reply_register(rt, m, false, 0, why);
        return;
    }
    uint64_t now = pd_rpc_mono_ms();
    pd_worker_t *old = pd_registry_by_ident(rt->reg, m->ident, m->ident_len);
    if (old)
        pd_router_worker_lost(rt, old, "registered again");
    old = pd_registry_by_name(rt->reg, rg->name && rg->name[0] ? rg->name : "unnamed");
    if (old)
        pd_router_worker_lost(rt, old, "a worker of the same name registered");
    if (!rt->block_size)
        rt->block_size = rg->layout->block_size;
    if (rt->kv_dtype < 0)
        rt->kv_dtype = (int)rg->layout->dtype;
    if (!rt->ipc_node[0] && rg->kv_transport == PD__KV_TRANSPORT__CUDA_IPC)
        snprintf(rt->ipc_node, sizeof rt->ipc_node, "%s", rg->device_source->node);
    pd_worker_t *w = pd_registry_add(rt->reg, m->ident, m->ident_len, rg, now);
    PD_LOG_INFO("worker %s registered: %s%s, id %" PRIu64 ", %u KV blocks of %u", w->name,
                role_name(w->role), w->can_prefill ? " (can prefill)" : "", w->id,
                rg->layout->n_blocks, rg->layout->block_size);
    reply_register(rt, m, true, w->id, "");
    process_lost(rt);
    pd_req_dispatch_queued(rt);
}

static void on_worker(pd_router_t *rt, pd_rpc_msg_t *m)
{
    Pd__Method meth = m->env->method;
    if (meth == PD__METHOD__REGISTER) {
        on_register(rt, m);
        return;
    }
    pd_worker_t *w = pd_registry_by_ident(rt->reg, m->ident, m->ident_len);
    switch (meth) {
    case PD__METHOD__HEARTBEAT:
        if (!w || m->env->heartbeat->worker_id != w->id) {
            PD_LOG_INFO("heartbeat from unknown worker %" PRIu64 ": register again",
                        m->env->heartbeat->worker_id);
            reply_register(rt, m, false, 0, "unknown worker: register again");
            return;
        }
        if (m->env->heartbeat->load && m->env->heartbeat->load->draining &&
            !w->load.draining)
            PD_LOG_INFO("worker %s is draining", w->name);
        pd_registry_heartbeat(w, m->env->heartbeat->load, pd_rpc_mono_ms());
        pd_req_dispatch_queued(rt);
        return;
    case PD__METHOD__DEREGISTER:
        if (w) {
            PD_LOG_INFO("worker %s deregistered", w->name);
            pd_router_worker_lost(rt, w, "deregistered");
        }
        return;
    case PD__METHOD__KV_TARGET:
    case PD__METHOD__KV_READY:
    case PD__METHOD__KV_DONE:
    case PD__METHOD__KV_RELEASE:
    case PD__METHOD__KV_DATA:
    case PD__METHOD__TOKEN_CHUNK:
    case PD__METHOD__TASK_FAILED:
        if (!w) { /* fenced off: nothing is relayed */
            PD_LOG_INFO("%s from an unregistered worker dropped: register again",
                        pd_rpc_method_name(meth));
            /* request id 0: this refusal answers no registration. Echoing the task
             * id would read, at a worker whose registration number happens to equal
             * it, as the refusal of its new registration (and it would exit). */
            reply_register_id(rt, m, 0, false, 0, "unknown worker: register again");
            return;
        }
        w->last_seen_ms = pd_rpc_mono_ms();
        pd_req_worker_msg(rt, w, m);
        return;
    case PD__METHOD__ERROR:
        rt->bad_frames++;
        PD_LOG_WARN("ERROR from worker %s: %s %s", w ? w->name : "(unregistered)",
                    pd_rpc_error_name(m->env->error->code),
                    m->env->error->message ? m->env->error->message : "");
        return;
    default:
        rt->bad_frames++;
        PD_LOG_INFO("%s is not a worker method", pd_rpc_method_name(meth));
        pd_rpc_send_error(rt->worker, m->ident, m->ident_len, m->env->request_id,
                          PD__ERROR_CODE__UNKNOWN_METHOD, "%s is not a worker method",
                          pd_rpc_method_name(meth));
        return;
    }
}

/* ---- clients ---- */

static void on_health(pd_router_t *rt, const pd_rpc_msg_t *m)
{
    uint32_t p, d, lp;
    pd_registry_counts(rt->reg, &p, &d, &lp);
    Pd__HealthReply h = PD__HEALTH_REPLY__INIT;
    h.ok = (p > 0 || lp > 0) && d > 0;
    h.prefill_workers = p;
    h.decode_workers = d;
    h.model = rt->model_name;
    h.draining = rt->draining;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH_REPLY, m->env->request_id);
    env.health_reply = &h;
    pd_router_send_client(rt, m->ident, m->ident_len, &env);
}

static void on_stats(pd_router_t *rt, const pd_rpc_msg_t *m)
{
    size_t n = pd_registry_count(rt->reg);
    Pd__WorkerInfo *wi = calloc(n ? n : 1, sizeof *wi);
    Pd__WorkerInfo **wp = calloc(n ? n : 1, sizeof *wp);
    Pd__WorkerLoad *wl = calloc(n ? n : 1, sizeof *wl);
    if (!wi || !wp || !wl)
        abort();
    uint64_t now = pd_rpc_mono_ms();
    for (size_t i = 0; i < n; i++) {
        const pd_worker_t *w = pd_registry_at(rt->reg, i);
        pd__worker_info__init(&wi[i]);
        pd__worker_load__init(&wl[i]);
        wl[i].free_blocks = w->load.free_blocks;
        wl[i].total_blocks = w->load.total_blocks;
        wl[i].running = w->load.running;
        wl[i].waiting = w->load.waiting;
        wl[i].queued_prefill_tokens = w->load.queued_prefill_tokens;
        wl[i].reserved_blocks = w->load.reserved_blocks;
        wl[i].held_blocks = w->load.held_blocks;
        wl[i].tasks_done = w->load.tasks_done;
        wl[i].tokens_out = w->load.tokens_out;
        wl[i].kv_bytes = w->load.kv_bytes;
        wl[i].spec_proposed = w->load.spec_proposed;
        wl[i].spec_accepted = w->load.spec_accepted;
        wl[i].steps = w->load.steps;
        wl[i].forward_s = w->load.forward_s;
        wl[i].sample_s = w->load.sample_s;
        wl[i].sample_threads = w->load.sample_threads;
        wl[i].draining = w->load.draining;
        wi[i].worker_id = w->id;
        wi[i].name = (char *)w->name;
        wi[i].role = w->role;
        wi[i].load = &wl[i];
        wi[i].alive = w->alive;
        wi[i].last_heartbeat_ms_ago = (double)(now - w->last_seen_ms);
        wp[i] = &wi[i];
    }
    Pd__StatsReply s = PD__STATS_REPLY__INIT;
    s.n_workers = n;
    s.workers = wp;
    s.requests_total = rt->requests_total;
    s.requests_in_flight = rt->n_reqs;
    s.requests_failed = rt->requests_failed;
    s.retries = rt->retries;
    s.tokens_out = rt->tokens_out;
    s.bad_frames = rt->bad_frames;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__STATS_REPLY, m->env->request_id);
    env.stats_reply = &s;
    pd_router_send_client(rt, m->ident, m->ident_len, &env);
    free(wi);
    free(wp);
    free(wl);
}

static void on_client(pd_router_t *rt, pd_rpc_msg_t *m)
{
    Pd__Method meth = m->env->method;
    switch (meth) {
    case PD__METHOD__GENERATE:
        pd_req_generate(rt, m);
        return;
    case PD__METHOD__CANCEL:
        pd_req_cancel(rt, m);
        return;
    case PD__METHOD__HEALTH:
        on_health(rt, m);
        return;
    case PD__METHOD__STATS:
        on_stats(rt, m);
        return;
    case PD__METHOD__ERROR: /* never answer an error with an error */
        rt->bad_frames++;
        PD_LOG_INFO("ERROR from a client: %s", pd_rpc_error_name(m->env->error->code));
        return;
    default:
        rt->bad_frames++;
        PD_LOG_INFO("%s is not a client method", pd_rpc_method_name(meth));
        pd_rpc_send_error(rt->client, m->ident, m->ident_len, m->env->request_id,
                          PD__ERROR_CODE__UNKNOWN_METHOD, "%s is not a client method",
                          pd_rpc_method_name(meth));
        return;
    }
}

/* A frame that failed pd_rpc_recv's checks. A worker speaking another protocol
 * version is refused as a registration would be. */
static void on_bad_frame(pd_router_t *rt, bool worker, const pd_rpc_msg_t *m)
{
    rt->bad_frames++;
    PD_LOG_INFO("bad frame from a %s: %s: %s", worker ? "worker" : "client",
                pd_rpc_error_name(m->err), m->err_msg);
    if (worker && m->err == PD__ERROR_CODE__UNSUPPORTED_VERSION) {
        PD_LOG_WARN("a worker speaks another protocol version: refused (%s)", m->err_msg);
        reply_register(rt, m, false, 0, m->err_msg);
        return;
    }
    pd_rpc_send_error(worker ? rt->worker : rt->client, m->ident, m->ident_len,
                      m->err_request_id, m->err, "%s", m->err_msg);
}

/* ---- the loop ---- */

static int sock_events(void *s)
{
    int ev = 0;
    size_t len = sizeof ev;
    return zmq_getsockopt(s, ZMQ_EVENTS, &ev, &len) == 0 ? ev : 0;
}

static size_t recv_batch(pd_router_t *rt, bool worker, size_t max)
{
    void *sock = worker ? rt->worker : rt->client;
    size_t n = 0;
    for (; n < max; n++) {
        pd_rpc_msg_t m;
        int rc = pd_rpc_recv(sock, true, rt->o.max_frame_bytes,
                             worker ? MAX_DATA_FRAME : 0, &m);
        if (rc < 0 && errno != EINTR)
            PD_LOG_ERROR("zmq receive failed: %s", zmq_strerror(errno));
        if (rc <= 0)
            break;
        if (!m.env)
            on_bad_frame(rt, worker, &m);
        else if (worker)
            on_worker(rt, &m);
        else
            on_client(rt, &m);
        pd_rpc_msg_clear(&m);
        process_lost(rt);
    }
    return n;
}

static void pump(pd_router_t *rt)
{
    size_t done = 0;
    process_lost(rt); /* sends from timers and signals may have lost a worker */
    while (done < PUMP_MAX) {
        bool c = sock_events(rt->client) & ZMQ_POLLIN;
        bool w = sock_events(rt->worker) & ZMQ_POLLIN;
        if (!c && !w)
            return;
        if (w)
            done += recv_batch(rt, true, 64);
        if (c)
            done += recv_batch(rt, false, 64);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    pump(h->data);
}

static void on_check(uv_check_t *h)
{
    pump(h->data);
}

static void drain_check(pd_router_t *rt)
{
    if (!rt->draining || rt->stopped)
        return;
    if (rt->n_reqs && pd_rpc_mono_ms() < rt->drain_deadline_ms)
        return;
    if (rt->n_reqs)
        pd_req_abort_all(rt, PD__ERROR_CODE__UNAVAILABLE,
                         "the router shut down before the request finished");
    PD_LOG_INFO("%s", "drained; stopping");
    rt->stopped = true;
    uv_stop(&rt->loop);
}

static void on_tick(uv_timer_t *h)
{
    pd_router_t *rt = h->data;
    uint64_t now = pd_rpc_mono_ms();
    for (size_t i = 0; i < pd_registry_count(rt->reg); i++) {
        pd_worker_t *w = pd_registry_at(rt->reg, i);
        if (w->alive && now - w->last_seen_ms > rt->o.dead_ms) {
            char why[96];
            snprintf(why, sizeof why, "silent for %" PRIu64 " ms", now - w->last_seen_ms);
            pd_router_worker_lost(rt, w, why);
        }
    }
    process_lost(rt);
    pd_req_tick(rt);
    pd_registry_prune(rt->reg, now, DEAD_KEEP_MS);
    drain_check(rt);
}

static void on_signal(uv_signal_t *h, int signum)
{
    pd_router_t *rt = h->data;
    if (!rt->draining) {
        PD_LOG_INFO("signal %d: draining (%zu requests in flight, at most %" PRIu64
                    " ms)",
                    signum, rt->n_reqs, rt->o.drain_timeout_ms);
        rt->draining = true;
        rt->drain_deadline_ms = pd_rpc_mono_ms() + rt->o.drain_timeout_ms;
    } else {
        PD_LOG_INFO("signal %d again: stopping now", signum);
        rt->drain_deadline_ms = 0;
    }
    drain_check(rt);
}

/* ---- setup ---- */

static pd_status_t open_socket(pd_router_t *rt, const char *ep, void **sock_p, char *out,
                               size_t cap)
{
    void *s = zmq_socket(rt->zctx, ZMQ_ROUTER);
    if (!s) {
        PD_LOG_ERROR("zmq_socket failed: %s", zmq_strerror(errno));
        return PD_ERR_IO;
    }
    int one = 1, zero = 0, hwm = 100000;
    int64_t maxmsg = HARD_MAX_MSG;
    zmq_setsockopt(s, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm);
    if (zmq_bind(s, ep) != 0) {
        PD_LOG_ERROR("cannot bind %s: %s", ep, zmq_strerror(errno));
        zmq_close(s);
        return PD_ERR_IO;
    }
    size_t len = cap;
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, out, &len) != 0)
        snprintf(out, cap, "%s", ep);
    *sock_p = s;
    return PD_OK;
}

static int sock_fd(void *s)
{
    int fd = -1;
    size_t len = sizeof fd;
    zmq_getsockopt(s, ZMQ_FD, &fd, &len);
    return fd;
}

static pd_status_t start_loop(pd_router_t *rt)
{
    if (uv_loop_init(&rt->loop) != 0) {
        PD_LOG_ERROR("%s", "uv_loop_init failed");
        return PD_ERR_INTERNAL;
    }
    uv_poll_init(&rt->loop, &rt->client_poll, sock_fd(rt->client));
    uv_poll_init(&rt->loop, &rt->worker_poll, sock_fd(rt->worker));
    uv_check_init(&rt->loop, &rt->check);
    uv_timer_init(&rt->loop, &rt->tick);
    uv_signal_init(&rt->loop, &rt->sigterm);
    uv_signal_init(&rt->loop, &rt->sigint);
    rt->client_poll.data = rt->worker_poll.data = rt->check.data = rt->tick.data = rt;
    rt->sigterm.data = rt->sigint.data = rt;
    rt->handles_open = true;
    uint64_t period = rt->o.heartbeat_ms / 2;
    period = period < 5 ? 5 : period > 50 ? 50 : period;
    uv_poll_start(&rt->client_poll, UV_READABLE, on_poll);
    uv_poll_start(&rt->worker_poll, UV_READABLE, on_poll);
    uv_check_start(&rt->check, on_check);
    uv_timer_start(&rt->tick, on_tick, period, period);
    uv_signal_start(&rt->sigterm, on_signal, SIGTERM);
    uv_signal_start(&rt->sigint, on_signal, SIGINT);
    return PD_OK;
}

pd_status_t pd_router_new(const pd_router_opts_t *opts, const pd_model_t *model,
                          pd_router_t **rt_p)
{
    pd_router_t *rt = calloc(1, sizeof *rt);
    if (!rt)
        return PD_ERR_NOMEM;
    rt->o = *opts;
    rt->model = model;
    rt->tok = pd_model_tokenizer(model);
    const pd_model_config_t *cfg = pd_model_config(model);
    rt->n_vocab = cfg->vocab_size;
    rt->ctx_len = cfg->ctx_len;
    rt->n_layers = cfg->n_layers;
    rt->n_kv_heads = cfg->n_kv_heads;
    rt->head_dim = cfg->head_dim;
    rt->block_size = opts->block_size;
    rt->kv_dtype = opts->kv_dtype;
    snprintf(rt->model_name, sizeof rt->model_name, "%s", opts->model_name);
    pd_model_digest(model, rt->digest);
    pd_digest_hex(rt->digest, rt->digest_hex);
    rt->seed_state = pd_rpc_realtime_ms() ^ ((uint64_t)getpid() << 32);
    PD_LOG_INFO("model %s: digest %s, %d layers, %d KV heads, head dim %d, context %d",
                rt->model_name, rt->digest_hex, rt->n_layers, rt->n_kv_heads,
                rt->head_dim, rt->ctx_len);
    pd_status_t st = pd_registry_new(0, &rt->reg);
    if (st != PD_OK)
        goto err_free;
    rt->zctx = zmq_ctx_new();
    if (!rt->zctx) {
        PD_LOG_ERROR("zmq_ctx_new failed: %s", zmq_strerror(errno));
        st = PD_ERR_IO;
        goto err_registry;
    }
    st = open_socket(rt, opts->client_endpoint, &rt->client, rt->client_ep,
                     sizeof rt->client_ep);
    if (st != PD_OK)
        goto err_ctx;
    st = open_socket(rt, opts->worker_endpoint, &rt->worker, rt->worker_ep,
                     sizeof rt->worker_ep);
    if (st != PD_OK)
        goto err_client;
    st = start_loop(rt);
    if (st != PD_OK)
        goto err_worker;
    *rt_p = rt;
    return PD_OK;

err_worker:
    zmq_close(rt->worker);
err_client:
    zmq_close(rt->client);
err_ctx:
    zmq_ctx_term(rt->zctx);
err_registry:
    pd_registry_destroy(&rt->reg);
err_free:
    free(rt);
    return st;
}

const char *pd_router_client_endpoint(const pd_router_t *rt)
{
    return rt->client_ep;
}

const char *pd_router_worker_endpoint(const pd_router_t *rt)
{
    return rt->worker_ep;
}

pd_status_t pd_router_run(pd_router_t *rt)
{
    PD_LOG_INFO("serving clients on %s, workers on %s (policy %s, KV over %s)",
                rt->client_ep, rt->worker_ep, pd_policy_name(rt->o.policy),
                transport_name(rt->o.kv_transport));
    pump(rt); /* anything that arrived before the poll handles were armed */
    uv_run(&rt->loop, UV_RUN_DEFAULT);
    return rt->stopped ? PD_OK : PD_ERR_INTERNAL;
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void pd_router_destroy(pd_router_t **rt_p)
{
    if (!rt_p || !*rt_p)
        return;
    pd_router_t *rt = *rt_p;
    if (rt->handles_open) {
        close_handle((uv_handle_t *)&rt->client_poll);
        close_handle((uv_handle_t *)&rt->worker_poll);
        close_handle((uv_handle_t *)&rt->check);
        close_handle((uv_handle_t *)&rt->tick);
        close_handle((uv_handle_t *)&rt->sigterm);
        close_handle((uv_handle_t *)&rt->sigint);
        uv_run(&rt->loop, UV_RUN_DEFAULT);
        if (uv_loop_close(&rt->loop) != 0)
            PD_LOG_WARN("%s", "libuv loop closed with handles still open");
    }
    pd_req_free_all(rt);
    zmq_close(rt->client);
    zmq_close(rt->worker);
    zmq_ctx_term(rt->zctx);
    pd_registry_destroy(&rt->reg);
    free(rt->lost);
    free(rt);
    *rt_p = NULL;
}
