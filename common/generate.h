/* generate.h - the single-sequence generation loop: prefill the prompt (in chunks of
 * the llm's batch size), then decode one token per forward pass until EOS, a stop
 * condition or max_tokens, handing each token to a callback as it is chosen.
 *
 * Stopping: the model's EOS ends generation, and so does BOS (llama2.c-family models
 * emit BOS between documents), unless ignore_eos; the context filling up ends it with
 * PD_FINISH_LENGTH. Nothing is allocated per token: out_ids is the caller's.
 * Threading: runs on the caller's thread (the llm's and sampler's owner). */
#ifndef PD_GENERATE_H
#define PD_GENERATE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/llm.h"
#include "common/sampler.h"

typedef enum pd_finish {
    PD_FINISH_NONE = 0,
    PD_FINISH_STOP,   /* EOS (or BOS) */
    PD_FINISH_LENGTH, /* max_tokens reached or the context is full */
} pd_finish_t;

const char *pd_finish_str(pd_finish_t f);

typedef struct pd_gen_opts {
    int32_t max_tokens;
    bool ignore_eos;
} pd_gen_opts_t;

typedef struct pd_gen_stats {
    int32_t n_prompt, n_gen;
    int32_t n_decode_steps; /* forward passes after the prompt (n_gen - 1 usually) */
    double prompt_s;        /* prefill forward passes + first sample */
    double decode_s;        /* decode forward passes + their samples */
    pd_finish_t finish;
} pd_gen_stats_t;

/* Called with each generated token in order; returning non-zero stops generation
 * (finish stays PD_FINISH_STOP). */
typedef int (*pd_gen_token_fn)(void *user, int32_t id);

/* Generates up to opts->max_tokens tokens after prompt[0..n_prompt) into
 * out_ids[0..max_tokens). The prompt must fit the llm's context with at least one
 * free position (PD_ERR_RANGE otherwise). On error the ids written so far remain in
 * out_ids and stats->n_gen counts them. */
pd_status_t pd_generate(pd_llm_t *llm, pd_sampler_t *sampler, const int32_t *prompt,
                        int32_t n_prompt, int32_t eos, int32_t bos,
                        const pd_gen_opts_t *opts, pd_gen_token_fn on_token, void *user,
                        int32_t *out_ids, pd_gen_stats_t *stats);

#endif
