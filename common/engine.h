/* engine.h - the batching engine: continuous (iteration-level) batching of many
 * requests over one llm and one paged KV pool, with chunked prefill, preemption by
 * recomputation and prefix caching. Both worker kinds run it.
 *
 * A step (pd_engine_step) schedules, runs ONE varlen forward pass and samples:
 *   1. running requests first, in arrival order: a decoding request gets its one
 *      token, a request still prefilling gets the next chunk of its prompt that fits
 *      the token budget (max_batch_tokens), so a long prompt never stalls decodes;
 *   2. when the pool has no block for a running request, the newest running request
 *      is preempted: its blocks are released and it goes back to the front of the
 *      queue, to be recomputed later from its prompt and the tokens it already
 *      produced (its sampler state is kept, and every kernel is batch invariant, so
 *      its output is exactly what it would have been);
 *   3. then waiting requests, oldest first, while fewer than max_num_seqs run and
 *      budget and blocks remain; a request starting takes the longest run of its
 *      full blocks found in the prefix cache and computes only the rest.
 * Full blocks are committed to the prefix cache as soon as their KV is computed.
 * A request finishes on EOS (or BOS, as pd_generate) unless ignore_eos, on one of
 * its stop ids, at max_tokens, or when its sequence reaches the longest one the
 * engine allows (min(max_ctx, every block of the pool)); a cancelled request finishes
 * at once and its blocks are released then.
 * Callbacks: on_token for every generated token, then on_finish exactly once per
 * accepted request (also for cancellation and errors). They run on the thread calling
 * pd_engine_step (or pd_engine_cancel) and may call pd_engine_add and
 * pd_engine_cancel, never pd_engine_step or pd_engine_destroy.
 * Ownership: the engine borrows the model and kernels, owns the llm, pool, requests
 * (prompt copied at add) and samplers. Memory is allocated when a request is added
 * and at creation, never in a step. Threading: one thread. */
#ifndef PD_ENGINE_H
#define PD_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/generate.h"
#include "common/kvpool.h"
#include "common/llm.h"
#include "common/sampler.h"

typedef struct pd_engine pd_engine_t;

/* One sequence of the forward pass in progress, as the layer hook sees it: after layer
 * `layer`, that layer's K/V of positions [0, pos_end) are in blocks[0..n_blocks) of the
 * pool (valid during the call). */
typedef struct pd_engine_progress {
    uint64_t id;
    void *user; /* the request's */
    int32_t pos_end, n_prompt;
    const int32_t *blocks;
    int32_t n_blocks;
} pd_engine_progress_t;

