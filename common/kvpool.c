/* kvpool.c - see kvpool.h. The free list is doubly linked through two index arrays;
 * the prefix cache is a chained hash table through a third, with buckets sized for
 * every block, so nothing is allocated after pd_kv_pool_new. */
#include "common/kvpool.h"

#include <stdlib.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack, not allocated */
#include <xxhash.h>

#include "common/log.h"
#include "kernels/sum64.h"

struct pd_kv_pool {
    int32_t n_blocks, block_size, n_layers;
    int64_t row_elems;
    pd_dtype_t dtype;
    size_t es, layer_bytes;
    uint8_t *k, *v;    /* [n_layers][n_blocks][block_size][row_elems] */
    pd_kernels_t *dev; /* a device backend, or NULL */
    pd_kv_host_t host;
    uint8_t *dk, *dv; /* device storage, laid out as k and v */
    bool pinned;

    int32_t *ref;
    /* free list: unreferenced blocks, reused from the head */
    int32_t *prev, *next, head, tail, n_free;
    /* prefix cache */
    uint8_t *committed, *has_parent;
    pd_kv_hash_t *hash, *parent;
    int32_t *tokens; /* [n_blocks][block_size] */
    int32_t *bucket, *chain;
    uint32_t bucket_mask;
    pd_kv_pool_stats_t stats;
};

pd_dtype_t pd_kv_auto_dtype(const pd_model_t *model)
{
    return strcmp(pd_model_dtype_name(model), "f32") == 0 ? PD_DTYPE_F32 : PD_DTYPE_F16;
}

static void list_unlink(pd_kv_pool_t *p, int32_t b)
{
    if (p->prev[b] >= 0)
        p->next[p->prev[b]] = p->next[b];
    else
        p->head = p->next[b];
    if (p->next[b] >= 0)
        p->prev[p->next[b]] = p->prev[b];
    else
        p->tail = p->prev[b];
    p->prev[b] = p->next[b] = -1;
    p->n_free--;
}

static void list_push(pd_kv_pool_t *p, int32_t b, bool front)
{
    if (front) {
        p->prev[b] = -1;
        p->next[b] = p->head;
        if (p->head >= 0)
            p->prev[p->head] = b;
        else
            p->tail = b;
        p->head = b;
    } else {
        p->next[b] = -1;
        p->prev[b] = p->tail;
        if (p->tail >= 0)
            p->next[p->tail] = b;
        else
            p->head = b;
        p->tail = b;
    }
    p->n_free++;
}

static void free_all(pd_kv_pool_t *p)
{
    if (p->dev) {
        if (p->pinned) {
            p->dev->unpin(p->dev, p->k);
            p->dev->unpin(p->dev, p->v);
        }
        p->dev->free(p->dev, p->dk);
        p->dev->free(p->dev, p->dv);
    }
    void *bufs[] = {p->k,    p->v,      p->ref,    p->prev,   p->next,  p->committed,
                    p->hash, p->parent, p->tokens, p->bucket, p->chain, p->has_parent};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    free(p);
}

static pd_dtype_t kv_dtype_of(const pd_model_t *model, pd_kv_type_t kt)
{
    return kt == PD_KV_F32   ? PD_DTYPE_F32
           : kt == PD_KV_F16 ? PD_DTYPE_F16
                             : pd_kv_auto_dtype(model);
}

size_t pd_kv_block_bytes(const pd_model_t *model, const pd_kv_pool_opts_t *opts)
{
    const pd_model_config_t *c = pd_model_config(model);
    size_t bs = opts && opts->block_size > 0 ? (size_t)opts->block_size : 16;
    size_t es =
        kv_dtype_of(model, opts ? opts->kv_type : PD_KV_AUTO) == PD_DTYPE_F16 ? 2 : 4;
    return 2 * (size_t)c->n_layers * bs * (size_t)c->n_kv_heads * (size_t)c->head_dim *
           es;
}

