/* pdclient.c - the client of pdserve over one DEALER socket; see pdclient.h.
 *
 * Design: requests in flight live in an open-addressing hash table keyed by request id
 * (ids come from a per-client counter, so they are unique among this client's
 * requests). Every received envelope goes through handle_env, which checks a
 * Generate's chunk order, turns it into an event and retires a request at its last
 * chunk or error. Blocking calls read the socket themselves and park the envelopes
 * that are not theirs in a FIFO backlog that pdc_poll delivers first. Local deadlines
 * are monotonic; the earliest one is cached so that expiry scans stay rare.
 * Threading: one thread at a time per client (the ZeroMQ socket's rule). */
#include "client/pdclient.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "common/log.h"
#include "common/rpc.h"

#define DEFAULT_TIMEOUT_MS 600000u
#define DEFAULT_GRACE_MS   250u
#define DEFAULT_CALL_MS    5000u
#define CANCEL_WAIT_MS     5000u /* for the end of a stream after a cancel */
#define MAX_DRAIN          4096  /* messages handled by one pdc_poll */

typedef struct req {
    uint64_t id; /* 0: empty slot */
    void *user;
    uint64_t expire_ms; /* monotonic: deadline + grace */
    uint32_t next_index;
    bool cancel_sent;
} req_t;

struct pdc_client {
    void *ctx, *sock;
    pdc_options_t opt;
    uint64_t next_id;
    req_t *tab; /* [cap], cap a power of two */
    size_t cap, n;
    uint64_t next_expiry_ms; /* <= every request's expire_ms */
    Pd__Envelope **backlog;  /* FIFO [head, tail) of envelopes for pdc_poll */
    size_t bl_head, bl_tail, bl_cap;
};

/* ---- errors ---- */

const char *pdc_code_name(pdc_code_t code)
{
    switch (code) {
    case PDC_OK:
        return "OK";
    case PDC_ERR_TIMEOUT:
        return "TIMEOUT";
    case PDC_ERR_TRANSPORT:
        return "TRANSPORT";
    case PDC_ERR_PROTOCOL:
        return "PROTOCOL";
    case PDC_ERR_ARGUMENT:
        return "ARGUMENT";
    default:
        return pd_rpc_error_name((Pd__ErrorCode)code);
    }
}

