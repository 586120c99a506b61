/* registry.c - workers, liveness and picking policies; see registry.h.
 * Workers live in a small array of pointers (a cluster has tens of workers, so
 * linear scans are cheaper than any index); the prefix table is a fixed array with
 * a use stamp per slot, evicting the least recently used. Threading: loop thread. */
#include "router/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "common/log.h"

#define PREFIX_STEP 16
#define PREFIX_MAX  64
#define PREFIX_N    (PREFIX_MAX / PREFIX_STEP)

typedef struct prefix_slot {
    uint64_t hash; /* 0: empty */
    uint64_t worker_id;
    uint64_t stamp;
} prefix_slot_t;

struct pd_registry {
    pd_worker_t **w;
    size_t n, cap;
    uint64_t next_id;
    uint64_t rr;
    prefix_slot_t *slots;
    size_t n_slots;
    uint64_t stamp;
};

int pd_policy_parse(const char *s)
{
    if (!strcmp(s, "prefix-aware"))
        return PD_POLICY_PREFIX_AWARE;
    if (!strcmp(s, "least-loaded"))
        return PD_POLICY_LEAST_LOADED;
    if (!strcmp(s, "round-robin"))
        return PD_POLICY_ROUND_ROBIN;
    return -1;
}

const char *pd_policy_name(pd_policy_t p)
{
    switch (p) {
    case PD_POLICY_PREFIX_AWARE:
        return "prefix-aware";
    case PD_POLICY_LEAST_LOADED:
        return "least-loaded";
    case PD_POLICY_ROUND_ROBIN:
        return "round-robin";
    }
    return "unknown";
}

pd_status_t pd_registry_new(size_t prefix_slots, pd_registry_t **reg_p)
{
    pd_registry_t *reg = calloc(1, sizeof *reg);
    if (!reg)
        return PD_ERR_NOMEM;
    reg->n_slots = prefix_slots ? prefix_slots : 4096;
    reg->slots = calloc(reg->n_slots, sizeof *reg->slots);
    if (!reg->slots) {
        free(reg);
        return PD_ERR_NOMEM;
    }
    reg->next_id = 1;
    *reg_p = reg;
    return PD_OK;
}

static void worker_free(pd_worker_t *w)
{
    if (!w)
        return;
    free(w->ucx.worker_address.data);
    free(w->ucx.rkey_k.data);
    free(w->ucx.rkey_v.data);
    if (w->has_dev) { /* else node and gpu are protobuf-c's static empty string */
        free(w->dev.ipc_k.data);
        free(w->dev.ipc_v.data);
        free(w->dev.node);
        free(w->dev.gpu);
    }
    free(w);
}

void pd_registry_destroy(pd_registry_t **reg_p)
{
    if (!reg_p || !*reg_p)
        return;
    pd_registry_t *reg = *reg_p;
    for (size_t i = 0; i < reg->n; i++)
        worker_free(reg->w[i]);
    free(reg->w);
    free(reg->slots);
    free(reg);
    *reg_p = NULL;
}

static ProtobufCBinaryData bytes_dup(ProtobufCBinaryData b)
{
    ProtobufCBinaryData out = {0, NULL};
    if (b.len && b.data) {
        out.data = malloc(b.len);
        if (!out.data)
            abort(); /* a small control structure: out of memory aborts (STYLE) */
        memcpy(out.data, b.data, b.len);
        out.len = b.len;
    }
    return out;
}