pd_status_t pd_kv_pool_new(const pd_model_t *model, const pd_kv_pool_opts_t *opts,
                           pd_kv_pool_t **pool_p)
{
    const pd_model_config_t *c = pd_model_config(model);
    pd_kv_type_t kt = opts ? opts->kv_type : PD_KV_AUTO;
    if (kt != PD_KV_AUTO && kt != PD_KV_F32 && kt != PD_KV_F16) {
        PD_LOG_ERROR("unknown kv cache type %d", (int)kt);
        return PD_ERR_INVALID;
    }
    pd_kv_pool_t *p = calloc(1, sizeof *p);
    if (!p)
        return PD_ERR_NOMEM;
    p->block_size = opts && opts->block_size > 0 ? opts->block_size : 16;
    p->n_layers = c->n_layers;
    p->row_elems = (int64_t)c->n_kv_heads * c->head_dim;
    p->dtype = kv_dtype_of(model, kt);
    p->es = p->dtype == PD_DTYPE_F16 ? 2 : 4;
    size_t block_bytes = pd_kv_block_bytes(model, opts);
    int64_t n = opts && opts->n_blocks > 0 ? opts->n_blocks
                : opts && opts->memory_bytes > 0
                    ? opts->memory_bytes / (int64_t)block_bytes
                    : 0;
    if (n < 1 || n > INT32_MAX / 2 || (int64_t)p->block_size * n > INT32_MAX) {
        PD_LOG_ERROR("kv cache budget of %lld bytes holds %lld blocks: one block of %d "
                     "positions needs %zu bytes (at most %d blocks)",
                     (long long)(opts ? opts->memory_bytes : 0), (long long)n,
                     p->block_size, block_bytes, INT32_MAX / 2);
        free(p);
        return PD_ERR_INVALID;
    }
    p->n_blocks = (int32_t)n;
    size_t nb = (size_t)n;
    p->layer_bytes = nb * block_bytes / 2 / (size_t)p->n_layers;
    size_t cache = p->layer_bytes * (size_t)p->n_layers;
    uint32_t buckets = 16;
    while (buckets < 2 * nb)
        buckets *= 2;
    p->bucket_mask = buckets - 1;
    if (opts && opts->device && opts->device->device) {
        p->dev = opts->device;
        p->host = opts->host;
        p->dk = p->dev->alloc(p->dev, cache);
        p->dv = p->dk ? p->dev->alloc(p->dev, cache) : NULL;
        if (!p->dk || !p->dv) {
            PD_LOG_ERROR("cannot allocate a kv cache of %d blocks (%zu bytes) in device "
                         "memory: lower --kv-memory",
                         p->n_blocks, 2 * cache);
            free_all(p);
            return PD_ERR_NOMEM;
        }
    }
    bool host = !p->dev || p->host != PD_KV_HOST_NONE;
    size_t host_bytes = host ? (cache + 4095) / 4096 * 4096 : 4096;
    p->k = aligned_alloc(4096, host_bytes);
    p->v = aligned_alloc(4096, host_bytes);
    if (p->dev && host && p->k && p->v && p->dev->pin) /* fast, asynchronous copies */
        p->pinned = p->dev->pin(p->dev, p->k, host_bytes) == PD_OK &&
                    (p->dev->pin(p->dev, p->v, host_bytes) == PD_OK ||
                     (p->dev->unpin(p->dev, p->k), false));
    p->ref = calloc(nb, sizeof *p->ref);
    p->prev = malloc(nb * sizeof *p->prev);
    p->next = malloc(nb * sizeof *p->next);
    p->committed = calloc(nb, 1);
    p->has_parent = calloc(nb, 1);
    p->hash = calloc(nb, sizeof *p->hash);
    p->parent = calloc(nb, sizeof *p->parent);
    p->tokens = calloc(nb * (size_t)p->block_size, sizeof *p->tokens);
    p->bucket = malloc(buckets * sizeof *p->bucket);
    p->chain = malloc(nb * sizeof *p->chain);
    if (!p->k || !p->v || !p->ref || !p->prev || !p->next || !p->committed ||
        !p->has_parent || !p->hash || !p->parent || !p->tokens || !p->bucket ||
        !p->chain) {
        PD_LOG_ERROR("cannot allocate a kv cache of %d blocks (%zu bytes)", p->n_blocks,
                     2 * cache);
        free_all(p);
        return PD_ERR_NOMEM;
    }
    p->head = p->tail = -1;
    for (int32_t b = 0; b < p->n_blocks; b++)
        list_push(p, b, false);
    for (uint32_t i = 0; i < buckets; i++)
        p->bucket[i] = -1;
    *pool_p = p;
    return PD_OK;
}