static void set_err(pdc_error_t *e, pdc_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(pdc_error_t *e, pdc_code_t code, const char *fmt, ...)
{
    if (!e)
        return;
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static pd_status_t code_status(pdc_code_t code)
{
    switch (code) {
    case PDC_OK:
        return PD_OK;
    case PDC_ERR_ARGUMENT:
    case PDC_INVALID_ARGUMENT:
        return PD_ERR_INVALID;
    case PDC_NOT_FOUND:
        return PD_ERR_NOT_FOUND;
    case PDC_ERR_TRANSPORT:
        return PD_ERR_IO;
    case PDC_ERR_PROTOCOL:
    case PDC_BAD_REQUEST:
        return PD_ERR_FORMAT;
    case PDC_UNSUPPORTED_VERSION:
    case PDC_UNKNOWN_METHOD:
        return PD_ERR_UNSUPPORTED;
    case PDC_TOO_LARGE:
        return PD_ERR_RANGE;
    default:
        return PD_ERR_INTERNAL;
    }
}

/* ---- the request table ---- */

static size_t home_of(uint64_t id, size_t cap)
{
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdull;
    id ^= id >> 33;
    return (size_t)id & (cap - 1);
}

static req_t *req_find(pdc_client_t *c, uint64_t id)
{
    if (!id)
        return NULL;
    for (size_t i = home_of(id, c->cap);; i = (i + 1) & (c->cap - 1)) {
        if (c->tab[i].id == id)
            return &c->tab[i];
        if (!c->tab[i].id)
            return NULL;
    }
}

static void req_put(req_t *tab, size_t cap, const req_t *r)
{
    size_t i = home_of(r->id, cap);
    while (tab[i].id)
        i = (i + 1) & (cap - 1);
    tab[i] = *r;
}

static pd_status_t req_insert(pdc_client_t *c, const req_t *r)
{
    if ((c->n + 1) * 2 > c->cap) {
        size_t cap = c->cap * 2;
        req_t *tab = calloc(cap, sizeof *tab);
        if (!tab) {
            PD_LOG_ERROR("pdclient: no memory for %zu request slots", cap);
            return PD_ERR_NOMEM;
        }
        for (size_t i = 0; i < c->cap; i++)
            if (c->tab[i].id)
                req_put(tab, cap, &c->tab[i]);
        free(c->tab);
        c->tab = tab;
        c->cap = cap;
    }
    req_put(c->tab, c->cap, r);
    c->n++;
    return PD_OK;
}

/* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
static void req_remove(pdc_client_t *c, req_t *r)
{
    size_t mask = c->cap - 1, i = (size_t)(r - c->tab), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!c->tab[j].id)
            break;
        size_t k = home_of(c->tab[j].id, c->cap);
        bool move = (j > i) ? (k <= i || k > j) : (k <= i && k > j);
        if (move) {
            c->tab[i] = c->tab[j];
            i = j;
        }
    }
    c->tab[i].id = 0;
    c->n--;
}

size_t pdc_in_flight(const pdc_client_t *client)
{
    return client ? client->n : 0;
}

/* ---- the backlog ---- */

static pd_status_t backlog_push(pdc_client_t *c, Pd__Envelope *env)
{
    if (c->bl_tail == c->bl_cap) {
        if (c->bl_head > 0) { /* slide down before growing */
            memmove(c->backlog, c->backlog + c->bl_head,
                    (c->bl_tail - c->bl_head) * sizeof *c->backlog);
            c->bl_tail -= c->bl_head;
            c->bl_head = 0;
        }
        if (c->bl_tail == c->bl_cap) {
            size_t cap = c->bl_cap ? c->bl_cap * 2 : 64;
            Pd__Envelope **b = realloc(c->backlog, cap * sizeof *b);
            if (!b) {
                PD_LOG_ERROR("pdclient: no memory for the reply backlog");
                pd__envelope__free_unpacked(env, NULL);
                return PD_ERR_NOMEM;
            }
            c->backlog = b;
            c->bl_cap = cap;
        }
    }
    c->backlog[c->bl_tail++] = env;
    return PD_OK;
}

static Pd__Envelope *backlog_pop(pdc_client_t *c)
{
    if (c->bl_head == c->bl_tail)
        return NULL;
    Pd__Envelope *env = c->backlog[c->bl_head++];
    if (c->bl_head == c->bl_tail)
        c->bl_head = c->bl_tail = 0;
    return env;
}

/* ---- the socket ---- */

pd_status_t pdc_client_new(const char *endpoint, const pdc_options_t *opts,
                           pdc_client_t **client_p)
{
    if (!endpoint || !*endpoint || !client_p) {
        PD_LOG_ERROR("pdclient: no endpoint to connect to");
        return PD_ERR_INVALID;
    }
    pdc_client_t *c = calloc(1, sizeof *c);
    if (!c) {
        PD_LOG_ERROR("pdclient: no memory for a client");
        return PD_ERR_NOMEM;
    }
    if (opts)
        c->opt = *opts;
    if (!c->opt.default_timeout_ms)
        c->opt.default_timeout_ms = DEFAULT_TIMEOUT_MS;
    if (!c->opt.grace_ms)
        c->opt.grace_ms = DEFAULT_GRACE_MS;
    if (!c->opt.max_frame)
        c->opt.max_frame = PD_RPC_MAX_FRAME_DEFAULT;
    c->next_id = 1;
    c->cap = 64;
    c->next_expiry_ms = UINT64_MAX;
    c->tab = calloc(c->cap, sizeof *c->tab);
    if (!c->tab) {
        PD_LOG_ERROR("pdclient: no memory for the request table");
        goto err_free_client;
    }
    c->ctx = zmq_ctx_new();
    if (!c->ctx) {
        PD_LOG_ERROR("pdclient: zmq_ctx_new failed: %s", zmq_strerror(errno));
        goto err_free_tab;
    }
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) {
        PD_LOG_ERROR("pdclient: zmq_socket failed: %s", zmq_strerror(errno));
        goto err_term_ctx;
    }
    /* The router drops what a full client queue cannot take: never let ours fill. */
    int linger = (int)c->opt.linger_ms, rcvhwm = 0, sndhwm = 100000;
    int64_t maxmsg = (int64_t)c->opt.max_frame + 4096;
    if (zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(c->sock, ZMQ_RCVHWM, &rcvhwm, sizeof rcvhwm) ||
        zmq_setsockopt(c->sock, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm) ||
        zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg)) {
        PD_LOG_ERROR("pdclient: zmq_setsockopt failed: %s", zmq_strerror(errno));
        goto err_close_sock;
    }
    if (zmq_connect(c->sock, endpoint)) {
        PD_LOG_ERROR("pdclient: cannot connect to '%s': %s", endpoint,
                     zmq_strerror(errno));
        goto err_close_sock;
    }
    *client_p = c;
    return PD_OK;

err_close_sock:
    zmq_close(c->sock);
err_term_ctx:
    zmq_ctx_term(c->ctx);
err_free_tab:
    free(c->tab);
err_free_client:
    free(c);
    return PD_ERR_IO;
}

