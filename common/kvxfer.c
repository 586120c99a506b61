/* kvxfer.c - UCX one-sided KV reads (see kvxfer.h).
 *
 * Every get is tracked by an op on its peer's list (recycled through a free list in
 * the pd_ucx_t), so pd_ucx_peer_destroy can wait until UCX has completed all of them
 * after the force close, and knows any it did not (an op it had to give up on moves
 * to the orphan list and its done runs with an error; UCX's late completion then only
 * frees the op). Addresses and rkeys are framed: magic, payload length, FNV-1a 64 of
 * the payload, payload.
 * Threading: single-threaded, as the header says. */
#define _GNU_SOURCE
#include "common/kvxfer.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucp/api/ucp.h>

#include "common/log.h"

#define FRAME_MAGIC_ADDR 0x41554450u /* "PDUA" */
#define FRAME_MAGIC_RKEY 0x4b554450u /* "PDUK" */
#define FRAME_HDR        16          /* u32 magic, u32 payload length, u64 checksum */
#define MAX_REGIONS      4096
/* How long pd_ucx_peer_destroy waits for UCX to complete the force close and the
 * cancelled gets (it takes microseconds; this only bounds a UCX misbehaviour). */
#define CLOSE_WAIT_S 10.0

typedef struct op {
    struct op *prev, *next;
    pd_ucx_peer_t *peer; /* NULL for an orphan */
    pd_ucx_done_fn done;
    void *user;
} op_t;

typedef struct op_list {
    op_t *head;
} op_list_t;

struct pd_ucx {
    ucp_context_h ctx;
    ucp_worker_h worker;
    int efd;
    uint8_t *addr_frame; /* [addr_len] */
    size_t addr_len;
    pd_ucx_peer_t *peers;     /* doubly linked through prev/next */
    pd_ucx_region_t *regions; /* doubly linked through prev/next */
    op_t *free_ops;           /* singly linked through next */
    op_list_t orphans;
};

struct pd_ucx_region {
    pd_ucx_t *u;
    pd_ucx_region_t *prev, *next;
    ucp_mem_h memh;
    void *base;
    size_t len;
    uint8_t *rkey_frame; /* [rkey_len] */
    size_t rkey_len;
};

struct pd_ucx_peer {
    pd_ucx_t *u;
    pd_ucx_peer_t *prev, *next;
    ucp_ep_h ep;
    int n_regions;
    ucp_rkey_h *rkeys; /* [n_regions] */
    uint64_t *bases;   /* [n_regions] */
    uint64_t *lens;    /* [n_regions] */
    op_list_t ops;     /* gets in flight */
    int64_t pending;
    bool failed;
};

