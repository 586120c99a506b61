/* test_model.c - pd_model_open() on every shared model, both formats where both
 * exist: configurations from models/README.md, tensor shapes and dtypes, tokenizer
 * sizes, format detection by magic, the default tokenizer path, and byte-identical
 * weights between the .gguf and .bin of the same checkpoint.
 * Threading: single-threaded; Check forks per test. */
#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/model.h"
#include "support/pdcheck.h"

static pd_model_t *open_model(const char *name, const char *tok_name)
{
    const char *path = pd_test_model_path(name);
    const char *tok = tok_name ? pd_test_model_path(tok_name) : NULL;
    pd_model_t *m = NULL;
    pd_status_t st = pd_model_open(path, tok, &m);
    ck_assert_msg(st == PD_OK, "open %s: %s (%s)", path, pd_status_str(st),
                  pd_test_last_error);
    ck_assert_ptr_nonnull(m);
    ck_assert_int_eq(pd_test_n_errors, 0);
    return m;
}

typedef struct want {
    int dim, hidden, layers, heads, kv_heads, vocab, ctx;
} want_t;

static void expect_matrix(const pd_tensor_t *t, int64_t ne0, int64_t ne1)
{
    ck_assert_int_eq(t->n_dims, 2);
    ck_assert_int_eq(t->ne[0], ne0);
    ck_assert_int_eq(t->ne[1], ne1);
    ck_assert_ptr_nonnull(t->data);
    size_t bytes;
    ck_assert_int_eq(pd_tensor_size(t->dtype, t->ne, 2, &bytes), PD_OK);
    ck_assert_uint_eq(bytes, t->nbytes);
}

static void expect_norm(const pd_tensor_t *t, int64_t dim)
{
    ck_assert_int_eq(t->n_dims, 1);
    ck_assert_int_eq(t->ne[0], dim);
    ck_assert_int_eq(t->dtype, PD_DTYPE_F32);
    ck_assert_uint_eq(t->nbytes, (size_t)dim * 4);
}

static void expect_config(const pd_model_t *m, want_t w)
{
    const pd_model_config_t *c = pd_model_config(m);
    ck_assert_int_eq(c->dim, w.dim);
    ck_assert_int_eq(c->hidden_dim, w.hidden);
    ck_assert_int_eq(c->n_layers, w.layers);
    ck_assert_int_eq(c->n_heads, w.heads);
    ck_assert_int_eq(c->n_kv_heads, w.kv_heads);
    ck_assert_int_eq(c->head_dim, w.dim / w.heads);
    ck_assert_int_eq(c->vocab_size, w.vocab);
    ck_assert_int_eq(c->ctx_len, w.ctx);
    ck_assert_float_eq_tol(c->norm_eps, 1e-5f, 1e-9f);
    ck_assert_float_eq(c->rope_theta, 10000.0f);
    ck_assert_int_eq(pd_tokenizer_n_vocab(pd_model_tokenizer(m)), w.vocab);

    const pd_model_weights_t *wt = pd_model_weights(m);
    int64_t hd = w.dim / w.heads, q = w.heads * hd, kv = w.kv_heads * hd;
    expect_matrix(&wt->tok_embd, w.dim, w.vocab);
    expect_matrix(&wt->output, w.dim, w.vocab);
    expect_norm(&wt->output_norm, w.dim);
    for (int i = 0; i < w.layers; i++) {
        const pd_layer_weights_t *l = &wt->layers[i];
        expect_norm(&l->attn_norm, w.dim);
        expect_norm(&l->ffn_norm, w.dim);
        expect_matrix(&l->wq, w.dim, q);
        expect_matrix(&l->wk, w.dim, kv);
        expect_matrix(&l->wv, w.dim, kv);
        expect_matrix(&l->wo, q, w.dim);
        expect_matrix(&l->w_gate, w.dim, w.hidden);
        expect_matrix(&l->w_down, w.hidden, w.dim);
        expect_matrix(&l->w_up, w.dim, w.hidden);
    }
}

