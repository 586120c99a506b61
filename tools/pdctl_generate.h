/* pdctl_generate.h - private to `pdctl generate`: its parsed options and the helpers
 * its one-prompt path (pdctl_generate.c) and its batched path
 * (pdctl_generate_batch.c) share. */
#ifndef PD_PDCTL_GENERATE_H
#define PD_PDCTL_GENERATE_H

#include <json-c/json.h>
#include <stdbool.h>

#include "common/generate.h"
#include "common/model.h"
#include <stdint.h>

#include "common/model.h"
#include "common/sampler.h"
#include "kernels/ops.h"

typedef struct gen_args {
    const char *model, *tokenizer, *prompt, *format, *isa, *kv_dtype, *load;
    const char *device;  /* --device cpu|cuda|cuda:N (NULL: cpu) */
    bool bf16_weights;   /* --weight-dtype bf16 (CUDA) */
    bool cuda_graphs;    /* --cuda-graphs (CUDA; ignored on the CPU) */
    int32_t max_tokens, threads, ctx, batch;
    int32_t sample_threads; /* --sample-threads (0: the engine's default) */
    pd_sampler_params_t sp;
    bool seed_given, ignore_eos;
    /* --prompts */
    const char *prompts;
    int32_t parallel, block_size, arrival_steps;
    int64_t kv_memory;
    bool no_prefix_cache;
    const char *spec; /* "ngram", "draft" or "off" (NULL) */
    const char *draft_model;
    int32_t spec_k;
    bool spec_fixed; /* --spec-fixed: always --spec-k proposals (no adaptive k) */
} gen_args_t;

bool pd_gen_load_mmap(const gen_args_t *a);
/* One prompt through the batching engine with speculative decoding (--spec, or
 * --draft-model, with --prompt): as pd_generate, tokens to on_token as they come, the
 * ids and stats filled; plus the speculation counts. Returns PD_OK or an error. */
typedef struct pd_gen_spec_counts {
    int64_t proposed, accepted;
} pd_gen_spec_counts_t;
pd_status_t pd_generate_spec(const gen_args_t *a, const pd_model_t *m, pd_kernels_t *k,
                             const int32_t *prompt, int32_t n_prompt,
                             int (*on_token)(void *user, int32_t id), void *user,
                             int32_t *ids, pd_gen_stats_t *st, pd_gen_spec_counts_t *sc);
json_object *pd_json_ids(const int32_t *ids, int32_t n);
/* A JSON string of s with invalid UTF-8 replaced (JSON must be UTF-8). */
json_object *pd_json_string_utf8(const char *s);
double pd_now_s(void);
/* "64MiB", "2GiB", "512k", "1000000": binary multiples for K/M/G with or without
 * "iB", decimal for KB/MB/GB; 0 ok, -1 bad. */
int pd_parse_size(const char *s, int64_t *bytes_p);

/* The --prompts path; returns the exit status. load_s: the time the model took. */
int pd_generate_batch(const gen_args_t *a, const pd_model_t *m, pd_kernels_t *k,
                      double load_s);

#endif