static pd_status_t map_status(ucs_status_t s)
{
    switch (s) {
    case UCS_OK:
        return PD_OK;
    case UCS_ERR_NO_MEMORY:
        return PD_ERR_NOMEM;
    case UCS_ERR_INVALID_PARAM:
        return PD_ERR_INVALID;
    case UCS_ERR_UNSUPPORTED:
        return PD_ERR_UNSUPPORTED;
    default:
        return PD_ERR_IO;
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- frames ---- */

static uint64_t fnv1a64(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static pd_status_t frame_new(uint32_t magic, const void *payload, size_t n,
                             uint8_t **out_p, size_t *len_p)
{
    if (n > UINT32_MAX - FRAME_HDR) {
        PD_LOG_ERROR("ucx: payload of %zu bytes too large to frame", n);
        return PD_ERR_OVERFLOW;
    }
    uint8_t *f = malloc(FRAME_HDR + n);
    if (!f) {
        PD_LOG_ERROR("ucx: out of memory framing %zu bytes", n);
        return PD_ERR_NOMEM;
    }
    uint32_t len32 = (uint32_t)n;
    uint64_t sum = fnv1a64(payload, n);
    memcpy(f, &magic, 4);
    memcpy(f + 4, &len32, 4);
    memcpy(f + 8, &sum, 8);
    memcpy(f + FRAME_HDR, payload, n);
    *out_p = f;
    *len_p = FRAME_HDR + n;
    return PD_OK;
}

/* The payload of a frame of len bytes, or NULL (logged) when it is malformed. */
static const uint8_t *frame_payload(uint32_t magic, const void *frame, size_t len,
                                    const char *what)
{
    const uint8_t *f = frame;
    uint32_t m, n;
    uint64_t sum;
    if (!f || len < FRAME_HDR) {
        PD_LOG_ERROR("ucx: %s of %zu bytes is too short", what, len);
        return NULL;
    }
    memcpy(&m, f, 4);
    memcpy(&n, f + 4, 4);
    memcpy(&sum, f + 8, 8);
    if (m != magic) {
        PD_LOG_ERROR("ucx: %s has a bad magic number 0x%08x", what, m);
        return NULL;
    }
    if ((size_t)n != len - FRAME_HDR) {
        PD_LOG_ERROR("ucx: %s says %u payload bytes but has %zu", what, n,
                     len - FRAME_HDR);
        return NULL;
    }
    if (fnv1a64(f + FRAME_HDR, n) != sum) {
        PD_LOG_ERROR("ucx: %s fails its checksum", what);
        return NULL;
    }
    return f + FRAME_HDR;
}

/* ---- ops ---- */

static void op_link(op_list_t *l, op_t *o)
{
    o->prev = NULL;
    o->next = l->head;
    if (l->head)
        l->head->prev = o;
    l->head = o;
}

static void op_unlink(op_list_t *l, op_t *o)
{
    if (o->prev)
        o->prev->next = o->next;
    else
        l->head = o->next;
    if (o->next)
        o->next->prev = o->prev;
    o->prev = o->next = NULL;
}

static op_t *op_take(pd_ucx_t *u)
{
    op_t *o = u->free_ops;
    if (o) {
        u->free_ops = o->next;
        memset(o, 0, sizeof *o);
        return o;
    }
    return calloc(1, sizeof(op_t));
}

static void op_put(pd_ucx_t *u, op_t *o)
{
    o->next = u->free_ops;
    u->free_ops = o;
}

/* Unlinks a completed op, recycles it and runs its done. */
static void op_finish(pd_ucx_t *u, op_t *o, pd_status_t st)
{
    pd_ucx_peer_t *p = o->peer;
    pd_ucx_done_fn done = o->done;
    void *user = o->user;
    if (p) {
        op_unlink(&p->ops, o);
        p->pending--;
    } else {
        op_unlink(&u->orphans, o);
        done = NULL; /* its done already ran */
    }
    op_put(u, o);
    if (done)
        done(user, st);
}

static void get_cb(void *request, ucs_status_t status, void *user_data)
{
    op_t *o = user_data;
    /* an orphan keeps its pd_ucx_t in user (its done already ran) */
    pd_ucx_t *u = o->peer ? o->peer->u : o->user;
    ucp_request_free(request);
    if (status != UCS_OK)
        PD_LOG_DEBUG("ucx: get completed with %s", ucs_status_string(status));
    op_finish(u, o, status == UCS_OK ? PD_OK : PD_ERR_IO);
}

/* ---- context ---- */

pd_status_t pd_ucx_new(pd_ucx_t **u_p)
{
    pd_status_t st = PD_ERR_IO;
    ucs_status_t s;
    ucp_config_t *cfg = NULL;
    pd_ucx_t *u = calloc(1, sizeof *u);
    if (!u) {
        PD_LOG_ERROR("ucx: out of memory");
        return PD_ERR_NOMEM;
    }
    u->efd = -1;
    s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_config_read failed: %s", ucs_status_string(s));
        goto err_free;
    }
    ucp_params_t prm = {
        .field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED,
        .features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP,
        .mt_workers_shared = 0,
    };
    s = ucp_init(&prm, cfg, &u->ctx);
    ucp_config_release(cfg);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_init failed: %s", ucs_status_string(s));
        goto err_free;
    }
    ucp_worker_params_t wp = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
    };
    s = ucp_worker_create(u->ctx, &wp, &u->worker);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_worker_create failed: %s", ucs_status_string(s));
        goto err_cleanup_ctx;
    }
    s = ucp_worker_get_efd(u->worker, &u->efd);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_worker_get_efd failed: %s", ucs_status_string(s));
        goto err_destroy_worker;
    }
    ucp_worker_attr_t wa = {.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS};
    s = ucp_worker_query(u->worker, &wa);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_worker_query failed: %s", ucs_status_string(s));
        goto err_destroy_worker;
    }
    st = frame_new(FRAME_MAGIC_ADDR, wa.address, wa.address_length, &u->addr_frame,
                   &u->addr_len);
    ucp_worker_release_address(u->worker, wa.address);
    if (st != PD_OK)
        goto err_destroy_worker;
    *u_p = u;
    return PD_OK;

