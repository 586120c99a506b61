/* sampler.h - next-token selection: greedy, temperature, top-k, top-p, min-p, with a
 * per-request seed.
 *
 * The order is vLLM's: logits / temperature, softmax, then top-k, top-p (nucleus) and
 * min-p (relative to the most likely token) filters, renormalise, draw. Temperature
 * <= 0 (or top_k == 1) is greedy: the first index of the largest logit, as llama2.c
 * picks it. The random stream is xoshiro256** seeded from the request's seed through
 * splitmix64, so the same seed and logits give the same tokens on every machine.
 * Ownership: the sampler owns its scratch, sized for the vocabulary at creation, so
 * sampling allocates nothing. Threading: one sampler per sequence, one thread at a
 * time. */
#ifndef PD_SAMPLER_H
#define PD_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"

typedef struct pd_sampler pd_sampler_t;

typedef struct pd_sampler_params {
    float temperature; /* <= 0: greedy */
    int32_t top_k;     /* <= 0: off */
    float top_p;       /* >= 1: off */
    float min_p;       /* <= 0: off */
    uint64_t seed;
} pd_sampler_params_t;

/* Greedy, filters off, seed 0. */
pd_sampler_params_t pd_sampler_params_default(void);
/* PD_ERR_INVALID for NaN or out-of-range values (top_p outside (0,1], min_p outside
 * [0,1], temperature negative or not finite), with a logged reason. */
pd_status_t pd_sampler_params_check(const pd_sampler_params_t *p);

pd_status_t pd_sampler_new(int32_t n_vocab, const pd_sampler_params_t *params,
                           pd_sampler_t **sampler_p);
void pd_sampler_destroy(pd_sampler_t **sampler_p);
/* Restarts the random stream from a new seed (params otherwise unchanged). */
void pd_sampler_reseed(pd_sampler_t *s, uint64_t seed);

/* The random stream's state (xoshiro256**, 4 words): a sampler restored with it draws
 * what the saved one would have drawn next (a request moved between workers). */
void pd_sampler_get_state(const pd_sampler_t *s, uint64_t out[4]);
void pd_sampler_set_state(pd_sampler_t *s, const uint64_t in[4]);

/* Picks the next token from logits[n_vocab] (read only). */
int32_t pd_sampler_sample(pd_sampler_t *s, const float *logits);
/* True when the sampler always takes the argmax (temperature 0 or top-k 1): it draws
 * nothing from its generator, so the argmax alone decides its token. */
bool pd_sampler_is_greedy(const pd_sampler_t *s);
/* Speculative sampling against a proposed token (a deterministic proposal, as n-gram
 * lookup makes): accepts it with probability p(proposed) under this sampler's
 * distribution (temperature, top-k, top-p, min-p applied) and returns it with
 * *accepted; else draws from that distribution with the proposed token removed and
 * renormalised. The output is distributed exactly as pd_sampler_sample's (the
 * rejection sampling of speculative decoding with q one-hot); it uses one or two draws
 * of the random stream. Greedy: the argmax, accepted when it is the proposal. */
int32_t pd_sampler_sample_spec(pd_sampler_t *s, const float *logits, int32_t proposed,
                               bool *accepted);

/* The index of the largest value (first on ties). */
int32_t pd_argmax(const float *x, int32_t n);

#endif
