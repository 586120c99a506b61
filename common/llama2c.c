/* llama2c.c - llama2.c legacy checkpoints: a 7 x int32 header, then F32 arrays.
 *
 * Design: the file is mmap'd read-only; the header is validated (values, bounds,
 * divisibility) and the exact file size it implies is computed with overflow-checked
 * arithmetic before any weight view is made, so every view lies inside the mapping.
 * Array order (L = n_layers, hd = dim / n_heads, F = hidden_dim, V = vocab):
 *   token_embedding [V][dim], rms_att [L][dim], wq [L][n_heads*hd][dim],
 *   wk [L][n_kv*hd][dim], wv [L][n_kv*hd][dim], wo [L][dim][n_heads*hd],
 *   rms_ffn [L][dim], w1 [L][F][dim], w2 [L][dim][F], w3 [L][F][dim], rms_final [dim],
 *   freq_cis_real [seq][hd/2], freq_cis_imag [seq][hd/2] (skipped),
 *   wcls [V][dim] only when the header's vocab_size is negative.
 * Threading: open/destroy on one thread; the result is immutable. */
#include "common/llama2c.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/mapfile.h"

#define L2C_HEADER_INTS  7
#define L2C_HEADER_BYTES (L2C_HEADER_INTS * 4)

/* Header ints -> config; vocab < 0 means an unshared classifier. */
static pd_status_t parse_header(const int32_t *h, const char *path, pd_llama2c_t *l)
{
    pd_model_config_t *c = &l->cfg;
    memset(c, 0, sizeof *c);
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->vocab_size = h[5];
    c->ctx_len = h[6];
    l->shared_classifier = 1;
    if (h[5] < 0) {
        if (h[5] == INT32_MIN) {
            PD_LOG_ERROR("llama2c %s: byte 20: vocab_size %d is invalid", path, h[5]);
            return PD_ERR_FORMAT;
        }
        c->vocab_size = -h[5];
        l->shared_classifier = 0;
    }
    c->head_dim = (c->n_heads > 0 && c->dim > 0) ? c->dim / c->n_heads : 0;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    return pd_model_config_check(c, path);
}

/* Float count of the whole checkpoint after the header; -1 on overflow. */
static int expected_floats(const pd_llama2c_t *l, size_t *n_p)
{
    const pd_model_config_t *c = &l->cfg;
    size_t dim = (size_t)c->dim, hd = (size_t)c->head_dim, L = (size_t)c->n_layers;
    size_t q = (size_t)c->n_heads * hd, kv = (size_t)c->n_kv_heads * hd;
    size_t emb, per, t, total;
    /* per layer: 2 norms, wq, wk, wv, wo, w1, w2, w3 */
    size_t ffn;
    if (pd_mul_size((size_t)c->vocab_size, dim, &emb) ||
        pd_mul_size(3 * dim, (size_t)c->hidden_dim, &ffn) ||
        pd_mul_size(2 * q, dim, &per) || pd_mul_size(2 * kv, dim, &t) ||
        pd_add_size(per, t, &per) || pd_add_size(per, ffn, &per) ||
        pd_add_size(per, 2 * dim, &per) || pd_mul_size(per, L, &total) ||
        pd_add_size(total, emb, &total) || pd_add_size(total, dim, &total) ||
        pd_mul_size((size_t)c->ctx_len, hd, &t) ||
        pd_add_size(total, t, &total)) /* real + imag: 2 * seq * hd/2 */
        return -1;
    if (!l->shared_classifier && pd_add_size(total, emb, &total))
        return -1;
    *n_p = total;
    return 0;
}

/* Views the next ne0 x ne1 floats (ne1 == 0: a 1-D vector) at *p. */
static void take(pd_tensor_t *t, const float **p, int64_t ne0, int64_t ne1)
{
    memset(t, 0, sizeof *t);
    t->dtype = PD_DTYPE_F32;
    t->n_dims = ne1 > 0 ? 2 : 1;
    t->ne[0] = ne0;
    t->ne[1] = ne1 > 0 ? ne1 : 1;
    t->ne[2] = t->ne[3] = 1;
    t->data = *p;
    t->nbytes = (size_t)(ne0 * t->ne[1]) * sizeof(float);
    *p += ne0 * t->ne[1];
}