void pd_kv_pool_destroy(pd_kv_pool_t **pool_p)
{
    if (!pool_p || !*pool_p)
        return;
    free_all(*pool_p);
    *pool_p = NULL;
}

int32_t pd_kv_pool_n_blocks(const pd_kv_pool_t *p)
{
    return p->n_blocks;
}

int32_t pd_kv_pool_block_size(const pd_kv_pool_t *p)
{
    return p->block_size;
}

int32_t pd_kv_pool_n_free(const pd_kv_pool_t *p)
{
    return p->n_free;
}

pd_dtype_t pd_kv_pool_dtype(const pd_kv_pool_t *p)
{
    return p->dtype;
}

size_t pd_kv_pool_block_bytes(const pd_kv_pool_t *p)
{
    return 2 * (size_t)p->n_layers * (size_t)p->block_size * (size_t)p->row_elems * p->es;
}

void *pd_kv_pool_k(pd_kv_pool_t *p, int layer)
{
    if (p->dev && p->host == PD_KV_HOST_NONE)
        return NULL;
    return p->k + (size_t)layer * p->layer_bytes;
}

void *pd_kv_pool_v(pd_kv_pool_t *p, int layer)
{
    if (p->dev && p->host == PD_KV_HOST_NONE)
        return NULL;
    return p->v + (size_t)layer * p->layer_bytes;
}

void *pd_kv_pool_compute_k(pd_kv_pool_t *p, int layer)
{
    return (p->dev ? p->dk : p->k) + (size_t)layer * p->layer_bytes;
}

void *pd_kv_pool_compute_v(pd_kv_pool_t *p, int layer)
{
    return (p->dev ? p->dv : p->v) + (size_t)layer * p->layer_bytes;
}

pd_kernels_t *pd_kv_pool_device(const pd_kv_pool_t *p)
{
    return p->dev;
}

pd_kv_host_t pd_kv_pool_host(const pd_kv_pool_t *p)
{
    return p->dev ? p->host : PD_KV_HOST_NONE;
}

/* Moves runs of consecutive block ids at once: one copy per run, layer and K/V. */
static pd_status_t kv_sync(pd_kv_pool_t *p, int layer, const int32_t *ids, int32_t n,
                           bool down)
{
    if (!p->dev || n <= 0)
        return PD_OK;
    if (p->host == PD_KV_HOST_NONE) {
        PD_LOG_ERROR("kv pool: no host copy to %s", down ? "download to" : "upload from");
        return PD_ERR_INVALID;
    }
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= p->n_blocks) {
            PD_LOG_ERROR("kv pool: block %d outside the pool (%d blocks)", ids[i],
                         p->n_blocks);
            return PD_ERR_INVALID;
        }
    size_t bbytes = (size_t)p->block_size * (size_t)p->row_elems * p->es;
    int l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? p->n_layers : layer + 1;
    pd_status_t st = PD_OK;
    for (int32_t i = 0; i < n && st == PD_OK;) {
        int32_t j = i + 1;
        while (j < n && ids[j] == ids[j - 1] + 1)
            j++;
        size_t bytes = (size_t)(j - i) * bbytes;
        for (int l = l0; l < l1 && st == PD_OK; l++) {
            size_t off = (size_t)l * p->layer_bytes + (size_t)ids[i] * bbytes;
            for (int kv = 0; kv < 2 && st == PD_OK; kv++) {
                uint8_t *h = (kv ? p->v : p->k) + off, *d = (kv ? p->dv : p->dk) + off;
                st = down ? p->dev->dev_copy(p->dev, h, d, bytes)
                          : p->dev->dev_copy(p->dev, d, h, bytes);
            }
        }
        i = j;
    }
    if (st == PD_OK) /* the host copy is read (or rewritten) as soon as we return */
        st = p->dev->sync(p->dev);
    return st;
}