void pdc_client_destroy(pdc_client_t **client_p)
{
    if (!client_p || !*client_p)
        return;
    pdc_client_t *c = *client_p;
    Pd__Envelope *env;
    while ((env = backlog_pop(c)))
        pd__envelope__free_unpacked(env, NULL);
    free(c->backlog);
    zmq_close(c->sock);
    zmq_ctx_term(c->ctx);
    free(c->tab);
    free(c);
    *client_p = NULL;
}

/* Sends env, waiting for room in the queue until until_ms (monotonic). */
static pd_status_t send_env(pdc_client_t *c, const Pd__Envelope *env, uint64_t until_ms,
                            pdc_error_t *err)
{
    for (;;) {
        if (pd_rpc_send(c->sock, NULL, 0, env, NULL, 0) == 0)
            return PD_OK;
        if (errno != EAGAIN && errno != EINTR) {
            PD_LOG_WARN("pdclient: sending %s failed: %s",
                        pd_rpc_method_name(env->method), zmq_strerror(errno));
            set_err(err, PDC_ERR_TRANSPORT, "sending %s failed: %s",
                    pd_rpc_method_name(env->method), zmq_strerror(errno));
            return PD_ERR_IO;
        }
        uint64_t now = pd_rpc_mono_ms();
        if (now >= until_ms) {
            PD_LOG_WARN("pdclient: the send queue stayed full; %s not sent",
                        pd_rpc_method_name(env->method));
            set_err(err, PDC_ERR_TIMEOUT, "the send queue stayed full; %s not sent",
                    pd_rpc_method_name(env->method));
            return PD_ERR_IO;
        }
        zmq_pollitem_t it = {.socket = c->sock, .events = ZMQ_POLLOUT};
        long wait = (long)(until_ms - now);
        zmq_poll(&it, 1, wait > 100 ? 100 : wait);
    }
}

static void send_cancel(pdc_client_t *c, req_t *r)
{
    Pd__Envelope env;
    Pd__CancelRequest body = PD__CANCEL_REQUEST__INIT;
    pd_rpc_envelope_init(&env, PD__METHOD__CANCEL, r->id);
    env.cancel = &body;
    /* best effort: a cancel that cannot be queued in 100 ms is a timeout anyway */
    if (send_env(c, &env, pd_rpc_mono_ms() + 100, NULL) == PD_OK)
        r->cancel_sent = true;
    uint64_t until = pd_rpc_mono_ms() + CANCEL_WAIT_MS;
    if (r->expire_ms > until)
        r->expire_ms = until;
    if (r->expire_ms < c->next_expiry_ms)
        c->next_expiry_ms = r->expire_ms;
}

/* Waits up to wait_ms for one envelope. Returns 1 with *env_p (owned by the caller),
 * 0 when none came (or a malformed one was dropped), -1 on a socket failure. */
static int recv_env(pdc_client_t *c, long wait_ms, Pd__Envelope **env_p)
{
    pd_rpc_msg_t m;
    int rc = pd_rpc_recv(c->sock, false, c->opt.max_frame, 0, &m);
    if (rc == 0 && wait_ms > 0) {
        zmq_pollitem_t it = {.socket = c->sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, wait_ms) < 0 && errno != EINTR) {
            PD_LOG_ERROR("pdclient: zmq_poll failed: %s", zmq_strerror(errno));
            return -1;
        }
        rc = pd_rpc_recv(c->sock, false, c->opt.max_frame, 0, &m);
    }
    if (rc < 0) {
        if (errno == EINTR)
            return 0;
        PD_LOG_ERROR("pdclient: receive failed: %s", zmq_strerror(errno));
        return -1;
    }
    if (rc == 0)
        return 0;
    if (!m.env) {
        PD_LOG_WARN("pdclient: dropped a bad reply (request %llu): %s: %s",
                    (unsigned long long)m.err_request_id, pd_rpc_error_name(m.err),
                    m.err_msg);
        pd_rpc_msg_clear(&m);
        return 0;
    }
    *env_p = m.env;
    m.env = NULL;
    pd_rpc_msg_clear(&m);
    return 1;
}

/* ---- replies ---- */

static void usage_view(const Pd__Usage *u, pdc_usage_t *v)
{
    *v = (pdc_usage_t){
        .prompt_tokens = u->prompt_tokens,
        .completion_tokens = u->completion_tokens,
        .cached_tokens = u->cached_tokens,
        .retries = u->retries,
        .seed = u->seed,
        .spec_proposed = u->spec_proposed,
        .spec_accepted = u->spec_accepted,
        .queue_ms = u->queue_ms,
        .ttft_ms = u->ttft_ms,
        .e2e_ms = u->e2e_ms,
        .prefill_worker = u->prefill_worker ? u->prefill_worker : "",
        .decode_worker = u->decode_worker ? u->decode_worker : "",
        .prompt_ids = u->prompt_ids,
        .n_prompt_ids = u->n_prompt_ids,
    };
}

