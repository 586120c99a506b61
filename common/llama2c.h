/* llama2c.h - private to common/: the llama2.c legacy checkpoint reader behind
 * pd_model_open(), and the configuration check shared by both model formats.
 *
 * A checkpoint is a 7 x int32 header (dim, hidden_dim, n_layers, n_heads,
 * n_kv_heads, vocab_size, seq_len; vocab_size < 0 means an unshared classifier at
 * the end) followed by F32 arrays. The file size must match the header exactly.
 * Ownership: pd_llama2c_t owns its mapping and its layers array; the weight views
 * point into the mapping. Threading: open/destroy on one thread; immutable after. */
#ifndef PD_LLAMA2C_H
#define PD_LLAMA2C_H

#include <stddef.h>

#include "common/model.h"
#include "common/status.h"

typedef struct pd_llama2c {
    const void *map;
    size_t size;
    unsigned map_flags;    /* PD_MAP_* */
    pd_model_config_t cfg; /* norm_eps 1e-5, rope_theta 10000, as llama2.c */
    int shared_classifier; /* 1: output == tok_embd */
    pd_model_weights_t w;  /* F32 views into map; w.layers malloc'd [n_layers] */
} pd_llama2c_t;

/* Maps and validates a checkpoint. On failure nothing stays mapped or allocated. */
pd_status_t pd_llama2c_open(const char *path, unsigned map_flags, pd_llama2c_t **l2c_p);
/* Accepts NULL; frees w.layers unless the caller took it (set it to NULL). */
void pd_llama2c_destroy(pd_llama2c_t **l2c_p);

/* Checks a configuration's values and bounds (positive, divisible heads, even
 * head_dim, head_dim == dim / n_heads, sane upper limits, finite positive eps and
 * theta); logs the first problem naming path. Defined in model.c. */
pd_status_t pd_model_config_check(const pd_model_config_t *cfg, const char *path);

#endif
