/* llm.h - the forward pass: a varlen batch of T tokens from any number of sequences
 * through a Llama model, writing their K/V into a paged KV pool and returning logits
 * only for the rows asked for.
 *
 * One call runs prompt chunks, single decode tokens (and later speculative tokens)
 * mixed: every token is tagged with its sequence (a row of the block tables) and its
 * position; the matrix products run once over all T rows, attention reads each
 * sequence's blocks in place (kernels/ops.h). Because every kernel is batch invariant,
 * a token's logits are the same bits whatever else shares its batch.
 * For one sequence alone (pd_generate, tests) the llm can own a private pool holding
 * max_ctx positions in blocks 0..n-1 (pd_llm_forward); the batching engine instead
 * passes its shared pool and block tables (pd_llm_forward_batch).
 * Every buffer is sized at creation for max_batch_tokens rows, so a forward pass
 * allocates nothing.
 * CUDA graphs (opts.cuda_graphs, a device backend that can record): a pass whose shape
 * repeats is recorded once and then launched as one graph (pd_llm_forward_batch has
 * the rules); the results are the same bits either way.
 * Ownership: the llm borrows the model and the kernels (both must outlive it) and owns
 * its activations, logits and private pool. Threading: one thread drives an llm; the
 * kernels fan out over their own pool. */
#ifndef PD_LLM_H
#define PD_LLM_H

#include <stdbool.h>
#include <stdint.h>

#include "common/kvpool.h"
#include "common/model.h"
#include "common/status.h"
#include "kernels/ops.h"

typedef struct pd_llm pd_llm_t;

typedef struct pd_llm_opts {
    int32_t max_ctx;          /* positions of one sequence; <= 0: the model's ctx_len */
    int32_t max_batch_tokens; /* largest T of one forward pass; <= 0: 512 */
    int32_t max_logits;       /* most logit rows one pass returns; <= 0: 1 */
    /* The private pool (pd_llm_forward): */
    bool no_private_kv; /* true: none (only pd_llm_forward_batch is used) */
    int32_t block_size; /* KV positions per block; <= 0: 16 */
    pd_kv_type_t kv_type;
    /* Record passes as CUDA graphs and replay them when their shape repeats (a device
     * backend with kernels/ops.h's graph members; ignored otherwise). Off by default. */
    bool cuda_graphs;
} pd_llm_opts_t;

/* A varlen batch. Token t (id ids[t]) sits at position pos[t] of sequence seq[t],
 * whose block table is row seq[t] of block_tables ([n_seqs][bt_stride]); the blocks
 * for positions up to pos[t] must be in the table, and every position below pos[t]
 * must be in the cache already or come earlier in this batch. Logits are returned for
 * rows out_rows[0..n_out) (indices into the batch), in that order. */
typedef struct pd_llm_batch {
    int64_t T;
    const int32_t *ids, *pos, *seq;
    int64_t n_seqs, bt_stride;
    const int32_t *block_tables;
    const int32_t *out_rows;
    int64_t n_out;
} pd_llm_batch_t;

pd_status_t pd_llm_new(const pd_model_t *model, pd_kernels_t *kernels,
                       const pd_llm_opts_t *opts, pd_llm_t **llm_p);
void pd_llm_destroy(pd_llm_t **llm_p);

int32_t pd_llm_max_ctx(const pd_llm_t *llm);
int32_t pd_llm_max_batch_tokens(const pd_llm_t *llm);
/* The private pool's dtype (or the kv_type it would have). */
pd_dtype_t pd_llm_kv_dtype(const pd_llm_t *llm);
/* The private pool; NULL with no_private_kv. */
pd_kv_pool_t *pd_llm_private_kv(pd_llm_t *llm);

/* Runs a varlen batch over pool (whose model must be the llm's). Logits as
 * [n_out][vocab] in *logits_p, valid until the next call. PD_ERR_RANGE for T outside
 * [1, max_batch_tokens], n_out > max_logits, a position outside max_ctx or the block
 * tables, a bad sequence index or block id, or a token id outside the vocabulary;
 * nothing is written to the cache then.
 * With cuda_graphs, a pass is recorded only when nothing in it is planned on the host
 * for that very batch: no layer hook, a pool that is not PD_KV_HOST_MIRROR, T <= 512,
 * and no prompt run for the attention's prefill kernel (ops.h graph_attn_key: decode
 * tokens, speculative rows and short prompt tails qualify). Its key: T, n_out, n_seqs,
 * bt_stride, the ids path or not, the pool (and its cache addresses), the staging
 * buffer, attention's key (the decode split count) and the backend's generation. The
 * first pass of a key runs op by op (it sizes the backend's scratch), the second is
 * recorded and launched, later ones are launched (at most 32 graphs, least recently
 * used dropped first). A failed recording or launch runs the pass op by op. */
pd_status_t pd_llm_forward_batch(pd_llm_t *llm, pd_kv_pool_t *pool,
                                 const pd_llm_batch_t *batch, const float **logits_p);
/* As pd_llm_forward_batch, but returns only the argmax of each logit row in
 * ids[0..n_out) (the lowest index among equal maxima, as pd_argmax): greedy steps. On a
 * device the argmax runs there and the logits never cross to the host. */
pd_status_t pd_llm_forward_batch_ids(pd_llm_t *llm, pd_kv_pool_t *pool,
                                     const pd_llm_batch_t *batch, int32_t *ids);

/* What the graph cache did so far (pd_llm_forward_batch); all zero without graphs
 * except eager. */
typedef struct pd_llm_graph_stats {
    int64_t captures;  /* passes recorded, then launched from their graph */
    int64_t replays;   /* passes launched from a graph recorded earlier */
    int64_t fallbacks; /* recordings or launches that failed: run op by op */
    int64_t eager;     /* passes run op by op: not eligible, or the first of a key */
    int64_t dropped;   /* graphs evicted (least recently used) or gone stale */
    int32_t cached;    /* graphs held now */
} pd_llm_graph_stats_t;
void pd_llm_graph_stats(const pd_llm_t *llm, pd_llm_graph_stats_t *stats_p);

/* Called by pd_llm_forward_batch after layer `layer` of the batch is done: its K/V
 * rows for every token of the batch are in the pool from then on (the KV transfer
 * streams them while later layers compute). NULL fn: none. */
typedef void (*pd_llm_layer_fn)(void *user, int layer);
void pd_llm_set_layer_hook(pd_llm_t *llm, pd_llm_layer_fn fn, void *user);

/* One sequence in the private pool: ids[0..T) at positions pos[0..T) (each <
 * max_ctx; every position below pos[t] must already be in the cache or in this batch
 * before t), logits of rows out_rows[0..n_out) as pd_llm_forward_batch gives them.
 * PD_ERR_INVALID without a private pool. */
pd_status_t pd_llm_forward(pd_llm_t *llm, const int32_t *ids, const int32_t *pos,
                           int64_t T, const int32_t *out_rows, int64_t n_out,
                           const float **logits_p);

#endif