pd_worker_t *pd_registry_add(pd_registry_t *reg, const void *ident, size_t ident_len,
                             const Pd__Register *r, uint64_t now_ms)
{
    if (reg->n == reg->cap) {
        size_t cap = reg->cap ? 2 * reg->cap : 16;
        pd_worker_t **nw = realloc(reg->w, cap * sizeof *nw);
        if (!nw)
            abort();
        reg->w = nw;
        reg->cap = cap;
    }
    pd_worker_t *w = calloc(1, sizeof *w);
    if (!w)
        abort();
    w->id = reg->next_id++;
    if (ident_len > sizeof w->ident)
        ident_len = sizeof w->ident;
    memcpy(w->ident, ident, ident_len);
    w->ident_len = ident_len;
    snprintf(w->name, sizeof w->name, "%s", r->name && r->name[0] ? r->name : "unnamed");
    w->role = r->role;
    w->can_prefill = r->can_prefill;
    w->alive = true;
    w->registered_ms = w->last_seen_ms = now_ms;
    w->max_seq_len = r->max_seq_len;
    if (r->layout)
        w->load.total_blocks = w->load.free_blocks = r->layout->n_blocks;
    pd__ucx_source__init(&w->ucx);
    if (r->ucx) {
        w->has_ucx = true;
        w->ucx.worker_address = bytes_dup(r->ucx->worker_address);
        w->ucx.rkey_k = bytes_dup(r->ucx->rkey_k);
        w->ucx.rkey_v = bytes_dup(r->ucx->rkey_v);
        w->ucx.base_k = r->ucx->base_k;
        w->ucx.base_v = r->ucx->base_v;
        w->ucx.len_k = r->ucx->len_k;
        w->ucx.len_v = r->ucx->len_v;
    }
    pd__device_source__init(&w->dev);
    if (r->device_source) {
        const Pd__DeviceSource *d = r->device_source;
        w->has_dev = true;
        w->dev.ipc_k = bytes_dup(d->ipc_k);
        w->dev.ipc_v = bytes_dup(d->ipc_v);
        w->dev.len_k = d->len_k;
        w->dev.len_v = d->len_v;
        w->dev.node = strdup(d->node ? d->node : "");
        w->dev.gpu = strdup(d->gpu ? d->gpu : "");
        if (!w->dev.node || !w->dev.gpu)
            abort(); /* as the allocations above: the registry has no way to refuse */
    }
    reg->w[reg->n++] = w;
    return w;
}

pd_worker_t *pd_registry_by_ident(pd_registry_t *reg, const void *ident, size_t len)
{
    for (size_t i = 0; i < reg->n; i++) {
        pd_worker_t *w = reg->w[i];
        if (w->alive && w->ident_len == len && !memcmp(w->ident, ident, len))
            return w;
    }
    return NULL;
}

pd_worker_t *pd_registry_by_id(pd_registry_t *reg, uint64_t id)
{
    for (size_t i = 0; id && i < reg->n; i++)
        if (reg->w[i]->alive && reg->w[i]->id == id)
            return reg->w[i];
    return NULL;
}

pd_worker_t *pd_registry_by_name(pd_registry_t *reg, const char *name)
{
    for (size_t i = 0; i < reg->n; i++)
        if (reg->w[i]->alive && !strcmp(reg->w[i]->name, name))
            return reg->w[i];
    return NULL;
}

size_t pd_registry_count(const pd_registry_t *reg)
{
    return reg->n;
}

pd_worker_t *pd_registry_at(pd_registry_t *reg, size_t i)
{
    return i < reg->n ? reg->w[i] : NULL;
}

void pd_registry_mark_dead(pd_registry_t *reg, pd_worker_t *w, uint64_t now_ms)
{
    (void)reg;
    if (!w->alive)
        return;
    w->alive = false;
    w->dead_since_ms = now_ms;
}

void pd_registry_prune(pd_registry_t *reg, uint64_t now_ms, uint64_t keep_ms)
{
    size_t j = 0;
    for (size_t i = 0; i < reg->n; i++) {
        pd_worker_t *w = reg->w[i];
        /* now_ms may be older than dead_since_ms (the caller read its clock first):
         * the unsigned difference would wrap and prune a worker that just died */
        if (!w->alive && now_ms >= w->dead_since_ms &&
            now_ms - w->dead_since_ms >= keep_ms)
            worker_free(w);
        else
            reg->w[j++] = w;
    }
    reg->n = j;
}