/* Lays the weight views over the mapping, in the checkpoint's order. */
static void bind_weights(pd_llama2c_t *l)
{
    const pd_model_config_t *c = &l->cfg;
    int64_t dim = c->dim, F = c->hidden_dim, hd = c->head_dim;
    int64_t q = c->n_heads * hd, kv = c->n_kv_heads * hd;
    pd_layer_weights_t *ly = l->w.layers;
    const float *p = (const float *)((const char *)l->map + L2C_HEADER_BYTES);
    take(&l->w.tok_embd, &p, dim, c->vocab_size);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].attn_norm, &p, dim, 0);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].wq, &p, dim, q);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].wk, &p, dim, kv);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].wv, &p, dim, kv);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].wo, &p, q, dim);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].ffn_norm, &p, dim, 0);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].w_gate, &p, dim, F);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].w_down, &p, F, dim);
    for (int i = 0; i < c->n_layers; i++)
        take(&ly[i].w_up, &p, dim, F);
    take(&l->w.output_norm, &p, dim, 0);
    p += (size_t)c->ctx_len * (size_t)hd; /* freq_cis_real and _imag: seq * hd/2 each */
    if (l->shared_classifier)
        l->w.output = l->w.tok_embd;
    else
        take(&l->w.output, &p, dim, c->vocab_size);
}

pd_status_t pd_llama2c_open(const char *path, unsigned map_flags, pd_llama2c_t **l2c_p)
{
    if (!path || !l2c_p)
        return PD_ERR_INVALID;
    pd_llama2c_t *l = calloc(1, sizeof *l);
    if (!l) {
        PD_LOG_ERROR("llama2c %s: out of memory", path);
        return PD_ERR_NOMEM;
    }
    pd_status_t st =
        pd_map_file(path, "llama2c", L2C_HEADER_BYTES, map_flags, &l->map, &l->size);
    l->map_flags = map_flags;
    if (st != PD_OK)
        goto err_free;
    int32_t h[L2C_HEADER_INTS];
    memcpy(h, l->map, sizeof h);
    if ((st = parse_header(h, path, l)) != PD_OK)
        goto err_free;
    size_t n_floats, expect;
    if (expected_floats(l, &n_floats) || pd_mul_size(n_floats, 4, &expect) ||
        pd_add_size(expect, L2C_HEADER_BYTES, &expect)) {
        PD_LOG_ERROR("llama2c %s: byte 0: the header's sizes overflow", path);
        st = PD_ERR_FORMAT;
        goto err_free;
    }
    if (l->size != expect) {
        PD_LOG_ERROR("llama2c %s: byte %zu: file is %zu bytes, the header implies %zu",
                     path, l->size < expect ? l->size : expect, l->size, expect);
        st = PD_ERR_FORMAT;
        goto err_free;
    }
    l->w.layers = calloc((size_t)l->cfg.n_layers, sizeof *l->w.layers);
    if (!l->w.layers) {
        PD_LOG_ERROR("llama2c %s: out of memory for %d layers", path, l->cfg.n_layers);
        st = PD_ERR_NOMEM;
        goto err_free;
    }
    bind_weights(l);
    *l2c_p = l;
    return PD_OK;
err_free:
    pd_llama2c_destroy(&l);
    return st;
}

void pd_llama2c_destroy(pd_llama2c_t **l2c_p)
{
    if (!l2c_p || !*l2c_p)
        return;
    pd_llama2c_t *l = *l2c_p;
    free(l->w.layers);
    pd_unmap_file(l->map, l->size, l->map_flags);
    free(l);
    *l2c_p = NULL;
}