pd_status_t pd_kv_pool_download(pd_kv_pool_t *p, int layer, const int32_t *ids, int32_t n)
{
    return kv_sync(p, layer, ids, n, true);
}

pd_status_t pd_kv_pool_upload(pd_kv_pool_t *p, int layer, const int32_t *ids, int32_t n)
{
    return kv_sync(p, layer, ids, n, false);
}

int64_t pd_kv_pool_row_elems(const pd_kv_pool_t *p)
{
    return p->row_elems;
}

pd_kv_pool_stats_t pd_kv_pool_stats(const pd_kv_pool_t *p)
{
    return p->stats;
}

/* ---- prefix cache ------------------------------------------------------------------ */

static uint32_t bucket_of(const pd_kv_pool_t *p, pd_kv_hash_t h)
{
    return (uint32_t)h.lo & p->bucket_mask;
}

static void uncommit(pd_kv_pool_t *p, int32_t b)
{
    int32_t *link = &p->bucket[bucket_of(p, p->hash[b])];
    while (*link >= 0 && *link != b)
        link = &p->chain[*link];
    if (*link == b)
        *link = p->chain[b];
    p->committed[b] = 0;
}

static bool same_hash(pd_kv_hash_t a, pd_kv_hash_t b)
{
    return a.lo == b.lo && a.hi == b.hi;
}

static int32_t find(const pd_kv_pool_t *p, pd_kv_hash_t hash, const pd_kv_hash_t *parent,
                    const int32_t *tokens)
{
    for (int32_t b = p->bucket[bucket_of(p, hash)]; b >= 0; b = p->chain[b]) {
        if (!same_hash(p->hash[b], hash) || p->has_parent[b] != (parent != NULL))
            continue;
        if (parent && !same_hash(p->parent[b], *parent))
            continue;
        if (memcmp(p->tokens + (size_t)b * (size_t)p->block_size, tokens,
                   (size_t)p->block_size * sizeof *tokens) == 0)
            return b;
    }
    return -1;
}

pd_kv_hash_t pd_kv_hash_block(const pd_kv_pool_t *p, const pd_kv_hash_t *parent,
                              const int32_t *tokens)
{
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    XXH3_128bits_reset(&st);
    uint64_t pre[2] = {parent ? parent->lo : 0, parent ? parent->hi : 0};
    uint8_t tag = parent != NULL;
    XXH3_128bits_update(&st, &tag, 1);
    XXH3_128bits_update(&st, pre, sizeof pre);
    XXH3_128bits_update(&st, tokens, (size_t)p->block_size * sizeof *tokens);
    XXH128_hash_t h = XXH3_128bits_digest(&st);
    return (pd_kv_hash_t){h.low64, h.high64};
}

int32_t pd_kv_pool_lookup(pd_kv_pool_t *p, pd_kv_hash_t hash, const pd_kv_hash_t *parent,
                          const int32_t *tokens)
{
    p->stats.lookups++;
    int32_t b = find(p, hash, parent, tokens);
    if (b < 0)
        return -1;
    p->stats.hits++;
    if (p->ref[b] == 0)
        list_unlink(p, b);
    p->ref[b]++;
    return b;
}

void pd_kv_pool_commit(pd_kv_pool_t *p, int32_t id, pd_kv_hash_t hash,
                       const pd_kv_hash_t *parent, const int32_t *tokens)
{
    if (id < 0 || id >= p->n_blocks || p->ref[id] < 1) {
        PD_LOG_ERROR("kv pool: commit of block %d, which is not held", id);
        return;
    }
    if (p->committed[id] || find(p, hash, parent, tokens) >= 0)
        return;
    p->committed[id] = 1;
    p->hash[id] = hash;
    p->has_parent[id] = parent != NULL;
    p->parent[id] = parent ? *parent : (pd_kv_hash_t){0, 0};
    memcpy(p->tokens + (size_t)id * (size_t)p->block_size, tokens,
           (size_t)p->block_size * sizeof *tokens);
    uint32_t bk = bucket_of(p, hash);
    p->chain[id] = p->bucket[bk];
    p->bucket[bk] = id;
}