err_destroy_worker:
    ucp_worker_destroy(u->worker);
err_cleanup_ctx:
    ucp_cleanup(u->ctx);
err_free:
    free(u);
    return st == PD_OK ? PD_ERR_IO : st;
}

void pd_ucx_destroy(pd_ucx_t **u_p)
{
    pd_ucx_t *u = u_p ? *u_p : NULL;
    if (!u)
        return;
    if (u->peers || u->regions)
        PD_LOG_WARN("ucx: destroyed with peers or regions still alive; destroying them");
    while (u->peers) {
        pd_ucx_peer_t *p = u->peers;
        pd_ucx_peer_destroy(&p);
    }
    while (u->regions) {
        pd_ucx_region_t *r = u->regions;
        pd_ucx_region_destroy(&r);
    }
    ucp_worker_destroy(u->worker);
    ucp_cleanup(u->ctx);
    /* orphans whose late completion never came: UCX is gone, nothing will touch them */
    while (u->orphans.head) {
        op_t *o = u->orphans.head;
        op_unlink(&u->orphans, o);
        free(o);
    }
    while (u->free_ops) {
        op_t *o = u->free_ops;
        u->free_ops = o->next;
        free(o);
    }
    free(u->addr_frame);
    free(u);
    *u_p = NULL;
}

int pd_ucx_fd(pd_ucx_t *u)
{
    return u->efd;
}

bool pd_ucx_arm(pd_ucx_t *u)
{
    ucs_status_t s = ucp_worker_arm(u->worker);
    if (s == UCS_OK)
        return true;
    if (s != UCS_ERR_BUSY)
        PD_LOG_ERROR("ucx: ucp_worker_arm failed: %s", ucs_status_string(s));
    return false;
}

unsigned pd_ucx_progress(pd_ucx_t *u)
{
    return ucp_worker_progress(u->worker);
}

pd_status_t pd_ucx_address(pd_ucx_t *u, const void **addr, size_t *len)
{
    *addr = u->addr_frame;
    *len = u->addr_len;
    return PD_OK;
}

/* ---- regions ---- */

pd_status_t pd_ucx_region_new(pd_ucx_t *u, void *base, size_t len, pd_ucx_region_t **r_p)
{
    pd_status_t st;
    ucs_status_t s;
    void *packed = NULL;
    size_t packed_len = 0;
    if (!base || len == 0) {
        PD_LOG_ERROR("ucx: region of %zu bytes at %p is empty", len, base);
        return PD_ERR_INVALID;
    }
    pd_ucx_region_t *r = calloc(1, sizeof *r);
    if (!r) {
        PD_LOG_ERROR("ucx: out of memory");
        return PD_ERR_NOMEM;
    }
    ucp_mem_map_params_t mp = {
        .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
        .address = base,
        .length = len,
    };
    s = ucp_mem_map(u->ctx, &mp, &r->memh);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_mem_map of %zu bytes failed: %s", len,
                     ucs_status_string(s));
        st = map_status(s);
        goto err_free;
    }
    s = ucp_rkey_pack(u->ctx, r->memh, &packed, &packed_len);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_rkey_pack failed: %s", ucs_status_string(s));
        st = map_status(s);
        goto err_unmap;
    }
    st = frame_new(FRAME_MAGIC_RKEY, packed, packed_len, &r->rkey_frame, &r->rkey_len);
    ucp_rkey_buffer_release(packed);
    if (st != PD_OK)
        goto err_unmap;
    r->u = u;
    r->base = base;
    r->len = len;
    r->next = u->regions;
    if (u->regions)
        u->regions->prev = r;
    u->regions = r;
    *r_p = r;
    return PD_OK;

