/* kvpool.h - the paged KV cache: a pool of fixed-size blocks shared by every sequence,
 * with reference counts and a content-addressed prefix cache.
 *
 * Layout: K and V are each [n_layers][n_blocks][block_size][n_kv_heads][head_dim] of
 * F32 or F16; a sequence's positions live in the blocks its block table names, so
 * sequences grow one block at a time and never need contiguous room.
 * Prefix caching (the vLLM scheme): a full block of a sequence can be committed under a
 * hash chained over its tokens and its parent block's hash, so the hash names the
 * whole prefix up to the block's end. A new sequence walks its prompt block by block
 * and takes every committed block it finds (pd_kv_pool_lookup), sharing it (its
 * reference count goes up). A block whose count falls to zero goes to the free list:
 * plain blocks to its front (reused first), committed ones to its back, still findable
 * until an allocation takes them (least recently freed first, i.e. LRU eviction).
 * Hashes are 128-bit XXH3 (libxxhash), and a hit also compares the block's tokens and
 * its parent's hash, so a collision can never return another prefix's KV.
 * Ownership: the pool owns its storage; everything is allocated at creation, so no
 * operation allocates. Threading: one thread (the engine's). */
#ifndef PD_KVPOOL_H
#define PD_KVPOOL_H

#include <stdbool.h>
#include <stdint.h>

#include "common/model.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/ops.h"

/* The KV cache element type; AUTO (the zero value) as pd_kv_auto_dtype() says. */
typedef enum pd_kv_type {
    PD_KV_AUTO = 0,
    PD_KV_F32 = 1,
    PD_KV_F16 = 2,
} pd_kv_type_t;

/* The KV cache dtype "auto" picks: F32 for a model whose matrices are F32 (exact
 * greedy output against an F32 reference), F16 otherwise (the model is already
 * approximate; F16 halves the cache traffic of every decode step), as vLLM's "auto"
 * follows the model dtype. */
pd_dtype_t pd_kv_auto_dtype(const pd_model_t *model);

/* A chained block hash (XXH3-128). */
typedef struct pd_kv_hash {
    uint64_t lo, hi;
} pd_kv_hash_t;

/* Where a pool on a device backend keeps a host copy of its blocks. */
typedef enum pd_kv_host {
    PD_KV_HOST_NONE = 0, /* device memory only (pd_kv_pool_k/v return NULL) */
    PD_KV_HOST_STAGING,  /* a host copy, synced when asked: KV arriving over the network
                            lands there and pd_kv_pool_upload moves it to the device */
    PD_KV_HOST_MIRROR,   /* ... and every forward pass copies each layer's new rows to
                            it (pd_llm_forward_batch): the KV a prefill worker serves */
} pd_kv_host_t;

typedef struct pd_kv_pool_opts {
    int32_t block_size;   /* positions per block; <= 0: 16 */
    int64_t memory_bytes; /* K and V of all layers; used when n_blocks <= 0 */
    int32_t n_blocks;     /* > 0: exactly this many blocks */
    pd_kv_type_t kv_type;
    /* A device backend (device->device true; borrowed, outliving the pool): the blocks
     * live in its memory, with the host copy `host` says. NULL or a CPU backend: host
     * memory only (and `host` is ignored). */
    pd_kernels_t *device;
    pd_kv_host_t host;
} pd_kv_pool_opts_t;

typedef struct pd_kv_pool_stats {
    int64_t lookups;   /* blocks looked up */
    int64_t hits;      /* ... and found */
    int64_t evictions; /* committed blocks reused for other content */
} pd_kv_pool_stats_t;

typedef struct pd_kv_pool pd_kv_pool_t;

/* Bytes of K plus V of one block over all layers for this model and these options
 * (block_size and kv_type), what a pool would take per block. */
size_t pd_kv_block_bytes(const pd_model_t *model, const pd_kv_pool_opts_t *opts);

/* PD_ERR_INVALID for a budget below one block (with the size one block needs) or a
 * bad kv_type; PD_ERR_NOMEM when the storage cannot be had. */
pd_status_t pd_kv_pool_new(const pd_model_t *model, const pd_kv_pool_opts_t *opts,
                           pd_kv_pool_t **pool_p);
void pd_kv_pool_destroy(pd_kv_pool_t **pool_p);

int32_t pd_kv_pool_n_blocks(const pd_kv_pool_t *p);
int32_t pd_kv_pool_block_size(const pd_kv_pool_t *p);
/* Blocks an allocation can take now: unreferenced ones, committed or not. */
int32_t pd_kv_pool_n_free(const pd_kv_pool_t *p);
pd_dtype_t pd_kv_pool_dtype(const pd_kv_pool_t *p);
/* Bytes of K plus V of one block over all layers. */
size_t pd_kv_pool_block_bytes(const pd_kv_pool_t *p);
/* K or V storage of one layer (blocks as above) in host memory: the storage itself,
 * or on a device the host copy (NULL without one). */
