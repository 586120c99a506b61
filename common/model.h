/* model.h - a Llama-family model: its configuration, its weights and its tokenizer,
 * loaded from GGUF or from a llama2.c checkpoint + tokenizer.bin.
 *
 * Weights are views into the mmap'd file (nothing is copied): resident memory
 * follows what the forward pass touches. Every tensor's dtype and shape is checked
 * against the configuration at load, so the forward pass never re-validates.
 * The file is untrusted: any inconsistency is PD_ERR_FORMAT with a logged reason.
 * Ownership: the model owns the mapping(s) and the tokenizer; the weight views and
 * the tokenizer live until pd_model_destroy(). Threading: immutable after open;
 * shareable read-only between threads. */
#ifndef PD_MODEL_H
#define PD_MODEL_H

#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"
#include "common/tokenizer.h"

typedef struct pd_model pd_model_t;

typedef struct pd_model_config {
    int32_t dim;        /* embedding width */
    int32_t hidden_dim; /* FFN width */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim; /* dim / n_heads */
    int32_t vocab_size;
    int32_t ctx_len;  /* the trained/declared context length */
    float norm_eps;   /* RMSNorm epsilon */
    float rope_theta; /* RoPE base; interleaved (adjacent-pair) rotation */
} pd_model_config_t;

/* Matrices are [ne1 = out][ne0 = in]; norms are F32 vectors [dim]. */
typedef struct pd_layer_weights {
    pd_tensor_t attn_norm; /* [dim] */
    pd_tensor_t wq;        /* [n_heads*head_dim][dim] */
    pd_tensor_t wk;        /* [n_kv_heads*head_dim][dim] */
    pd_tensor_t wv;        /* [n_kv_heads*head_dim][dim] */
    pd_tensor_t wo;        /* [dim][n_heads*head_dim] */
    pd_tensor_t ffn_norm;  /* [dim] */
    pd_tensor_t w_gate;    /* [hidden][dim]  (llama2.c w1) */
    pd_tensor_t w_down;    /* [dim][hidden]  (llama2.c w2) */
    pd_tensor_t w_up;      /* [hidden][dim]  (llama2.c w3) */
} pd_layer_weights_t;

typedef struct pd_model_weights {
    pd_tensor_t tok_embd;       /* [vocab][dim] */
    pd_tensor_t output_norm;    /* [dim] */
    pd_tensor_t output;         /* [vocab][dim]; equals tok_embd when shared */
    pd_layer_weights_t *layers; /* [n_layers] */
} pd_model_weights_t;

/* Opens a model. path ending in ".gguf" (or starting with the GGUF magic) is read
 * as GGUF and tokenizer_path may be NULL (the vocabulary is embedded; if given, it
 * replaces it). Otherwise path is a llama2.c checkpoint and tokenizer_path is its
 * tokenizer.bin (NULL: "tokenizer.bin" beside the checkpoint). */
pd_status_t pd_model_open(const char *path, const char *tokenizer_path,
                          pd_model_t **model_p);

/* How the weights get into memory. MMAP (the default of pd_model_open) maps the file
 * and faults it all in at open, so the first prompt does not pay for page faults;
 * COPY reads it into anonymous memory on transparent huge pages (fewer TLB misses
 * while streaming weights; llama.cpp's --no-mmap). Either way resident memory is
 * about the file size. */
typedef enum pd_model_load {
    PD_MODEL_LOAD_MMAP = 0,
    PD_MODEL_LOAD_COPY = 1,
} pd_model_load_t;

pd_status_t pd_model_open_ex(const char *path, const char *tokenizer_path,
                             pd_model_load_t load, pd_model_t **model_p);
void pd_model_destroy(pd_model_t **model_p);

const pd_model_config_t *pd_model_config(const pd_model_t *m);
const pd_model_weights_t *pd_model_weights(const pd_model_t *m);
const pd_tokenizer_t *pd_model_tokenizer(const pd_model_t *m);
/* The dtype of the large matrices ("f32", "q8_0", ...; "mixed" if they differ). */
const char *pd_model_dtype_name(const pd_model_t *m);
/* Total bytes of the mapped weight file(s). */
size_t pd_model_file_bytes(const pd_model_t *m);

#endif