err_unmap:
    ucp_mem_unmap(u->ctx, r->memh);
err_free:
    free(r);
    return st;
}

const void *pd_ucx_region_rkey(const pd_ucx_region_t *r, size_t *len)
{
    *len = r->rkey_len;
    return r->rkey_frame;
}

void *pd_ucx_region_base(const pd_ucx_region_t *r)
{
    return r->base;
}

size_t pd_ucx_region_len(const pd_ucx_region_t *r)
{
    return r->len;
}

void pd_ucx_region_destroy(pd_ucx_region_t **r_p)
{
    pd_ucx_region_t *r = r_p ? *r_p : NULL;
    if (!r)
        return;
    pd_ucx_t *u = r->u;
    ucs_status_t s = ucp_mem_unmap(u->ctx, r->memh);
    if (s != UCS_OK)
        PD_LOG_ERROR("ucx: ucp_mem_unmap failed: %s", ucs_status_string(s));
    if (r->prev)
        r->prev->next = r->next;
    else
        u->regions = r->next;
    if (r->next)
        r->next->prev = r->prev;
    free(r->rkey_frame);
    free(r);
    *r_p = NULL;
}

/* ---- peers ---- */

static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)ep;
    pd_ucx_peer_t *p = arg;
    if (!p->failed)
        PD_LOG_ERROR("ucx: peer endpoint failed: %s", ucs_status_string(status));
    p->failed = true;
}

static pd_status_t check_regions(int n, const void *const *rkeys, const size_t *rkey_lens,
                                 const uint64_t *bases, const uint64_t *lens)
{
    if (n < 0 || n > MAX_REGIONS) {
        PD_LOG_ERROR("ucx: peer with %d regions (0..%d allowed)", n, MAX_REGIONS);
        return PD_ERR_INVALID;
    }
    if (n > 0 && (!rkeys || !rkey_lens || !bases || !lens)) {
        PD_LOG_ERROR("ucx: peer with %d regions but no rkeys, bases or lengths", n);
        return PD_ERR_INVALID;
    }
    for (int i = 0; i < n; i++) {
        if (lens[i] == 0 || bases[i] > UINT64_MAX - lens[i]) {
            PD_LOG_ERROR("ucx: peer region %d at 0x%llx of %llu bytes is empty or wraps",
                         i, (unsigned long long)bases[i], (unsigned long long)lens[i]);
            return PD_ERR_INVALID;
        }
    }
    return PD_OK;
}

/* Destroys the unpacked rkeys and frees p (its endpoint already closed). */
static void peer_free(pd_ucx_peer_t *p)
{
    for (int i = 0; p->rkeys && i < p->n_regions; i++)
        if (p->rkeys[i])
            ucp_rkey_destroy(p->rkeys[i]);
    free(p->rkeys);
    free(p->bases);
    free(p->lens);
    free(p);
}

/* Force-closes p->ep and waits (bounded) for the close request. */
static void ep_force_close(pd_ucx_t *u, ucp_ep_h ep)
{
    ucp_request_param_t cp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                              .flags = UCP_EP_CLOSE_FLAG_FORCE};
    void *req = ucp_ep_close_nbx(ep, &cp);
    if (UCS_PTR_IS_ERR(req)) {
        PD_LOG_DEBUG("ucx: force close: %s", ucs_status_string(UCS_PTR_STATUS(req)));
        return;
    }
    if (!req)
        return;
    double t_end = now_s() + CLOSE_WAIT_S;
    ucs_status_t s;
    while ((s = ucp_request_check_status(req)) == UCS_INPROGRESS && now_s() < t_end)
        ucp_worker_progress(u->worker);
    if (s == UCS_INPROGRESS)
        PD_LOG_ERROR("ucx: endpoint force close did not complete in %.0f s",
                     CLOSE_WAIT_S);
    ucp_request_free(req);
}