void *pd_kv_pool_k(pd_kv_pool_t *p, int layer);
void *pd_kv_pool_v(pd_kv_pool_t *p, int layer);
/* The storage the forward pass uses: device memory on a device pool, else as
 * pd_kv_pool_k/v. */
void *pd_kv_pool_compute_k(pd_kv_pool_t *p, int layer);
void *pd_kv_pool_compute_v(pd_kv_pool_t *p, int layer);
/* The device backend (NULL for a host pool) and the host copy kept beside it. */
pd_kernels_t *pd_kv_pool_device(const pd_kv_pool_t *p);
pd_kv_host_t pd_kv_pool_host(const pd_kv_pool_t *p);
/* Copies blocks ids[0..n) of one layer (layer < 0: every layer), K and V, from the
 * device to the host copy (download) or from the host copy to the device (upload);
 * done when it returns. PD_OK doing nothing on a host
 * pool; PD_ERR_INVALID without a host copy or for a bad block id; PD_ERR_IO when the
 * device fails. */
pd_status_t pd_kv_pool_download(pd_kv_pool_t *p, int layer, const int32_t *ids,
                                int32_t n);
pd_status_t pd_kv_pool_upload(pd_kv_pool_t *p, int layer, const int32_t *ids, int32_t n);
int64_t pd_kv_pool_row_elems(const pd_kv_pool_t *p); /* n_kv_heads * head_dim */
pd_kv_pool_stats_t pd_kv_pool_stats(const pd_kv_pool_t *p);

/* Takes n blocks (reference count 1 each) into out[0..n), evicting committed ones
 * from the prefix cache as needed; all or nothing: PD_ERR_NOMEM (nothing taken, no
 * log: the scheduler's normal signal) when fewer than n are free. */
pd_status_t pd_kv_pool_alloc(pd_kv_pool_t *p, int32_t n, int32_t *out);
/* Drops one reference of each of ids[0..n). Blocks that fall free are reused plain ones
 * first, then committed ones in the order they fell free; a sequence's committed
 * blocks queue tail first (ids[n-1] before ids[0]), so its shared head is evicted
 * last. */
void pd_kv_pool_release(pd_kv_pool_t *p, const int32_t *ids, int32_t n);
/* Adds a reference to a block already held. */
void pd_kv_pool_retain(pd_kv_pool_t *p, int32_t id);

/* The hash of a block of block_size tokens whose parent block has hash *parent (NULL
 * for the first block of a sequence). */
pd_kv_hash_t pd_kv_hash_block(const pd_kv_pool_t *p, const pd_kv_hash_t *parent,
                              const int32_t *tokens);
/* The committed block with this hash, parent and tokens, with a reference added; -1
 * when there is none. */
int32_t pd_kv_pool_lookup(pd_kv_pool_t *p, pd_kv_hash_t hash, const pd_kv_hash_t *parent,
                          const int32_t *tokens);
/* Commits held block id (full, its KV computed) under hash. If another block already
 * holds that content, id stays uncommitted (the first copy serves later lookups). */
void pd_kv_pool_commit(pd_kv_pool_t *p, int32_t id, pd_kv_hash_t hash,
                       const pd_kv_hash_t *parent, const int32_t *tokens);
/* Forgets every committed block that nobody references (tests, a model swap). */
void pd_kv_pool_clear_cache(pd_kv_pool_t *p);

/* The KV transfer checksum: XXH3-64 over, for each layer in order, the K rows then
 * the V rows of positions [0, n_tokens) of the sequence whose block table is blocks
 * (ceil(n_tokens / block_size) ids), in position order. Both ends of a transfer
 * compute it from their own blocks. */
uint64_t pd_kv_checksum(const pd_kv_pool_t *p, const int32_t *blocks, int32_t n_tokens);
/* The device transports' checksum: PD-SUM64 (kernels/sum64.h) over the words
 * pd_kv_checksum covers, in its order (word j of position p of layer l, K then V, is
 * word ((l * 2 + kv) * n_tokens + p) * row_words + j). Reads the host storage or host
 * copy; pd_devxfer_kv_sum64 computes the same on the device, where a device transport
 * leaves the rows. Rows are whole 32-bit words for every supported dtype. */
uint64_t pd_kv_checksum_sum64(const pd_kv_pool_t *p, const int32_t *blocks,
                              int32_t n_tokens);
/* Bytes of one position's row (n_kv_heads * head_dim elements) and one layer's K (or
 * V) region of the pool: block b of layer l starts at l * layer_bytes + b *
 * block_bytes_per_layer from pd_kv_pool_k/v(p, 0). */
size_t pd_kv_pool_row_bytes(const pd_kv_pool_t *p);
size_t pd_kv_pool_layer_bytes(const pd_kv_pool_t *p);
int32_t pd_kv_pool_n_layers(const pd_kv_pool_t *p);

#endif