/* Delivers a request's error event and retires it. */
static int fail_req(pdc_client_t *c, req_t *r, const pdc_error_t *e, pdc_event_fn fn,
                    void *user)
{
    pdc_event_t ev = {.kind = PDC_EVENT_ERROR,
                      .request_id = r->id,
                      .req_user = r->user,
                      .error = e,
                      .done = true};
    req_remove(c, r);
    if (fn)
        fn(user, &ev);
    return 1;
}

static const int32_t no_ids[1]; /* a chunk without ids still points somewhere */

static int handle_chunk(pdc_client_t *c, const Pd__Envelope *env, pdc_event_fn fn,
                        void *user)
{
    req_t *r = req_find(c, env->request_id);
    const Pd__Chunk *ch = env->chunk;
    if (!r) {
        PD_LOG_DEBUG("pdclient: chunk for request %llu, not in flight: dropped",
                     (unsigned long long)env->request_id);
        return 0;
    }
    const char *finish = ch->finish_reason ? ch->finish_reason : "";
    bool done = *finish != 0;
    if (ch->index != r->next_index) {
        if (!done && (uint64_t)ch->index + ch->n_ids <= r->next_index) {
            PD_LOG_WARN("pdclient: request %llu: chunk at index %u repeats tokens "
                        "already received (next %u): dropped",
                        (unsigned long long)r->id, ch->index, r->next_index);
            return 0;
        }
        pdc_error_t e;
        set_err(&e, PDC_ERR_PROTOCOL, "chunk at index %u, expected %u", ch->index,
                r->next_index);
        PD_LOG_WARN("pdclient: request %llu: %s", (unsigned long long)r->id, e.message);
        if (!done && !r->cancel_sent)
            send_cancel(c, r);
        return fail_req(c, r, &e, fn, user);
    }
    pdc_usage_t u;
    if (ch->usage)
        usage_view(ch->usage, &u);
    const char *text = ch->text ? ch->text : "";
    pdc_chunk_t chunk = {.request_id = r->id,
                         .index = ch->index,
                         .ids = ch->ids ? ch->ids : no_ids,
                         .n_ids = ch->n_ids,
                         .text = text,
                         .text_len = strlen(text),
                         .finish_reason = finish,
                         .usage = (done && ch->usage) ? &u : NULL};
    pdc_event_t ev = {.kind = PDC_EVENT_CHUNK,
                      .request_id = r->id,
                      .req_user = r->user,
                      .chunk = &chunk,
                      .done = done};
    r->next_index += (uint32_t)ch->n_ids;
    if (done)
        req_remove(c, r); /* before the callback, which may submit (and move slots) */
    int stop = fn ? fn(user, &ev) : 0;
    if (stop && !done) {
        r = req_find(c, env->request_id);
        if (r && !r->cancel_sent)
            send_cancel(c, r);
    }
    return 1;
}

static int handle_env(pdc_client_t *c, Pd__Envelope *env, pdc_event_fn fn, void *user)
{
    int n = 0;
    req_t *r;
    switch (env->method) {
    case PD__METHOD__CHUNK:
        n = handle_chunk(c, env, fn, user);
        break;
    case PD__METHOD__ERROR:
        r = req_find(c, env->request_id);
        if (r) {
            pdc_error_t e;
            Pd__ErrorCode code = env->error->code;
            set_err(&e, code ? (pdc_code_t)code : PDC_INTERNAL, "%s",
                    env->error->message ? env->error->message : "");
            PD_LOG_INFO("pdclient: request %llu failed: %s: %s",
                        (unsigned long long)r->id, pdc_code_name(e.code), e.message);
            n = fail_req(c, r, &e, fn, user);
        } else {
            PD_LOG_WARN("pdclient: error for request %llu, not in flight: %s: %s",
                        (unsigned long long)env->request_id,
                        pd_rpc_error_name(env->error->code),
                        env->error->message ? env->error->message : "");
        }
        break;
    case PD__METHOD__CANCEL_REPLY: {
        r = req_find(c, env->request_id);
        pdc_event_t ev = {.kind = PDC_EVENT_CANCEL_REPLY,
                          .request_id = env->request_id,
                          .req_user = r ? r->user : NULL,
                          .found = env->cancel_reply->found};
        if (fn)
            fn(user, &ev);
        n = 1;
        break;
    }
    default:
        PD_LOG_DEBUG("pdclient: %s for request %llu dropped (no call waits for it)",
                     pd_rpc_method_name(env->method),
                     (unsigned long long)env->request_id);
        break;
    }
    pd__envelope__free_unpacked(env, NULL);
    return n;
}

