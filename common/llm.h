/* llm.h - the forward pass: T tokens of one sequence through a Llama model, writing
 * their K/V into a paged KV cache and returning logits only for the rows asked for.
 *
 * A prompt runs as one pass of T tokens (matrix-matrix work); a decode step is T = 1.
 * The KV cache is already paged (blocks of block_size positions per layer, read
 * through a block table), so the batching engine can hand it a pool and per-sequence
 * tables without changing the kernels; here one sequence owns blocks 0..n-1 in order.
 * Every buffer is sized at creation for max_batch_tokens rows, so a forward pass
 * allocates nothing.
 * Ownership: the llm borrows the model and the kernels (both must outlive it) and owns
 * its activations, KV cache and logits. Threading: one thread drives an llm; the
 * kernels fan out over their own pool. */
#ifndef PD_LLM_H
#define PD_LLM_H

#include <stdint.h>

#include "common/model.h"
#include "common/status.h"
#include "kernels/ops.h"

typedef struct pd_llm pd_llm_t;

/* The KV cache element type; AUTO (the zero value) as pd_llm_auto_kv_dtype() says. */
typedef enum pd_kv_type {
    PD_KV_AUTO = 0,
    PD_KV_F32 = 1,
    PD_KV_F16 = 2,
} pd_kv_type_t;

typedef struct pd_llm_opts {
    int32_t max_ctx; /* positions the KV cache holds; <= 0: the model's ctx_len */
    int32_t max_batch_tokens; /* largest T of one forward pass; <= 0: 512 */
    int32_t max_logits;       /* most logit rows one pass returns; <= 0: 1 */
    int32_t block_size;       /* KV positions per block; <= 0: 16 */
    pd_kv_type_t kv_type;
} pd_llm_opts_t;

/* The KV cache dtype "auto" picks: F32 for a model whose matrices are F32 (exact
 * greedy output against an F32 reference), F16 otherwise (the model is already
 * approximate; F16 halves the cache traffic of every decode step), as vLLM's "auto"
 * follows the model dtype. */
pd_dtype_t pd_llm_auto_kv_dtype(const pd_model_t *model);

pd_status_t pd_llm_new(const pd_model_t *model, pd_kernels_t *kernels,
                       const pd_llm_opts_t *opts, pd_llm_t **llm_p);
void pd_llm_destroy(pd_llm_t **llm_p);

int32_t pd_llm_max_ctx(const pd_llm_t *llm);
int32_t pd_llm_max_batch_tokens(const pd_llm_t *llm);
pd_dtype_t pd_llm_kv_dtype(const pd_llm_t *llm);

/* Runs ids[0..T) at positions pos[0..T) (each < max_ctx; every position below
 * pos[t] must already be in the cache or in this batch before t). Logits of the rows
 * out_rows[0..n_out) (indices into the batch) are written to *logits_p as
 * [n_out][vocab], valid until the next call. PD_ERR_RANGE for T outside
 * [1, max_batch_tokens], n_out > max_logits, a position outside the cache or a token
 * id outside the vocabulary; nothing is written to the cache then. */
pd_status_t pd_llm_forward(pd_llm_t *llm, const int32_t *ids, const int32_t *pos,
                           int64_t T, const int32_t *out_rows, int64_t n_out,
                           const float **logits_p);

#endif