static void expect_same_tensor(const pd_tensor_t *a, const pd_tensor_t *b,
                               const char *what, int layer)
{
    ck_assert_msg(a->dtype == b->dtype && a->nbytes == b->nbytes &&
                      a->ne[0] == b->ne[0] && a->ne[1] == b->ne[1],
                  "%s (layer %d): shapes differ", what, layer);
    ck_assert_msg(memcmp(a->data, b->data, a->nbytes) == 0, "%s (layer %d): bytes differ",
                  what, layer);
}

/* The same checkpoint in both formats has byte-identical weights. */
static void expect_same_weights(const pd_model_t *x, const pd_model_t *y)
{
    const pd_model_weights_t *a = pd_model_weights(x), *b = pd_model_weights(y);
    expect_same_tensor(&a->tok_embd, &b->tok_embd, "tok_embd", -1);
    expect_same_tensor(&a->output_norm, &b->output_norm, "output_norm", -1);
    expect_same_tensor(&a->output, &b->output, "output", -1);
    for (int i = 0; i < pd_model_config(x)->n_layers; i++) {
        const pd_layer_weights_t *p = &a->layers[i], *q = &b->layers[i];
        expect_same_tensor(&p->attn_norm, &q->attn_norm, "attn_norm", i);
        expect_same_tensor(&p->wq, &q->wq, "wq", i);
        expect_same_tensor(&p->wk, &q->wk, "wk", i);
        expect_same_tensor(&p->wv, &q->wv, "wv", i);
        expect_same_tensor(&p->wo, &q->wo, "wo", i);
        expect_same_tensor(&p->ffn_norm, &q->ffn_norm, "ffn_norm", i);
        expect_same_tensor(&p->w_gate, &q->w_gate, "w_gate", i);
        expect_same_tensor(&p->w_down, &q->w_down, "w_down", i);
        expect_same_tensor(&p->w_up, &q->w_up, "w_up", i);
    }
}

START_TEST(test_stories260k_both_formats)
{
    pd_model_t *g = open_model("stories260K.gguf", NULL);
    pd_model_t *b = open_model("stories260K.bin", "tok512.bin");
    expect_config(g, (want_t){64, 172, 5, 8, 4, 512, 2048}); /* GGUF metadata says 2048 */
    expect_config(b, (want_t){64, 172, 5, 8, 4, 512, 512});
    ck_assert_str_eq(pd_model_dtype_name(g), "f32");
    ck_assert_str_eq(pd_model_dtype_name(b), "f32");
    ck_assert_uint_eq(pd_model_file_bytes(g), 1185376);
    ck_assert_uint_eq(pd_model_file_bytes(b), 1056540);
    /* the GGUF carries output.weight; the checkpoint shares its classifier */
    ck_assert(pd_model_weights(g)->output.data != pd_model_weights(g)->tok_embd.data);
    ck_assert(pd_model_weights(b)->output.data == pd_model_weights(b)->tok_embd.data);
    expect_same_weights(g, b);
    pd_model_destroy(&g);
    pd_model_destroy(&b);
    ck_assert_ptr_null(g);
    pd_model_destroy(&g);
}
END_TEST

START_TEST(test_llama2xs_both_formats)
{
    pd_model_t *g = open_model("llama2xs_tok512_280K.gguf", NULL);
    pd_model_t *b = open_model("llama2xs_tok512_280K.bin", "tok512.bin");
    expect_config(g, (want_t){64, 192, 5, 8, 4, 512, 256});
    expect_config(b, (want_t){64, 192, 5, 8, 4, 512, 256});
    expect_same_weights(g, b);
    ck_assert_uint_eq(pd_model_file_bytes(b), 1125148);
    pd_model_destroy(&g);
    pd_model_destroy(&b);
}
END_TEST

START_TEST(test_babyllama_and_aidreams)
{
    pd_model_t *m = open_model("babyllama_tok105.bin", "tok105.bin");
    expect_config(m, (want_t){128, 352, 5, 8, 4, 105, 256});
    ck_assert_str_eq(pd_model_dtype_name(m), "f32");
    pd_model_destroy(&m);
    m = open_model("aidreams260K.bin", "aidreams_tok512.bin");
    expect_config(m, (want_t){64, 172, 4, 4, 4, 512, 128});
    pd_model_destroy(&m);
}
END_TEST

