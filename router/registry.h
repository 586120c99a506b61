/* registry.h - the router's view of its workers: who is registered (by ZeroMQ
 * identity and by worker id), their last reported load, whether they are alive, and
 * the policies that pick a decode and a prefill worker for a request.
 *
 * A worker declared dead (silent for --dead-ms, unroutable, deregistered) stays in
 * the registry, marked !alive, so STATS can still show it for a while
 * (pd_registry_prune drops it later); the lookups by identity and by id return alive
 * workers only, which is what fences a dead worker off.
 * Picking: decode = least loaded (running + waiting + tasks assigned since its last
 * heartbeat, then most free blocks) among alive, non-draining decode workers,
 * preferring those with room for the prompt. Prefill = by policy: round-robin;
 * least-loaded (queued prefill tokens + tokens assigned since the last heartbeat);
 * prefix-aware (hashes of the prompt's first 16, 32, 48, 64 tokens in a bounded LRU
 * table remember which worker got each prefix; the worker holding the longest one
 * is preferred unless its queue exceeds 2x the least loaded one's + 1024 tokens).
 * pd_worker_t is transparent: the router reads its fields; the registry owns it and
 * the pointer stays valid until pd_registry_prune or pd_registry_destroy.
 * Threading: the router's loop thread only. */
#ifndef PD_ROUTER_REGISTRY_H
#define PD_ROUTER_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/rpc.h"
#include "common/status.h"

typedef enum pd_policy {
    PD_POLICY_PREFIX_AWARE = 0,
    PD_POLICY_LEAST_LOADED = 1,
    PD_POLICY_ROUND_ROBIN = 2,
} pd_policy_t;

/* -1 for an unknown name. */
int pd_policy_parse(const char *s);
const char *pd_policy_name(pd_policy_t p);

typedef struct pd_worker_load {
    uint32_t free_blocks, total_blocks, running, waiting;
    uint64_t queued_prefill_tokens;
    uint32_t reserved_blocks, held_blocks;
    uint64_t tasks_done, tokens_out, kv_bytes;
    uint64_t spec_proposed, spec_accepted;
    uint64_t steps;
    double forward_s, sample_s;
    uint32_t sample_threads;
    bool draining;
} pd_worker_load_t;

typedef struct pd_worker {
    uint64_t id;
    uint8_t ident[PD_RPC_MAX_IDENT];
    size_t ident_len;
    char name[128];
    Pd__Role role;
    bool can_prefill; /* a decode worker that prefills locally */
    bool alive;
    uint64_t registered_ms, last_seen_ms, dead_since_ms; /* monotonic */
    pd_worker_load_t load;
    bool has_load; /* a heartbeat arrived since registration */
    /* Assigned by the router since the last heartbeat (the load estimate between
     * two reports). */
    uint64_t est_tokens;
    uint32_t est_tasks, est_blocks;
    /* The worker's UCX source (its own copies of the bytes). */
    bool has_ucx;
    Pd__UcxSource ucx;
    /* The worker's CUDA IPC source (its own copies), with the CUDA IPC transport. */
    bool has_dev;
    Pd__DeviceSource dev;
    uint32_t max_seq_len;
} pd_worker_t;

typedef struct pd_registry pd_registry_t;

/* prefix_slots: the LRU table's size (0: 4096). */
pd_status_t pd_registry_new(size_t prefix_slots, pd_registry_t **reg_p);
void pd_registry_destroy(pd_registry_t **reg_p);

/* Adds an alive worker for an accepted REGISTER (copied; r is not kept) with a fresh
 * id. Returns the worker, owned by the registry. */
pd_worker_t *pd_registry_add(pd_registry_t *reg, const void *ident, size_t ident_len,
                             const Pd__Register *r, uint64_t now_ms);
/* Alive workers only; NULL when none matches. */
pd_worker_t *pd_registry_by_ident(pd_registry_t *reg, const void *ident, size_t len);
pd_worker_t *pd_registry_by_id(pd_registry_t *reg, uint64_t id);
pd_worker_t *pd_registry_by_name(pd_registry_t *reg, const char *name);
/* Every worker, alive or not (for STATS and the liveness sweep). */
size_t pd_registry_count(const pd_registry_t *reg);
pd_worker_t *pd_registry_at(pd_registry_t *reg, size_t i);

/* Marks w dead (no-op when already dead). Its pointer stays valid until pruned. */
void pd_registry_mark_dead(pd_registry_t *reg, pd_worker_t *w, uint64_t now_ms);
/* Frees workers dead for longer than keep_ms. */
void pd_registry_prune(pd_registry_t *reg, uint64_t now_ms, uint64_t keep_ms);
/* Records a heartbeat's load (NULL: none) and resets the estimates. */
void pd_registry_heartbeat(pd_worker_t *w, const Pd__WorkerLoad *load, uint64_t now_ms);

/* Counts alive workers that can take a prefill (prefill workers, and decode workers
 * with can_prefill when include_local) and alive decode workers. */
void pd_registry_counts(const pd_registry_t *reg, uint32_t *prefill_p, uint32_t *decode_p,
                        uint32_t *local_prefill_p);

/* A decode worker for a prompt of need_blocks blocks; local: only can_prefill ones.
 * avoid_id: a worker to pass over when another qualifies (0: none). NULL: none. */
pd_worker_t *pd_registry_pick_decode(pd_registry_t *reg, uint32_t need_blocks, bool local,
                                     uint64_t avoid_id);
/* A prefill worker for ids[0..n) by policy (remembers the prefix for
 * prefix-aware). NULL: none alive and not draining. */
pd_worker_t *pd_registry_pick_prefill(pd_registry_t *reg, pd_policy_t policy,
                                      const int32_t *ids, size_t n, uint64_t avoid_id);

#endif