typedef struct pd_engine_opts {
    int32_t max_num_seqs;     /* sequences in flight; <= 0: 64 */
    int32_t max_batch_tokens; /* tokens per step (the budget); <= 0: 512 */
    int32_t max_ctx;          /* positions of one sequence; <= 0: the model's */
    /* KV pool: n_blocks > 0 wins, else kv_memory bytes, else (0) room for max_num_seqs
     * full contexts, capped at 1 GiB. */
    int64_t kv_memory;
    int32_t kv_blocks;
    int32_t block_size; /* <= 0: 16 */
    pd_kv_type_t kv_type;
    /* On a device backend: the host copy of the KV pool (kvpool.h): NONE alone,
     * STAGING on a decode worker (transfers land there), MIRROR on a prefill worker
     * (transfers are served from there). */
    pd_kv_host_t kv_host;
    bool no_prefix_cache;
    /* Replay repeated decode passes as CUDA graphs (pd_llm_opts_t.cuda_graphs), for
     * the model's llm and the draft model's; ignored on the CPU backend. Off by
     * default. */
    bool cuda_graphs;
    /* Host threads that draw the sampled tokens of a step, the engine thread among
     * them: each request's draws run on one thread, in the order the serial loop makes
     * them, so the tokens and random states are the same for every count. <= 0: the
     * backend's host threads (the CPU backend's kernel pool), or min(online CPUs, 8)
     * of the engine's own on a device backend; 1: the engine thread alone; N > 1: a
     * pool of N of the engine's own. A step draws in parallel only when it has two or
     * more requests to draw for and enough vocabulary rows to pay for it. */
    int32_t sample_threads;
    /* The tokenizer's EOS and BOS ids (pd_tokenizer_eos/bos), which end a request
     * unless it ignores EOS; negative: none. */
    int32_t eos, bos;
    /* Speculative decoding: up to spec_k proposed tokens per
     * decoding sequence and step, verified in the same forward pass; 0: off. The
     * proposer: n-gram prompt lookup (the continuation of the latest earlier match of
     * the last n tokens, n from spec_ngram_max down to spec_ngram_min). */
    int32_t spec_k;
    int32_t spec_ngram_min, spec_ngram_max; /* <= 0: 1 and 4 */
    /* A draft model (borrowed; same vocabulary as the model, else pd_engine_new
     * refuses it): proposals are its greedy continuation, computed in batched passes
     * over its own paged KV cache, instead of n-gram lookup. */
    const pd_model_t *draft_model;
    /* Adaptive k (on unless spec_fixed_k): each step a sequence proposes the k in
     * [0, spec_k] that maximises its expected emitted tokens (from its acceptance so
     * far, geometric model) less k times the cost of a proposed token in target steps:
     * a draft pass (measured: the draft's pass time over the target's step time) plus
     * a verified row, which grows with the batch (spec_row_cost * B / (1 +
     * spec_row_cost * B), B running sequences; <= 0: 0.1, a CPU's; a GPU's is far
     * lower); at k = 0 it re-probes with k = 1 every 32 steps while a proposal that
     * is sure to be accepted would still pay. */
    bool spec_fixed_k;
    float spec_row_cost;
    /* Called after each layer of each forward pass (a prefill worker streams the KV of
     * finished layers while later ones compute); see pd_engine_layer_fn. */
    struct pd_engine_layer_hook {
        void (*fn)(void *user, int32_t layer, const struct pd_engine_progress *seqs,
                   int32_t n_seqs);
        void *user;
    } on_layer;
} pd_engine_opts_t;

typedef enum pd_engine_finish {
    PD_ENGINE_FINISH_STOP = PD_FINISH_STOP,     /* EOS, BOS or a stop id */
    PD_ENGINE_FINISH_LENGTH = PD_FINISH_LENGTH, /* max_tokens or the context */
    PD_ENGINE_FINISH_CANCELLED,
    PD_ENGINE_FINISH_ERROR,
} pd_engine_finish_t;

const char *pd_engine_finish_str(pd_engine_finish_t f);

/* What on_finish sees; pointers valid during the callback only. */
typedef struct pd_engine_result {
    uint64_t id;
    pd_engine_finish_t finish;
    pd_status_t status; /* PD_OK unless finish is ERROR */
    const int32_t *ids; /* the generated tokens */
    int32_t n_gen, n_prompt;
    int32_t cached_tokens; /* prompt tokens served by the prefix cache (first start) */
    int32_t preemptions;
    int64_t spec_proposed, spec_accepted;      /* speculative tokens proposed, accepted */
    double arrival_s, first_token_s, finish_s; /* engine clock, seconds */
    /* A prefill_only request that finished with its first token: the blocks holding
     * its prompt's KV (ceil(n_prompt / block_size)), one reference each now owned by
     * the callee, which must pd_kv_pool_release them. NULL otherwise. */
    const int32_t *kv_blocks;
    int32_t n_kv_blocks;
    uint64_t rng_state[4]; /* the sampler's state at the finish */
} pd_engine_result_t;

typedef void (*pd_engine_token_fn)(void *user, uint64_t id, int32_t token);
typedef void (*pd_engine_finish_fn)(void *user, const pd_engine_result_t *r);

typedef struct pd_engine_request {
    const int32_t *prompt; /* copied */
    int32_t n_prompt;
    int32_t max_tokens; /* <= 0: until the context is full */
    bool ignore_eos;
    const int32_t *stop_ids; /* copied; finish (stop) after emitting one */
    int32_t n_stop;
    pd_sampler_params_t sampling;
    pd_engine_token_fn on_token; /* may be NULL */
    pd_engine_finish_fn on_finish;
    void *user;
    /* The sampler's random state to start from (4 words; NULL: from sampling.seed). */
    const uint64_t *rng_state;
    /* Speculation for this request: 0 the engine's spec_k, < 0 off, else at most this
     * (and the engine's). Sampled requests verify by rejection sampling: their
     * output is distributed as without speculation, though not the same draws. */
    int32_t spec_k;
    /* Prefill only (a prefill worker): compute the prompt, sample the first token and
     * finish (LENGTH) keeping the prompt's blocks for the caller (result.kv_blocks). */
    bool prefill_only;
    /* Prefilled (a decode worker): kv_blocks (ceil(n_prompt / block_size) ids of this
     * engine's pool) already hold the KV of positions [0, n_prompt), and first_token
     * is the first generated token (already delivered by the caller: no on_token for
     * it; it counts toward max_tokens and may finish the request at the next step).
     * On PD_OK the engine owns one reference to each block; on error the caller keeps
     * them. Full prompt blocks are committed to the prefix cache. */
    const int32_t *kv_blocks;
    int32_t first_token;
} pd_engine_request_t;