/* Fails every request (only_id: that one alone) whose deadline + grace is past. */
static int expire_due(pdc_client_t *c, uint64_t now, uint64_t only_id, pdc_event_fn fn,
                      void *user)
{
    if (now < c->next_expiry_ms)
        return 0;
    int n = 0;
    uint64_t next = UINT64_MAX;
    const req_t *tab0 = c->tab;
    for (size_t i = 0; i < c->cap;) {
        req_t *r = &c->tab[i];
        if (!r->id || (only_id && r->id != only_id)) {
            if (r->id && r->expire_ms < next)
                next = r->expire_ms;
            i++;
            continue;
        }
        if (r->expire_ms > now) {
            if (r->expire_ms < next)
                next = r->expire_ms;
            i++;
            continue;
        }
        pdc_error_t e;
        set_err(&e, PDC_ERR_TIMEOUT, "%s",
                r->cancel_sent ? "no end of stream after the cancel"
                               : "no answer before the deadline");
        PD_LOG_INFO("pdclient: request %llu timed out: %s", (unsigned long long)r->id,
                    e.message);
        if (!r->cancel_sent)
            send_cancel(c, r);
        /* req_remove may shift a later entry into slot i: look at i again */
        n += fail_req(c, r, &e, fn, user);
        if (c->tab != tab0) /* the callback submitted and the table grew: rescan soon */
            next = 0;
    }
    c->next_expiry_ms = next;
    return n;
}

/* ---- submit, poll, cancel ---- */

static uint64_t req_deadline(const pdc_client_t *c, const pdc_request_t *req,
                             uint64_t now_rt)
{
    if (req->deadline_ms)
        return req->deadline_ms;
    return now_rt + (req->timeout_ms ? req->timeout_ms : c->opt.default_timeout_ms);
}

pd_status_t pdc_submit(pdc_client_t *c, const pdc_request_t *req, void *req_user,
                       uint64_t *request_id_p, pdc_error_t *err_p)
{
    /* an empty text prompt is BOS alone (docs/protocol.md) */
    if (!c || !req || (!req->prompt && !req->n_prompt_ids) ||
        (req->n_prompt_ids && !req->prompt_ids) || (req->n_stop_ids && !req->stop_ids)) {
        PD_LOG_ERROR("pdclient: a request needs a prompt or prompt ids");
        set_err(err_p, PDC_ERR_ARGUMENT, "a request needs a prompt or prompt ids");
        return PD_ERR_INVALID;
    }
    uint64_t now_rt = pd_rpc_realtime_ms(), now = pd_rpc_mono_ms();
    uint64_t deadline = req_deadline(c, req, now_rt);
    Pd__Sampling s = PD__SAMPLING__INIT;
    s.temperature = req->temperature;
    s.top_p = req->top_p;
    s.top_k = req->top_k;
    s.min_p = req->min_p;
    s.seed = req->seed;
    s.has_seed = req->has_seed;
    Pd__GenerateRequest g = PD__GENERATE_REQUEST__INIT;
    g.prompt = (char *)(req->n_prompt_ids || !req->prompt ? "" : req->prompt);
    g.n_prompt_ids = req->n_prompt_ids;
    g.prompt_ids = (int32_t *)req->prompt_ids;
    g.max_tokens = req->max_tokens;
    g.sampling = &s;
    g.ignore_eos = req->ignore_eos;
    g.spec_k = req->spec_k;
    g.n_stop_ids = req->n_stop_ids;
    g.stop_ids = (int32_t *)req->stop_ids;
    g.no_text = req->no_text;
    Pd__Envelope env;
    req_t r = {.id = c->next_id++,
               .user = req_user,
               .expire_ms =
                   now + (deadline > now_rt ? deadline - now_rt : 0) + c->opt.grace_ms};
    pd_rpc_envelope_init(&env, PD__METHOD__GENERATE, r.id);
    env.deadline_ms = deadline;
    env.trace_id = req->trace_id;
    env.generate = &g;
    pd_status_t st = req_insert(c, &r);
    if (st != PD_OK) {
        set_err(err_p, PDC_ERR_ARGUMENT, "no memory for another request");
        return st;
    }
    st = send_env(c, &env, r.expire_ms, err_p);
    if (st != PD_OK) {
        req_remove(c, req_find(c, r.id));
        return st;
    }
    if (r.expire_ms < c->next_expiry_ms)
        c->next_expiry_ms = r.expire_ms;
    if (request_id_p)
        *request_id_p = r.id;
    return PD_OK;
}