START_TEST(test_tiny_random_f16)
{
    pd_model_t *m = open_model("llama-2-tiny-random.gguf", NULL);
    expect_config(m, (want_t){8, 32, 1, 2, 2, 32000, 4096});
    ck_assert_str_eq(pd_model_dtype_name(m), "f16");
    const pd_model_weights_t *w = pd_model_weights(m);
    ck_assert_int_eq(w->tok_embd.dtype, PD_DTYPE_F16);
    ck_assert_int_eq(w->layers[0].w_down.dtype, PD_DTYPE_F16);
    ck_assert_int_eq(w->layers[0].attn_norm.dtype, PD_DTYPE_F32);
    /* and with the vocabulary from llama2.c's tokenizer.bin instead */
    pd_model_t *t = open_model("llama-2-tiny-random.gguf", "llama2_tokenizer.bin");
    ck_assert_int_eq(pd_tokenizer_n_vocab(pd_model_tokenizer(t)), 32000);
    pd_model_destroy(&t);
    pd_model_destroy(&m);
}
END_TEST

/* The GGUF magic decides, not the name; a checkpoint finds tokenizer.bin beside it. */
START_TEST(test_detection_and_default_tokenizer)
{
    char dir[4096], gg[4200], ck[4200], tok[4200];
    snprintf(dir, sizeof dir, "%s/detect_XXXXXX", pd_test_temp_dir());
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(gg, sizeof gg, "%s/weights", dir);
    snprintf(ck, sizeof ck, "%s/model.bin", dir);
    snprintf(tok, sizeof tok, "%s/tokenizer.bin", dir);
    ck_assert_int_eq(symlink(pd_test_model_path("stories260K.gguf"), gg), 0);
    ck_assert_int_eq(symlink(pd_test_model_path("stories260K.bin"), ck), 0);

    pd_model_t *m = NULL;
    pd_status_t st = pd_model_open(gg, NULL, &m);
    ck_assert_msg(st == PD_OK, "%s", pd_test_last_error);
    ck_assert_int_eq(pd_model_config(m)->ctx_len, 2048); /* read as GGUF */
    pd_model_destroy(&m);

    /* no tokenizer.bin beside the checkpoint yet: an error, nothing returned */
    ck_assert_int_ne(pd_model_open(ck, NULL, &m), PD_OK);
    ck_assert_ptr_null(m);
    ck_assert_int_ge(pd_test_n_errors, 1);
    ck_assert_int_eq(symlink(pd_test_model_path("tok512.bin"), tok), 0);
    pd_test_n_errors = 0;
    st = pd_model_open(ck, NULL, &m);
    ck_assert_msg(st == PD_OK, "%s", pd_test_last_error);
    ck_assert_int_eq(pd_model_config(m)->ctx_len, 512);
    ck_assert_int_eq(pd_tokenizer_n_vocab(pd_model_tokenizer(m)), 512);
    pd_model_destroy(&m);

    unlink(gg);
    unlink(ck);
    unlink(tok);
    rmdir(dir);
}
END_TEST

START_TEST(test_open_failures)
{
    pd_model_t *m = NULL;
    ck_assert_int_eq(pd_model_open("/nonexistent/model.bin", NULL, &m), PD_ERR_IO);
    ck_assert_int_eq(pd_model_open("/nonexistent/model.gguf", NULL, &m), PD_ERR_IO);
    ck_assert_int_eq(pd_model_open(NULL, NULL, &m), PD_ERR_INVALID);
    ck_assert_ptr_null(m);
    /* a tokenizer file is neither format */
    ck_assert_int_eq(pd_model_open(pd_test_model_path("tok512.bin"), NULL, &m),
                     PD_ERR_FORMAT);
    ck_assert_ptr_null(m);
    /* a missing explicit tokenizer */
    ck_assert_int_ne(
        pd_model_open(pd_test_model_path("stories260K.bin"), "/nonexistent/tok.bin", &m),
        PD_OK);
    ck_assert_ptr_null(m);
    ck_assert_int_ge(pd_test_n_errors, 4);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 120, pd_test_log_setup, NULL);
    PD_TEST_ADD(tc, test_stories260k_both_formats, test_llama2xs_both_formats,
                test_babyllama_and_aidreams, test_tiny_random_f16,
                test_detection_and_default_tokenizer, test_open_failures);
    return pd_test_run("model", tc);
}
