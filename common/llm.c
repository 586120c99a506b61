/* llm.c - see llm.h. The pass follows llama2.c's run.c step by step (RMSNorm,
 * Q/K/V projections, interleaved RoPE, causal grouped-query attention over the
 * cache, output projection and residual, RMSNorm, SwiGLU FFN and residual), with
 * every op over all T rows at once through the ops table. Threading: one caller. */
#include "common/llm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

struct pd_llm {
    const pd_model_t *model;
    pd_kernels_t *k;
    pd_model_config_t cfg;
    int32_t max_ctx, max_T, max_logits, block_size, n_blocks;
    int64_t kv_dim, q_dim;
    pd_dtype_t kv_dtype;       /* F32 or F16 */
    size_t layer_cache_floats; /* elements of K (or V) of one layer */
    /* K and V: [n_layers][n_blocks][block_size][n_kv_heads][head_dim] of kv_dtype */
    float *k_cache, *v_cache;
    int32_t *block_table; /* [n_blocks], identity for the one sequence */
    float *x;             /* [max_T][dim] residual stream */
    float *xb;            /* [max_T][dim] normed input */
    float *xb2;           /* [max_T][dim] projection output */
    float *q;             /* [max_T][n_heads*head_dim] */
    float *kk, *vv;       /* [max_T][kv_dim] */
    float *att;           /* [max_T][n_heads*head_dim] attention output */
    float *hb, *hb2;      /* [max_T][hidden_dim] */
    float *xo;            /* [max_logits][dim] rows that need logits */
    float *logits;        /* [max_logits][vocab] */
};

static float *alloc_floats(size_t a, size_t b, int *fail)
{
    size_t n;
    if (pd_mul_size(a, b, &n) || pd_mul_size(n, sizeof(float), &n)) {
        *fail = 1;
        return NULL;
    }
    float *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p)
        *fail = 1;
    return p;
}