int pdc_poll(pdc_client_t *c, int timeout_ms, pdc_event_fn on_event, void *user)
{
    if (!c)
        return PD_ERR_INVALID;
    int n = 0;
    Pd__Envelope *env;
    while ((env = backlog_pop(c)))
        n += handle_env(c, env, on_event, user);
    uint64_t start = pd_rpc_mono_ms();
    n += expire_due(c, start, 0, on_event, user);
    uint64_t until;
    if (timeout_ms >= 0)
        until = start + (uint64_t)timeout_ms;
    else
        until = c->n ? c->next_expiry_ms : start;
    for (int handled = 0; handled < MAX_DRAIN;) {
        uint64_t now = pd_rpc_mono_ms();
        uint64_t stop = until < c->next_expiry_ms ? until : c->next_expiry_ms;
        long wait = (n || now >= stop) ? 0 : (long)(stop - now);
        int rc = recv_env(c, wait, &env);
        if (rc < 0)
            return PD_ERR_IO;
        if (rc > 0) {
            n += handle_env(c, env, on_event, user);
            handled++;
            continue;
        }
        now = pd_rpc_mono_ms();
        n += expire_due(c, now, 0, on_event, user);
        if (n || now >= until)
            break;
    }
    return n;
}

pd_status_t pdc_cancel(pdc_client_t *c, uint64_t request_id, pdc_error_t *err_p)
{
    req_t *r = c ? req_find(c, request_id) : NULL;
    if (!r) {
        PD_LOG_INFO("pdclient: cancel of request %llu, not in flight",
                    (unsigned long long)request_id);
        set_err(err_p, PDC_NOT_FOUND, "request %llu is not in flight",
                (unsigned long long)request_id);
        return PD_ERR_NOT_FOUND;
    }
    if (!r->cancel_sent)
        send_cancel(c, r);
    if (!r->cancel_sent) {
        set_err(err_p, PDC_ERR_TRANSPORT, "the cancel could not be sent");
        return PD_ERR_IO;
    }
    return PD_OK;
}

/* ---- pdc_generate ---- */

typedef struct gen_state {
    pdc_result_t *res;
    pdc_chunk_fn on_chunk;
    void *user;
    double t0; /* ms */
    size_t ids_cap, text_cap;
    bool user_cancelled, done;
    pd_status_t st;
} gen_state_t;