pd_status_t pd_ucx_peer_new(pd_ucx_t *u, const void *addr, size_t addr_len, int n_regions,
                            const void *const *rkeys, const size_t *rkey_lens,
                            const uint64_t *bases, const uint64_t *lens,
                            pd_ucx_peer_t **p_p)
{
    pd_status_t st = check_regions(n_regions, rkeys, rkey_lens, bases, lens);
    if (st != PD_OK)
        return st;
    const uint8_t *ucx_addr =
        frame_payload(FRAME_MAGIC_ADDR, addr, addr_len, "peer address");
    if (!ucx_addr)
        return PD_ERR_FORMAT;
    for (int i = 0; i < n_regions; i++)
        if (!frame_payload(FRAME_MAGIC_RKEY, rkeys[i], rkey_lens[i], "peer rkey"))
            return PD_ERR_FORMAT;
    pd_ucx_peer_t *p = calloc(1, sizeof *p);
    size_t nr = n_regions > 0 ? (size_t)n_regions : 1;
    if (!p || !(p->rkeys = calloc(nr, sizeof *p->rkeys)) ||
        !(p->bases = malloc(nr * sizeof *p->bases)) ||
        !(p->lens = malloc(nr * sizeof *p->lens))) {
        PD_LOG_ERROR("ucx: out of memory for a peer of %d regions", n_regions);
        if (p)
            peer_free(p);
        return PD_ERR_NOMEM;
    }
    p->u = u;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = (const ucp_address_t *)ucx_addr,
        .err_mode = UCP_ERR_HANDLING_MODE_PEER,
        .err_handler = {.cb = ep_err_cb, .arg = p},
    };
    ucs_status_t s = ucp_ep_create(u->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        PD_LOG_ERROR("ucx: ucp_ep_create failed: %s", ucs_status_string(s));
        st = map_status(s) == PD_ERR_INVALID ? PD_ERR_FORMAT : PD_ERR_IO;
        peer_free(p);
        return st;
    }
    for (int i = 0; i < n_regions; i++) {
        const uint8_t *rk =
            frame_payload(FRAME_MAGIC_RKEY, rkeys[i], rkey_lens[i], "rkey");
        s = ucp_ep_rkey_unpack(p->ep, rk, &p->rkeys[i]);
        if (s != UCS_OK) {
            PD_LOG_ERROR("ucx: ucp_ep_rkey_unpack of region %d failed: %s", i,
                         ucs_status_string(s));
            p->rkeys[i] = NULL;
            st = map_status(s) == PD_ERR_INVALID ? PD_ERR_FORMAT : PD_ERR_IO;
            goto err_close;
        }
        p->bases[i] = bases[i];
        p->lens[i] = lens[i];
    }
    p->n_regions = n_regions;
    p->next = u->peers;
    if (u->peers)
        u->peers->prev = p;
    u->peers = p;
    *p_p = p;
    return PD_OK;

err_close:
    p->n_regions = n_regions; /* peer_free destroys the rkeys unpacked so far */
    ep_force_close(u, p->ep);
    peer_free(p);
    return st;
}