typedef struct pd_engine_stats {
    int64_t steps;
    int64_t prompt_tokens; /* computed in forward passes (recomputation included) */
    int64_t cached_tokens; /* prompt tokens taken from the prefix cache */
    int64_t query_tokens;  /* prompt tokens of starting requests (the hit rate's base) */
    int64_t gen_tokens;
    int64_t preemptions;
    int64_t max_batch_seqs; /* most sequences in one step */
    int64_t seqs_in_steps;  /* sum over steps of sequences in the step */
    int64_t hist[8]; /* steps by sequences in them: 1, 2-3, 4-7, ..., 64-127, 128+ */
    int64_t spec_proposed, spec_accepted, spec_steps; /* spec_steps: verifications */
    double spec_draft_s; /* time in the draft model's passes */
    int64_t spec_draft_passes;
    double spec_draft_step_s; /* ... in its one-token-per-sequence passes */
    int64_t spec_draft_steps;
    double forward_s, sample_s;
    int64_t sample_parallel_steps; /* steps whose draws ran on several host threads */
} pd_engine_stats_t;

pd_status_t pd_engine_new(const pd_model_t *model, pd_kernels_t *kernels,
                          const pd_engine_opts_t *opts, pd_engine_t **engine_p);
/* Finishes nothing: requests still in flight are dropped without callbacks. */
void pd_engine_destroy(pd_engine_t **engine_p);

/* Queues a request. A bad request (empty prompt, a token outside the vocabulary, a
 * prompt with no room for one generated token within the longest sequence, bad
 * sampling parameters) is refused here with a logged reason: PD_ERR_RANGE or
 * PD_ERR_INVALID, and no callback. *id_p gets the request's id. */
pd_status_t pd_engine_add(pd_engine_t *e, const pd_engine_request_t *req, uint64_t *id_p);
/* Finishes request id as cancelled (on_finish runs now, or at the end of the step
 * when called from a callback) and releases its blocks. PD_ERR_NOT_FOUND if it is
 * not in flight. */
pd_status_t pd_engine_cancel(pd_engine_t *e, uint64_t id);

/* One iteration; *n_seqs_p (may be NULL) gets the sequences it ran (0: nothing to
 * do). An error of the forward pass finishes the requests in that batch with it. */
pd_status_t pd_engine_step(pd_engine_t *e, int32_t *n_seqs_p);
/* Requests waiting or running. */
int32_t pd_engine_n_pending(const pd_engine_t *e);
int32_t pd_engine_n_running(const pd_engine_t *e);

/* The sampler state of request id after its latest token (from on_token: the state
 * after that token). PD_ERR_NOT_FOUND if it is not in flight. */
pd_status_t pd_engine_rng_state(const pd_engine_t *e, uint64_t id, uint64_t out[4]);

pd_engine_stats_t pd_engine_stats(const pd_engine_t *e);
pd_kv_pool_t *pd_engine_kv(pd_engine_t *e);
/* The longest sequence (prompt plus output) one request may reach. */
int32_t pd_engine_max_seq_len(const pd_engine_t *e);
/* The CUDA graph caches' counters (pd_llm_graph_stats) of the target and the draft
 * llm, added up. */
void pd_engine_graph_stats(const pd_engine_t *e, pd_llm_graph_stats_t *stats_p);
/* The host threads that draw sampled tokens (opts.sample_threads resolved; 1: the
 * engine thread alone). */
int32_t pd_engine_sample_threads(const pd_engine_t *e);
/* The engine clock (monotonic seconds since creation). */
double pd_engine_now(const pd_engine_t *e);

#endif