static double mono_ms_f(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int append(void **buf, size_t *cap, size_t len, size_t add, size_t elem)
{
    if (len + add + 1 <= *cap)
        return 0;
    size_t cap2 = (*cap ? *cap * 2 : 64) + add;
    void *b = realloc(*buf, cap2 * elem);
    if (!b)
        return -1;
    *buf = b;
    *cap = cap2;
    return 0;
}

static char *strdup_or_empty(const char *s)
{
    return strdup(s ? s : "");
}

static void keep_usage(pdc_result_t *res, const pdc_usage_t *u)
{
    res->has_usage = true;
    res->usage = *u;
    res->usage.prefill_worker = strdup_or_empty(u->prefill_worker);
    res->usage.decode_worker = strdup_or_empty(u->decode_worker);
    int32_t *ids = NULL;
    if (u->n_prompt_ids) {
        ids = malloc(u->n_prompt_ids * sizeof *ids);
        if (ids)
            memcpy(ids, u->prompt_ids, u->n_prompt_ids * sizeof *ids);
    }
    res->usage.prompt_ids = ids;
    res->usage.n_prompt_ids = ids ? u->n_prompt_ids : 0;
}

static int gen_event(void *user, const pdc_event_t *ev)
{
    gen_state_t *g = user;
    pdc_result_t *res = g->res;
    if (ev->kind == PDC_EVENT_ERROR) {
        g->done = true;
        if (ev->error->code == PDC_ERR_TIMEOUT && g->user_cancelled) {
            snprintf(res->finish_reason, sizeof res->finish_reason, "cancelled");
        } else {
            res->error = *ev->error;
            g->st = code_status(ev->error->code);
        }
        return 0;
    }
    if (ev->kind != PDC_EVENT_CHUNK)
        return 0;
    const pdc_chunk_t *ch = ev->chunk;
    double t = mono_ms_f() - g->t0;
    if (!res->n_ids && ch->n_ids)
        res->ttft_ms = t;
    if (append((void **)&res->ids, &g->ids_cap, res->n_ids, ch->n_ids,
               sizeof *res->ids) ||
        append((void **)&res->text, &g->text_cap, res->text_len, ch->text_len, 1)) {
        PD_LOG_ERROR("pdclient: no memory for the output of request %llu",
                     (unsigned long long)ch->request_id);
        set_err(&res->error, PDC_ERR_ARGUMENT, "no memory for the output");
        g->st = PD_ERR_NOMEM;
        g->user_cancelled = true;
        return 1;
    }
    if (ch->n_ids)
        memcpy(res->ids + res->n_ids, ch->ids, ch->n_ids * sizeof *res->ids);
    res->n_ids += ch->n_ids;
    if (ch->text_len)
        memcpy(res->text + res->text_len, ch->text, ch->text_len);
    res->text_len += ch->text_len;
    res->text[res->text_len] = 0;
    int stop = 0;
    if (!g->user_cancelled && g->on_chunk && g->on_chunk(g->user, ch))
        stop = 1;
    if (stop)
        g->user_cancelled = true;
    if (ev->done) {
        g->done = true;
        res->e2e_ms = t;
        snprintf(res->finish_reason, sizeof res->finish_reason, "%s", ch->finish_reason);
        if (ch->usage)
            keep_usage(res, ch->usage);
    }
    return stop;
}

pd_status_t pdc_generate(pdc_client_t *c, const pdc_request_t *req, pdc_chunk_fn on_chunk,
                         void *user, pdc_result_t *res)
{
    memset(res, 0, sizeof *res);
    gen_state_t g = {.res = res, .on_chunk = on_chunk, .user = user, .t0 = mono_ms_f()};
    pd_status_t st = pdc_submit(c, req, &g, &res->request_id, &res->error);
    if (st != PD_OK)
        return st;
    uint64_t id = res->request_id;
    while (!g.done) {
        req_t *r = req_find(c, id);
        if (!r) /* cannot happen: a retired request has delivered its last event */
            break;
        uint64_t now = pd_rpc_mono_ms();
        if (now >= r->expire_ms) {
            c->next_expiry_ms = now; /* force the scan */
            expire_due(c, now, id, gen_event, &g);
            break;
        }
        Pd__Envelope *env;
        int rc = recv_env(c, (long)(r->expire_ms - now), &env);
        if (rc < 0) {
            set_err(&res->error, PDC_ERR_TRANSPORT, "receive failed: %s",
                    zmq_strerror(errno));
            req_remove(c, r);
            return PD_ERR_IO;
        }
        if (rc == 0)
            continue;
        if (env->request_id == id &&
            (env->method == PD__METHOD__CHUNK || env->method == PD__METHOD__ERROR ||
             env->method == PD__METHOD__CANCEL_REPLY))
            handle_env(c, env, gen_event, &g);
        else if (backlog_push(c, env) != PD_OK)
            PD_LOG_WARN("pdclient: a reply for request %llu was lost",
                        (unsigned long long)env->request_id);
    }
    if (g.user_cancelled && !res->finish_reason[0] && g.st == PD_OK)
        snprintf(res->finish_reason, sizeof res->finish_reason, "cancelled");
    if (!res->text) {
        res->text = calloc(1, 1);
        if (!res->text && g.st == PD_OK)
            g.st = PD_ERR_NOMEM;
    }
    return g.st;
}

void pdc_result_fini(pdc_result_t *res)
{
    if (!res)
        return;
    free(res->ids);
    free(res->text);
    if (res->has_usage) {
        free((void *)res->usage.prefill_worker);
        free((void *)res->usage.decode_worker);
        free((void *)res->usage.prompt_ids);
    }
    memset(res, 0, sizeof *res);
}

/* ---- health and stats ---- */

/* Sends one unary call and waits for its reply (or an ERROR) with the same id. */
static pd_status_t unary(pdc_client_t *c, Pd__Envelope *env, Pd__Method reply,
                         uint32_t timeout_ms, Pd__Envelope **reply_p, pdc_error_t *err)
{
    uint64_t now = pd_rpc_mono_ms(),
             until = now + (timeout_ms ? timeout_ms : DEFAULT_CALL_MS);
    uint64_t id = c->next_id++;
    env->request_id = id;
    env->deadline_ms = pd_rpc_realtime_ms() + (until - now);
    pd_status_t st = send_env(c, env, until, err);
    if (st != PD_OK)
        return st;
    while ((now = pd_rpc_mono_ms()) < until) {
        Pd__Envelope *r;
        int rc = recv_env(c, (long)(until - now), &r);
        if (rc < 0) {
            set_err(err, PDC_ERR_TRANSPORT, "receive failed: %s", zmq_strerror(errno));
            return PD_ERR_IO;
        }
        if (rc == 0)
            continue;
        if (r->request_id == id && r->method == reply) {
            *reply_p = r;
            return PD_OK;
        }
        if (r->request_id == id && r->method == PD__METHOD__ERROR) {
            pdc_code_t code = r->error->code ? (pdc_code_t)r->error->code : PDC_INTERNAL;
            set_err(err, code, "%s", r->error->message ? r->error->message : "");
            PD_LOG_INFO("pdclient: %s failed: %s: %s", pd_rpc_method_name(env->method),
                        pdc_code_name(code), r->error->message);
            pd__envelope__free_unpacked(r, NULL);
            return code_status(code);
        }
        if (r->request_id == id) {
            PD_LOG_WARN("pdclient: %s answered with %s", pd_rpc_method_name(env->method),
                        pd_rpc_method_name(r->method));
            pd__envelope__free_unpacked(r, NULL);
            continue;
        }
        backlog_push(c, r);
    }
    PD_LOG_INFO("pdclient: no answer to %s in %u ms", pd_rpc_method_name(env->method),
                timeout_ms ? timeout_ms : DEFAULT_CALL_MS);
    set_err(err, PDC_ERR_TIMEOUT, "no answer to %s in %u ms",
            pd_rpc_method_name(env->method), timeout_ms ? timeout_ms : DEFAULT_CALL_MS);
    return PD_ERR_IO;
}

pd_status_t pdc_health(pdc_client_t *c, uint32_t timeout_ms, pdc_health_t *h,
                       pdc_error_t *err_p)
{
    memset(h, 0, sizeof *h);
    if (!c) {
        set_err(err_p, PDC_ERR_ARGUMENT, "no client");
        return PD_ERR_INVALID;
    }
    Pd__Envelope env, *rep = NULL;
    Pd__HealthRequest body = PD__HEALTH_REQUEST__INIT;
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 0);
    env.health = &body;
    pd_status_t st = unary(c, &env, PD__METHOD__HEALTH_REPLY, timeout_ms, &rep, err_p);
    if (st != PD_OK)
        return st;
    const Pd__HealthReply *r = rep->health_reply;
    h->ok = r->ok;
    h->draining = r->draining;
    h->prefill_workers = r->prefill_workers;
    h->decode_workers = r->decode_workers;
    snprintf(h->model, sizeof h->model, "%s", r->model ? r->model : "");
    pd__envelope__free_unpacked(rep, NULL);
    return PD_OK;
}