void pd_ucx_peer_destroy(pd_ucx_peer_t **p_p)
{
    pd_ucx_peer_t *p = p_p ? *p_p : NULL;
    if (!p)
        return;
    pd_ucx_t *u = p->u;
    /* The force close completes every outstanding request with UCS_ERR_CANCELED; their
     * callbacks may run inside ucp_ep_close_nbx or from the progress calls below. */
    ep_force_close(u, p->ep);
    double t_end = now_s() + CLOSE_WAIT_S;
    while (p->pending > 0 && now_s() < t_end)
        ucp_worker_progress(u->worker);
    if (p->pending > 0) {
        PD_LOG_ERROR(
            "ucx: %lld gets still pending after the force close; abandoning them",
            (long long)p->pending);
        while (p->ops.head) {
            op_t *o = p->ops.head;
            pd_ucx_done_fn done = o->done;
            void *user = o->user;
            op_unlink(&p->ops, o);
            o->peer = NULL;
            o->user = u; /* get_cb finds its pd_ucx_t here */
            op_link(&u->orphans, o);
            done(user, PD_ERR_IO);
        }
        p->pending = 0;
    }
    /* The rkeys outlive every get that used them (all completed above). */
    if (p->prev)
        p->prev->next = p->next;
    else
        u->peers = p->next;
    if (p->next)
        p->next->prev = p->prev;
    peer_free(p);
    *p_p = NULL;
}

bool pd_ucx_peer_failed(const pd_ucx_peer_t *p)
{
    return p->failed;
}

int64_t pd_ucx_peer_pending(const pd_ucx_peer_t *p)
{
    return p->pending;
}

pd_status_t pd_ucx_get(pd_ucx_peer_t *p, int region, uint64_t off, void *local,
                       size_t len, const pd_ucx_region_t *local_region,
                       pd_ucx_done_fn done, void *user)
{
    if (!p || !local || !done || len == 0) {
        PD_LOG_ERROR("ucx: get of %zu bytes with a NULL peer, destination or callback",
                     len);
        return PD_ERR_INVALID;
    }
    if (region < 0 || region >= p->n_regions) {
        PD_LOG_ERROR("ucx: get from region %d of %d", region, p->n_regions);
        return PD_ERR_RANGE;
    }
    if (off > p->lens[region] || len > p->lens[region] - off) {
        PD_LOG_ERROR("ucx: get of %zu bytes at %llu is past region %d's %llu bytes", len,
                     (unsigned long long)off, region,
                     (unsigned long long)p->lens[region]);
        return PD_ERR_RANGE;
    }
    if (local_region) {
        uintptr_t b = (uintptr_t)local_region->base, l = (uintptr_t)local;
        if (l < b || l - b > local_region->len || len > local_region->len - (l - b)) {
            PD_LOG_ERROR("ucx: get destination of %zu bytes is outside its local region",
                         len);
            return PD_ERR_RANGE;
        }
    }
    if (p->failed) {
        PD_LOG_ERROR("ucx: get from a failed peer");
        return PD_ERR_IO;
    }
    pd_ucx_t *u = p->u;
    op_t *o = op_take(u);
    if (!o) {
        PD_LOG_ERROR("ucx: out of memory for a get");
        return PD_ERR_NOMEM;
    }
    o->peer = p;
    o->done = done;
    o->user = user;
    /* Linked before the call, so a completion from inside it finds the op. */
    op_link(&p->ops, o);
    p->pending++;
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = get_cb,
        .user_data = o,
    };
    if (local_region) {
        prm.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        prm.memh = local_region->memh;
    }
    ucs_status_ptr_t req =
        ucp_get_nbx(p->ep, local, len, p->bases[region] + off, p->rkeys[region], &prm);
    if (req == NULL) { /* completed at once; get_cb is not called */
        op_finish(u, o, PD_OK);
        return PD_OK;
    }
    if (UCS_PTR_IS_ERR(req)) {
        ucs_status_t s = UCS_PTR_STATUS(req);
        op_unlink(&p->ops, o);
        p->pending--;
        op_put(u, o);
        PD_LOG_ERROR("ucx: ucp_get_nbx of %zu bytes failed: %s", len,
                     ucs_status_string(s));
        return map_status(s) == PD_ERR_NOMEM ? PD_ERR_NOMEM : PD_ERR_IO;
    }
    return PD_OK;
}
