/* digest.c - see digest.h. */
#include "common/digest.h"

#include <stdio.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t */
#include <xxhash.h>

static void add_i64(XXH3_state_t *st, int64_t v)
{
    XXH3_128bits_update(st, &v, sizeof v);
}

static void add_tensor(XXH3_state_t *st, const pd_tensor_t *t)
{
    add_i64(st, t->dtype);
    add_i64(st, t->n_dims);
    for (int d = 0; d < t->n_dims; d++)
        add_i64(st, t->ne[d]);
    add_i64(st, (int64_t)t->nbytes);
    if (t->data && t->nbytes)
        XXH3_128bits_update(st, t->data, t->nbytes);
}

void pd_model_digest(const pd_model_t *model, uint8_t out[PD_DIGEST_BYTES])
{
    XXH3_state_t st;
    XXH3_128bits_reset(&st);
    const pd_model_config_t *c = pd_model_config(model);
    const int64_t cfg[] = {c->dim,        c->hidden_dim, c->n_layers, c->n_heads,
                           c->n_kv_heads, c->head_dim,   c->vocab_size};
    XXH3_128bits_update(&st, cfg, sizeof cfg);
    float f[2] = {c->norm_eps, c->rope_theta};
    XXH3_128bits_update(&st, f, sizeof f);
    const pd_model_weights_t *w = pd_model_weights(model);
    add_tensor(&st, &w->tok_embd);
    add_tensor(&st, &w->output_norm);
    add_tensor(&st, &w->output);
    for (int l = 0; l < c->n_layers; l++) {
        const pd_layer_weights_t *L = &w->layers[l];
        const pd_tensor_t *ts[] = {&L->attn_norm, &L->wq,     &L->wk,     &L->wv,    &L->wo,
                                   &L->ffn_norm,  &L->w_gate, &L->w_down, &L->w_up};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
            add_tensor(&st, ts[i]);
    }
    const pd_tokenizer_t *tok = pd_model_tokenizer(model);
    int32_t nv = pd_tokenizer_n_vocab(tok);
    add_i64(&st, nv);
    for (int32_t i = 0; i < nv; i++) {
        size_t len = 0;
        const char *p = pd_tokenizer_piece(tok, i, &len);
        add_i64(&st, (int64_t)len);
        if (p && len)
            XXH3_128bits_update(&st, p, len);
        float sc = pd_tokenizer_score(tok, i);
        XXH3_128bits_update(&st, &sc, sizeof sc);
        add_i64(&st, pd_tokenizer_type(tok, i));
    }
    XXH128_hash_t h = XXH3_128bits_digest(&st);
    XXH128_canonical_t can;
    XXH128_canonicalFromHash(&can, h);
    memcpy(out, can.digest, PD_DIGEST_BYTES);
}

void pd_digest_hex(const uint8_t d[PD_DIGEST_BYTES], char out[2 * PD_DIGEST_BYTES + 1])
{
    for (int i = 0; i < PD_DIGEST_BYTES; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}