static void worker_stats(const Pd__WorkerInfo *w, pdc_worker_stats_t *o)
{
    memset(o, 0, sizeof *o);
    o->worker_id = w->worker_id;
    snprintf(o->name, sizeof o->name, "%s", w->name ? w->name : "");
    o->role = w->role == PD__ROLE__PREFILL  ? PDC_ROLE_PREFILL
              : w->role == PD__ROLE__DECODE ? PDC_ROLE_DECODE
                                            : PDC_ROLE_UNKNOWN;
    o->alive = w->alive;
    o->last_heartbeat_ms_ago = w->last_heartbeat_ms_ago;
    const Pd__WorkerLoad *l = w->load;
    if (!l)
        return;
    o->draining = l->draining;
    o->free_blocks = l->free_blocks;
    o->total_blocks = l->total_blocks;
    o->running = l->running;
    o->waiting = l->waiting;
    o->reserved_blocks = l->reserved_blocks;
    o->held_blocks = l->held_blocks;
    o->queued_prefill_tokens = l->queued_prefill_tokens;
    o->tasks_done = l->tasks_done;
    o->tokens_out = l->tokens_out;
    o->kv_bytes = l->kv_bytes;
    o->steps = l->steps;
    o->forward_s = l->forward_s;
    o->sample_s = l->sample_s;
    o->sample_threads = l->sample_threads;
}

pd_status_t pdc_stats(pdc_client_t *c, uint32_t timeout_ms, pdc_stats_t *s,
                      pdc_error_t *err_p)
{
    memset(s, 0, sizeof *s);
    if (!c) {
        set_err(err_p, PDC_ERR_ARGUMENT, "no client");
        return PD_ERR_INVALID;
    }
    Pd__Envelope env, *rep = NULL;
    Pd__StatsRequest body = PD__STATS_REQUEST__INIT;
    pd_rpc_envelope_init(&env, PD__METHOD__STATS, 0);
    env.stats = &body;
    pd_status_t st = unary(c, &env, PD__METHOD__STATS_REPLY, timeout_ms, &rep, err_p);
    if (st != PD_OK)
        return st;
    const Pd__StatsReply *r = rep->stats_reply;
    if (r->n_workers) {
        s->workers = calloc(r->n_workers, sizeof *s->workers);
        if (!s->workers) {
            PD_LOG_ERROR("pdclient: no memory for %zu workers' stats", r->n_workers);
            set_err(err_p, PDC_ERR_ARGUMENT, "no memory for the stats");
            pd__envelope__free_unpacked(rep, NULL);
            return PD_ERR_NOMEM;
        }
        for (size_t i = 0; i < r->n_workers; i++)
            worker_stats(r->workers[i], &s->workers[i]);
        s->n_workers = r->n_workers;
    }
    s->requests_total = r->requests_total;
    s->requests_in_flight = r->requests_in_flight;
    s->requests_failed = r->requests_failed;
    s->retries = r->retries;
    s->tokens_out = r->tokens_out;
    s->bad_frames = r->bad_frames;
    pd__envelope__free_unpacked(rep, NULL);
    return PD_OK;
}

void pdc_stats_fini(pdc_stats_t *s)
{
    if (!s)
        return;
    free(s->workers);
    memset(s, 0, sizeof *s);
}