void pd_kv_pool_clear_cache(pd_kv_pool_t *p)
{
    for (int32_t b = 0; b < p->n_blocks; b++)
        if (p->committed[b] && p->ref[b] == 0)
            uncommit(p, b);
}

/* ---- allocation -------------------------------------------------------------------- */

pd_status_t pd_kv_pool_alloc(pd_kv_pool_t *p, int32_t n, int32_t *out)
{
    if (n < 0 || n > p->n_free)
        return PD_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) {
        int32_t b = p->head;
        list_unlink(p, b);
        if (p->committed[b]) {
            uncommit(p, b);
            p->stats.evictions++;
        }
        p->ref[b] = 1;
        out[i] = b;
    }
    return PD_OK;
}

void pd_kv_pool_retain(pd_kv_pool_t *p, int32_t id)
{
    if (id < 0 || id >= p->n_blocks || p->ref[id] < 1) {
        PD_LOG_ERROR("kv pool: retain of block %d, which is not held", id);
        return;
    }
    p->ref[id]++;
}

void pd_kv_pool_release(pd_kv_pool_t *p, const int32_t *ids, int32_t n)
{
    /* from the tail: committed blocks queue tail first, so heads are evicted last */
    for (int32_t i = n - 1; i >= 0; i--) {
        int32_t b = ids[i];
        if (b < 0 || b >= p->n_blocks || p->ref[b] < 1) {
            PD_LOG_ERROR("kv pool: release of block %d, which is not held", b);
            continue;
        }
        if (--p->ref[b] == 0)
            list_push(p, b, !p->committed[b]);
    }
}

size_t pd_kv_pool_row_bytes(const pd_kv_pool_t *p)
{
    return (size_t)p->row_elems * p->es;
}

size_t pd_kv_pool_layer_bytes(const pd_kv_pool_t *p)
{
    return p->layer_bytes;
}

int32_t pd_kv_pool_n_layers(const pd_kv_pool_t *p)
{
    return p->n_layers;
}

uint64_t pd_kv_checksum_sum64(const pd_kv_pool_t *p, const int32_t *blocks,
                              int32_t n_tokens)
{
    if (p->dev && p->host == PD_KV_HOST_NONE) {
        PD_LOG_ERROR("kv checksum of a device pool without a host copy");
        return 0;
    }
    size_t row = pd_kv_pool_row_bytes(p), words = row / 4;
    uint64_t sum = 0, i = 0; /* i: the word's index in the covered sequence */
    for (int32_t l = 0; l < p->n_layers; l++) {
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *base = (kv ? p->v : p->k) + (size_t)l * p->layer_bytes;
            for (int32_t pos = 0; pos < n_tokens; pos++) {
                const uint8_t *r =
                    base + ((size_t)blocks[pos / p->block_size] * (size_t)p->block_size +
                            (size_t)(pos % p->block_size)) *
                               row;
                for (size_t j = 0; j < words; j++, i++) {
                    uint32_t w;
                    memcpy(&w, r + 4 * j, 4);
                    sum += pd_sum64_mix(w, i);
                }
            }
        }
    }
    return sum;
}

uint64_t pd_kv_checksum(const pd_kv_pool_t *p, const int32_t *blocks, int32_t n_tokens)
{
    if (p->dev && p->host == PD_KV_HOST_NONE) {
        PD_LOG_ERROR("kv checksum of a device pool without a host copy");
        return 0;
    }
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    size_t row = pd_kv_pool_row_bytes(p), bbytes = row * (size_t)p->block_size;
    for (int32_t l = 0; l < p->n_layers; l++) {
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *base = (kv ? p->v : p->k) + (size_t)l * p->layer_bytes;
            for (int32_t pos = 0; pos < n_tokens; pos += p->block_size) {
                int32_t n =
                    n_tokens - pos < p->block_size ? n_tokens - pos : p->block_size;
                int32_t b = blocks[pos / p->block_size];
                XXH3_64bits_update(&st, base + (size_t)b * bbytes, (size_t)n * row);
            }
        }
    }
    return XXH3_64bits_digest(&st);
}