static void free_buffers(pd_llm_t *l)
{
    float **bufs[] = {&l->k_cache, &l->v_cache, &l->x,     &l->xb,  &l->xb2,
                      &l->q,       &l->kk,      &l->vv,    &l->att, &l->hb,
                      &l->hb2,     &l->xo,      &l->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
    free(l->block_table);
    l->block_table = NULL;
}

pd_status_t pd_llm_new(const pd_model_t *model, pd_kernels_t *kernels,
                       const pd_llm_opts_t *opts, pd_llm_t **llm_p)
{
    pd_llm_t *l = calloc(1, sizeof *l);
    if (!l)
        return PD_ERR_NOMEM;
    l->model = model;
    l->k = kernels;
    l->cfg = *pd_model_config(model);
    const pd_model_config_t *c = &l->cfg;
    l->max_ctx = opts && opts->max_ctx > 0 ? opts->max_ctx : c->ctx_len;
    l->max_T = opts && opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 512;
    l->max_logits = opts && opts->max_logits > 0 ? opts->max_logits : 1;
    l->block_size = opts && opts->block_size > 0 ? opts->block_size : 16;
    if (l->max_logits > l->max_T)
        l->max_logits = l->max_T;
    pd_kv_type_t kt = opts ? opts->kv_type : PD_KV_AUTO;
    if (kt != PD_KV_AUTO && kt != PD_KV_F32 && kt != PD_KV_F16) {
        PD_LOG_ERROR("unknown kv cache type %d", (int)kt);
        free(l);
        return PD_ERR_INVALID;
    }
    l->kv_dtype = kt == PD_KV_F32   ? PD_DTYPE_F32
                  : kt == PD_KV_F16 ? PD_DTYPE_F16
                                    : pd_llm_auto_kv_dtype(model);
    l->n_blocks = (l->max_ctx + l->block_size - 1) / l->block_size;
    l->kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    l->q_dim = (int64_t)c->n_heads * c->head_dim;

    int fail = 0;
    size_t T = (size_t)l->max_T;
    if (pd_mul_size((size_t)l->n_blocks * (size_t)l->block_size, (size_t)l->kv_dim,
                    &l->layer_cache_floats))
        fail = 1;
    size_t cache_floats = 0;
    if (!fail && pd_mul_size(l->layer_cache_floats, (size_t)c->n_layers, &cache_floats))
        fail = 1;
    if (!fail) {
        /* an F16 cache takes half the floats' room */
        size_t n = l->kv_dtype == PD_DTYPE_F16 ? (cache_floats + 1) / 2 : cache_floats;
        l->k_cache = alloc_floats(n, 1, &fail);
        l->v_cache = alloc_floats(n, 1, &fail);
        l->x = alloc_floats(T, (size_t)c->dim, &fail);
        l->xb = alloc_floats(T, (size_t)c->dim, &fail);
        l->xb2 = alloc_floats(T, (size_t)c->dim, &fail);
        l->q = alloc_floats(T, (size_t)l->q_dim, &fail);
        l->kk = alloc_floats(T, (size_t)l->kv_dim, &fail);
        l->vv = alloc_floats(T, (size_t)l->kv_dim, &fail);
        l->att = alloc_floats(T, (size_t)l->q_dim, &fail);
        l->hb = alloc_floats(T, (size_t)c->hidden_dim, &fail);
        l->hb2 = alloc_floats(T, (size_t)c->hidden_dim, &fail);
        l->xo = alloc_floats((size_t)l->max_logits, (size_t)c->dim, &fail);
        l->logits = alloc_floats((size_t)l->max_logits, (size_t)c->vocab_size, &fail);
        l->block_table = malloc((size_t)l->n_blocks * sizeof *l->block_table);
        fail |= !l->block_table;
    }
    if (fail) {
        PD_LOG_ERROR("cannot allocate the llm buffers (ctx %d, batch %d)", l->max_ctx,
                     l->max_T);
        goto err_free_buffers;
    }
    for (int32_t b = 0; b < l->n_blocks; b++)
        l->block_table[b] = b;
    *llm_p = l;
    return PD_OK;

err_free_buffers:
    free_buffers(l);
    free(l);
    return PD_ERR_NOMEM;
}

void pd_llm_destroy(pd_llm_t **llm_p)
{
    if (!llm_p || !*llm_p)
        return;
    free_buffers(*llm_p);
    free(*llm_p);
    *llm_p = NULL;
}

int32_t pd_llm_max_ctx(const pd_llm_t *llm)
{
    return llm->max_ctx;
}

int32_t pd_llm_max_batch_tokens(const pd_llm_t *llm)
{
    return llm->max_T;
}

pd_dtype_t pd_llm_kv_dtype(const pd_llm_t *llm)
{
    return llm->kv_dtype;
}

pd_dtype_t pd_llm_auto_kv_dtype(const pd_model_t *model)
{
    return strcmp(pd_model_dtype_name(model), "f32") == 0 ? PD_DTYPE_F32 : PD_DTYPE_F16;
}

static pd_status_t check_batch(const pd_llm_t *l, const int32_t *ids, const int32_t *pos,
                               int64_t T, const int32_t *out_rows, int64_t n_out)
{
    if (T < 1 || T > l->max_T || n_out < 0 || n_out > l->max_logits) {
        PD_LOG_ERROR("forward batch of %lld tokens, %lld logits exceeds the limits "
                     "(%d tokens, %d logits)",
                     (long long)T, (long long)n_out, l->max_T, l->max_logits);
        return PD_ERR_RANGE;
    }
    for (int64_t t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= l->cfg.vocab_size) {
            PD_LOG_ERROR("token id %d outside the vocabulary (%d)", ids[t],
                         l->cfg.vocab_size);
            return PD_ERR_RANGE;
        }
        if (pos[t] < 0 || pos[t] >= l->max_ctx) {
            PD_LOG_ERROR("position %d outside the context (%d)", pos[t], l->max_ctx);
            return PD_ERR_RANGE;
        }
    }
    for (int64_t i = 0; i < n_out; i++)
        if (out_rows[i] < 0 || out_rows[i] >= T) {
            PD_LOG_ERROR("logit row %d outside the batch of %lld", out_rows[i],
                         (long long)T);
            return PD_ERR_RANGE;
        }
    return PD_OK;
}

/* Matrices that read the same input run as one fan-out when the backend can (same
 * dtype and input width: the usual case), else one by one. */