void pd_registry_heartbeat(pd_worker_t *w, const Pd__WorkerLoad *l, uint64_t now_ms)
{
    w->last_seen_ms = now_ms;
    w->est_tokens = 0;
    w->est_tasks = 0;
    w->est_blocks = 0;
    if (!l)
        return;
    w->has_load = true;
    w->load = (pd_worker_load_t){
        .free_blocks = l->free_blocks,
        .total_blocks = l->total_blocks,
        .running = l->running,
        .waiting = l->waiting,
        .queued_prefill_tokens = l->queued_prefill_tokens,
        .reserved_blocks = l->reserved_blocks,
        .held_blocks = l->held_blocks,
        .tasks_done = l->tasks_done,
        .tokens_out = l->tokens_out,
        .kv_bytes = l->kv_bytes,
        .spec_proposed = l->spec_proposed,
        .spec_accepted = l->spec_accepted,
        .steps = l->steps,
        .forward_s = l->forward_s,
        .sample_s = l->sample_s,
        .sample_threads = l->sample_threads,
        .draining = l->draining,
    };
}

void pd_registry_counts(const pd_registry_t *reg, uint32_t *prefill_p, uint32_t *decode_p,
                        uint32_t *local_prefill_p)
{
    uint32_t p = 0, d = 0, lp = 0;
    for (size_t i = 0; i < reg->n; i++) {
        const pd_worker_t *w = reg->w[i];
        if (!w->alive)
            continue;
        if (w->role == PD__ROLE__PREFILL)
            p++;
        else if (w->role == PD__ROLE__DECODE) {
            d++;
            if (w->can_prefill)
                lp++;
        }
    }
    *prefill_p = p;
    *decode_p = d;
    *local_prefill_p = lp;
}

static uint32_t free_est(const pd_worker_t *w)
{
    return w->load.free_blocks > w->est_blocks ? w->load.free_blocks - w->est_blocks : 0;
}

static uint64_t decode_load(const pd_worker_t *w)
{
    return (uint64_t)w->load.running + w->load.waiting + w->est_tasks;
}

static bool decode_better(const pd_worker_t *a, const pd_worker_t *b)
{
    if (!b)
        return true;
    if (decode_load(a) != decode_load(b))
        return decode_load(a) < decode_load(b);
    return free_est(a) > free_est(b);
}

pd_worker_t *pd_registry_pick_decode(pd_registry_t *reg, uint32_t need_blocks, bool local,
                                     uint64_t avoid_id)
{
    /* pass 0: room and not avoided; 1: not avoided; 2: room; 3: any */
    for (int pass = 0; pass < 4; pass++) {
        bool need_room = pass == 0 || pass == 2, skip_avoid = pass < 2;
        pd_worker_t *best = NULL;
        for (size_t i = 0; i < reg->n; i++) {
            pd_worker_t *w = reg->w[i];
            if (!w->alive || w->role != PD__ROLE__DECODE || w->load.draining)
                continue;
            if (local && !w->can_prefill)
                continue;
            if (skip_avoid && avoid_id && w->id == avoid_id)
                continue;
            if (need_room && w->has_load && free_est(w) < need_blocks)
                continue;
            if (decode_better(w, best))
                best = w;
        }
        if (best)
            return best;
    }
    return NULL;
}

static bool prefill_ok(const pd_worker_t *w)
{
    return w->alive && w->role == PD__ROLE__PREFILL && !w->load.draining;
}

static uint64_t prefill_load(const pd_worker_t *w)
{
    return w->load.queued_prefill_tokens + w->est_tokens;
}

static pd_worker_t *least_loaded_prefill(pd_registry_t *reg, uint64_t avoid_id)
{
    for (int pass = 0; pass < 2; pass++) {
        pd_worker_t *best = NULL;
        for (size_t i = 0; i < reg->n; i++) {
            pd_worker_t *w = reg->w[i];
            if (!prefill_ok(w) || (pass == 0 && avoid_id && w->id == avoid_id))
                continue;
            if (!best || prefill_load(w) < prefill_load(best))
                best = w;
        }
        if (best)
            return best;
    }
    return NULL;
}

static pd_worker_t *round_robin_prefill(pd_registry_t *reg, uint64_t avoid_id)
{
    size_t n_ok = 0;
    for (size_t i = 0; i < reg->n; i++)
        n_ok += prefill_ok(reg->w[i]);
    if (!n_ok)
        return NULL;
    for (size_t tries = 0; tries < n_ok; tries++) {
        size_t k = (size_t)(reg->rr++ % n_ok);
        for (size_t i = 0; i < reg->n; i++) {
            if (!prefill_ok(reg->w[i]))
                continue;
            if (k-- == 0) {
                if (n_ok > 1 && avoid_id && reg->w[i]->id == avoid_id)
                    break;
                return reg->w[i];
            }
        }
    }
    return least_loaded_prefill(reg, avoid_id);
}

static prefix_slot_t *slot_find(pd_registry_t *reg, uint64_t h)
{
    for (size_t i = 0; i < reg->n_slots; i++)
        if (reg->slots[i].hash == h)
            return &reg->slots[i];
    return NULL;
}

static void slot_put(pd_registry_t *reg, uint64_t h, uint64_t worker_id)
{
    prefix_slot_t *s = slot_find(reg, h);
    if (!s) { /* an empty slot, else the least recently used */
        s = &reg->slots[0];
        for (size_t i = 0; i < reg->n_slots && s->hash; i++)
            if (!reg->slots[i].hash || reg->slots[i].stamp < s->stamp)
                s = &reg->slots[i];
    }
    s->hash = h;
    s->worker_id = worker_id;
    s->stamp = ++reg->stamp;
}

/* Hashes of ids' first 16, 32, 48, 64 tokens (as many as n allows; a prompt under
 * 16 tokens hashes whole). Returns the count. Hash 0 is reserved for empty slots. */
static int prefix_hashes(const int32_t *ids, size_t n, uint64_t h[PREFIX_N])
{
    int k = 0;
    for (size_t len = PREFIX_STEP; len <= PREFIX_MAX && len <= n; len += PREFIX_STEP)
        h[k++] = XXH3_64bits(ids, len * sizeof *ids) | 1;
    if (!k && n)
        h[k++] = XXH3_64bits(ids, n * sizeof *ids) | 1;
    return k;
}

static pd_worker_t *prefix_aware_prefill(pd_registry_t *reg, const int32_t *ids, size_t n,
                                         uint64_t avoid_id)
{
    pd_worker_t *least = least_loaded_prefill(reg, avoid_id);
    if (!least)
        return NULL;
    uint64_t h[PREFIX_N];
    int k = prefix_hashes(ids, n, h);
    pd_worker_t *pick = least;
    for (int i = k - 1; i >= 0; i--) {
        prefix_slot_t *s = slot_find(reg, h[i]);
        if (!s)
            continue;
        pd_worker_t *w = pd_registry_by_id(reg, s->worker_id);
        if (!w || !prefill_ok(w) || w->id == avoid_id)
            continue;
        s->stamp = ++reg->stamp;
        if (prefill_load(w) <= 2 * prefill_load(least) + 1024)
            pick = w;
        break;
    }
    for (int i = 0; i < k; i++)
        slot_put(reg, h[i], pick->id);
    return pick;
}

pd_worker_t *pd_registry_pick_prefill(pd_registry_t *reg, pd_policy_t policy,
                                      const int32_t *ids, size_t n, uint64_t avoid_id)
{
    switch (policy) {
    case PD_POLICY_ROUND_ROBIN:
        return round_robin_prefill(reg, avoid_id);
    case PD_POLICY_LEAST_LOADED:
        return least_loaded_prefill(reg, avoid_id);
    case PD_POLICY_PREFIX_AWARE:
        return prefix_aware_prefill(reg, ids, n, avoid_id);
    }
    return NULL;
}