static void matmul_shared_x(pd_kernels_t *k, const pd_tensor_t *const *ws,
                            float *const *ys, int n, const float *x, int64_t T)
{
    int same = k->matmul_multi != NULL;
    for (int m = 1; m < n; m++)
        same = same && ws[m]->dtype == ws[0]->dtype && ws[m]->ne[0] == ws[0]->ne[0];
    if (same) {
        k->matmul_multi(k, ws, ys, n, x, T);
        return;
    }
    for (int m = 0; m < n; m++)
        k->matmul(k, ws[m], x, T, ys[m]);
}

/* One transformer block over the T rows of l->x. */
static void layer_forward(pd_llm_t *l, int layer, const int32_t *pos, int64_t T)
{
    const pd_model_config_t *c = &l->cfg;
    const pd_layer_weights_t *w = &pd_model_weights(l->model)->layers[layer];
    pd_kernels_t *k = l->k;
    size_t off =
        (size_t)layer * l->layer_cache_floats * (l->kv_dtype == PD_DTYPE_F16 ? 2 : 4);
    char *kc = (char *)l->k_cache + off;
    char *vc = (char *)l->v_cache + off;

    /* attention */
    k->rmsnorm(k, l->xb, l->x, w->attn_norm.data, T, c->dim, c->norm_eps);
    const pd_tensor_t *qkv[3] = {&w->wq, &w->wk, &w->wv};
    float *qkv_out[3] = {l->q, l->kk, l->vv};
    matmul_shared_x(k, qkv, qkv_out, 3, l->xb, T);
    k->rope(k, l->q, pos, T, c->n_heads, c->head_dim, c->rope_theta);
    k->rope(k, l->kk, pos, T, c->n_kv_heads, c->head_dim, c->rope_theta);
    k->kv_write(k, kc, l->kv_dtype, l->block_table, l->block_size, l->kv_dim, pos, T,
                l->kk);
    k->kv_write(k, vc, l->kv_dtype, l->block_table, l->block_size, l->kv_dim, pos, T,
                l->vv);
    pd_attn_args_t a = {
        .q = l->q,
        .out = l->att,
        .T = T,
        .pos = pos,
        .k_cache = kc,
        .v_cache = vc,
        .kv_dtype = l->kv_dtype,
        .block_table = l->block_table,
        .block_size = l->block_size,
        .n_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads,
        .head_dim = c->head_dim,
        .scale = 1.0f / sqrtf((float)c->head_dim),
    };
    k->attention(k, &a);
    k->matmul(k, &w->wo, l->att, T, l->xb2);
    k->add(k, l->x, l->xb2, T * c->dim);

    /* feed-forward: w_down(silu(w_gate x) * w_up x) */
    k->rmsnorm(k, l->xb, l->x, w->ffn_norm.data, T, c->dim, c->norm_eps);
    const pd_tensor_t *gate_up[2] = {&w->w_gate, &w->w_up};
    float *gate_up_out[2] = {l->hb, l->hb2};
    matmul_shared_x(k, gate_up, gate_up_out, 2, l->xb, T);
    k->silu_mul(k, l->hb, l->hb2, T * c->hidden_dim);
    k->matmul(k, &w->w_down, l->hb, T, l->xb2);
    k->add(k, l->x, l->xb2, T * c->dim);
}

pd_status_t pd_llm_forward(pd_llm_t *l, const int32_t *ids, const int32_t *pos, int64_t T,
                           const int32_t *out_rows, int64_t n_out, const float **logits_p)
{
    pd_status_t st = check_batch(l, ids, pos, T, out_rows, n_out);
    if (st != PD_OK)
        return st;
    const pd_model_config_t *c = &l->cfg;
    const pd_model_weights_t *mw = pd_model_weights(l->model);
    pd_kernels_t *k = l->k;

    k->get_rows(k, &mw->tok_embd, ids, T, l->x);
    for (int layer = 0; layer < c->n_layers; layer++)
        layer_forward(l, layer, pos, T);

    if (n_out > 0) {
        for (int64_t i = 0; i < n_out; i++)
            memcpy(l->xo + i * c->dim, l->x + (int64_t)out_rows[i] * c->dim,
                   (size_t)c->dim * sizeof(float));
        k->rmsnorm(k, l->xo, l->xo, mw->output_norm.data, n_out, c->dim, c->norm_eps);
        k->matmul(k, &mw->output, l->xo, n_out, l->logits);
    }
    if (logits_p)
        *logits_p = l->logits;
    return PD_OK;
}
