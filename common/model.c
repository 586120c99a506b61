/* model.c - a Llama-family model from GGUF or from a llama2.c checkpoint.
 *
 * Design: pd_model_open() picks the format by the file's magic ("GGUF") or a
 * ".gguf" suffix; everything else is a llama2.c checkpoint (llama2c.c). For GGUF
 * the configuration comes from the llama.* metadata and the weights are views of
 * the named tensors; for both formats one check then verifies every tensor's shape
 * and dtype against the configuration, so the forward pass never re-validates.
 * The tokenizer comes from tokenizer_path when given, else from the GGUF metadata
 * or "tokenizer.bin" beside a checkpoint; its vocabulary size must match.
 * Threading: open/destroy on one thread; the model is immutable afterwards. */
#include "common/model.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/gguf.h"
#include "common/llama2c.h"
#include "common/log.h"
#include "common/mapfile.h"

/* Upper bounds well beyond any real Llama, low enough that products cannot overflow. */
#define MAX_DIM    (1 << 16)
#define MAX_HIDDEN (1 << 20)
#define MAX_LAYERS 1024
#define MAX_HEADS  1024
#define MAX_VOCAB  (1 << 22)
#define MAX_CTX    (1 << 24)

struct pd_model {
    pd_model_config_t cfg;
    pd_model_weights_t w; /* w.layers owned */
    pd_tokenizer_t *tok;
    pd_gguf_t *gguf;   /* GGUF models */
    pd_llama2c_t *l2c; /* llama2.c checkpoints */
    const char *dtype_name;
    size_t file_bytes;
};

static int in_range(int64_t v, int64_t lo, int64_t hi)
{
    return v >= lo && v <= hi;
}

pd_status_t pd_model_config_check(const pd_model_config_t *c, const char *path)
{
    const char *bad = NULL;
    if (!in_range(c->dim, 1, MAX_DIM))
        bad = "dim";
    else if (!in_range(c->hidden_dim, 1, MAX_HIDDEN))
        bad = "hidden_dim";
    else if (!in_range(c->n_layers, 1, MAX_LAYERS))
        bad = "n_layers";
    else if (!in_range(c->n_heads, 1, MAX_HEADS) || c->dim % c->n_heads != 0)
        bad = "n_heads (must divide dim)";
    else if (!in_range(c->n_kv_heads, 1, c->n_heads) || c->n_heads % c->n_kv_heads != 0)
        bad = "n_kv_heads (must divide n_heads)";
    else if (c->head_dim != c->dim / c->n_heads || c->head_dim % 2 != 0)
        bad = "head_dim (must be dim / n_heads and even)";
    else if (!in_range(c->vocab_size, 1, MAX_VOCAB))
        bad = "vocab_size";
    else if (!in_range(c->ctx_len, 1, MAX_CTX))
        bad = "context length";
    else if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f))
        bad = "rms norm epsilon";
    else if (!(c->rope_theta > 0.0f && isfinite(c->rope_theta)))
        bad = "rope theta";
    if (!bad)
        return PD_OK;
    PD_LOG_ERROR(
        "model %s: invalid %s in config: dim %d hidden %d layers %d heads %d kv %d "
        "head_dim %d vocab %d ctx %d eps %g theta %g",
        path, bad, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
        c->head_dim, c->vocab_size, c->ctx_len, (double)c->norm_eps,
        (double)c->rope_theta);
    return PD_ERR_FORMAT;
}

/* ---- shape checks, common to both formats ---- */

/* t must be [ne0] (ne1 == 0: a 1-D F32 norm) or [ne1][ne0]. */
static pd_status_t check_tensor(const char *path, const char *name, const pd_tensor_t *t,
                                int64_t ne0, int64_t ne1)
{
    int64_t want1 = ne1 > 0 ? ne1 : 1;
    if (t->ne[0] != ne0 || t->ne[1] != want1 || t->ne[2] != 1 || t->ne[3] != 1) {
        PD_LOG_ERROR("model %s: tensor %s has shape [%lld, %lld, %lld, %lld], expected "
                     "[%lld, %lld]",
                     path, name, (long long)t->ne[0], (long long)t->ne[1],
                     (long long)t->ne[2], (long long)t->ne[3], (long long)ne0,
                     (long long)want1);
        return PD_ERR_FORMAT;
    }
    if (!pd_dtype_valid((uint32_t)t->dtype) || (ne1 == 0 && t->dtype != PD_DTYPE_F32)) {
        PD_LOG_ERROR("model %s: tensor %s has dtype %s, expected %s", path, name,
                     pd_dtype_name(t->dtype),
                     ne1 == 0 ? "f32" : "f32/f16/bf16/q8_0/q4_0");
        return PD_ERR_FORMAT;
    }
    size_t bytes;
    if (pd_tensor_size(t->dtype, t->ne, 2, &bytes) != PD_OK || bytes != t->nbytes ||
        !t->data) {
        PD_LOG_ERROR("model %s: tensor %s has an inconsistent size", path, name);
        return PD_ERR_FORMAT;
    }
    return PD_OK;
}

static pd_status_t check_layer(const char *path, const pd_model_config_t *c, int i,
                               const pd_layer_weights_t *ly)
{
    int64_t dim = c->dim, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kv = (int64_t)c->n_kv_heads * c->head_dim, F = c->hidden_dim;
    const struct {
        const char *name;
        const pd_tensor_t *t;
        int64_t ne0, ne1;
    } want[] = {
        {"attn_norm", &ly->attn_norm, dim, 0}, {"attn_q", &ly->wq, dim, q},
        {"attn_k", &ly->wk, dim, kv},          {"attn_v", &ly->wv, dim, kv},
        {"attn_output", &ly->wo, q, dim},      {"ffn_norm", &ly->ffn_norm, dim, 0},
        {"ffn_gate", &ly->w_gate, dim, F},     {"ffn_down", &ly->w_down, F, dim},
        {"ffn_up", &ly->w_up, dim, F},
    };
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        char name[64];
        snprintf(name, sizeof name, "blk.%d.%s", i, want[k].name);
        pd_status_t st = check_tensor(path, name, want[k].t, want[k].ne0, want[k].ne1);
        if (st != PD_OK)
            return st;
    }
    return PD_OK;
}

static pd_status_t check_weights(const char *path, const pd_model_config_t *c,
                                 const pd_model_weights_t *w)
{
    pd_status_t st =
        check_tensor(path, "token_embd", &w->tok_embd, c->dim, c->vocab_size);
    if (st == PD_OK)
        st = check_tensor(path, "output_norm", &w->output_norm, c->dim, 0);
    if (st == PD_OK)
        st = check_tensor(path, "output", &w->output, c->dim, c->vocab_size);
    for (int i = 0; st == PD_OK && i < c->n_layers; i++)
        st = check_layer(path, c, i, &w->layers[i]);
    return st;
}

static const char *matrices_dtype(const pd_model_t *m)
{
    pd_dtype_t d = m->w.output.dtype;
    for (int i = 0; i < m->cfg.n_layers; i++) {
        const pd_layer_weights_t *ly = &m->w.layers[i];
        const pd_tensor_t *mats[] = {&ly->wq,     &ly->wk,     &ly->wv,  &ly->wo,
                                     &ly->w_gate, &ly->w_down, &ly->w_up};
        for (size_t k = 0; k < sizeof mats / sizeof mats[0]; k++)
            if (mats[k]->dtype != d)
                return "mixed";
    }
    return pd_dtype_name(d);
}

/* ---- GGUF ---- */

/* An integer key as int32; PD_ERR_NOT_FOUND (not logged) when missing. */
static pd_status_t get_i32(const pd_gguf_t *g, const char *path, const char *key,
                           int32_t *v_p)
{
    uint32_t v;
    pd_status_t st = pd_gguf_get_u32(g, key, &v);
    if (st != PD_OK)
        return st;
    if (v > INT32_MAX) {
        PD_LOG_ERROR("model %s: %s = %u is out of range", path, key, v);
        return PD_ERR_FORMAT;
    }
    *v_p = (int32_t)v;
    return PD_OK;
}

static pd_status_t need_u32(const pd_gguf_t *g, const char *path, const char *key,
                            int32_t *v_p)
{
    pd_status_t st = get_i32(g, path, key, v_p);
    if (st == PD_ERR_NOT_FOUND) {
        PD_LOG_ERROR("model %s: missing required key %s", path, key);
        return PD_ERR_FORMAT;
    }
    return st;
}

/* Optional keys: missing leaves *v_p as is. */
static pd_status_t opt_u32(const pd_gguf_t *g, const char *path, const char *key,
                           int32_t *v_p)
{
    pd_status_t st = get_i32(g, path, key, v_p);
    return st == PD_ERR_NOT_FOUND ? PD_OK : st;
}

static pd_status_t opt_f32(const pd_gguf_t *g, const char *key, float *v_p)
{
    pd_status_t st = pd_gguf_get_f32(g, key, v_p);
    return st == PD_ERR_NOT_FOUND ? PD_OK : st;
}

static pd_status_t check_arch(const pd_gguf_t *g, const char *path)
{
    const char *arch;
    size_t len;
    pd_status_t st = pd_gguf_get_str(g, "general.architecture", &arch, &len);
    if (st == PD_ERR_NOT_FOUND) {
        PD_LOG_ERROR("model %s: missing general.architecture", path);
        return PD_ERR_FORMAT;
    }
    if (st != PD_OK)
        return st;
    if (len != 5 || memcmp(arch, "llama", 5) != 0) {
        PD_LOG_ERROR("model %s: architecture '%.*s' is not supported (only llama)", path,
                     len > 64 ? 64 : (int)len, arch);
        return PD_ERR_UNSUPPORTED;
    }
    return PD_OK;
}

static pd_status_t gguf_config(const pd_gguf_t *g, const char *path, pd_model_config_t *c)
{
    memset(c, 0, sizeof *c);
    pd_status_t st = check_arch(g, path);
    if (st == PD_OK)
        st = need_u32(g, path, "llama.embedding_length", &c->dim);
    if (st == PD_OK)
        st = need_u32(g, path, "llama.feed_forward_length", &c->hidden_dim);
    if (st == PD_OK)
        st = need_u32(g, path, "llama.block_count", &c->n_layers);
    if (st == PD_OK)
        st = need_u32(g, path, "llama.attention.head_count", &c->n_heads);
    if (st == PD_OK)
        st = need_u32(g, path, "llama.context_length", &c->ctx_len);
    c->n_kv_heads = c->n_heads;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    if (st == PD_OK)
        st = opt_u32(g, path, "llama.attention.head_count_kv", &c->n_kv_heads);
    if (st == PD_OK)
        st = opt_f32(g, "llama.attention.layer_norm_rms_epsilon", &c->norm_eps);
    if (st == PD_OK)
        st = opt_f32(g, "llama.rope.freq_base", &c->rope_theta);
    if (st != PD_OK)
        return st;
    c->head_dim = (c->n_heads > 0) ? c->dim / c->n_heads : 0;
    int32_t rope_dims = c->head_dim;
    if ((st = opt_u32(g, path, "llama.rope.dimension_count", &rope_dims)) != PD_OK)
        return st;
    if (rope_dims != c->head_dim) {
        PD_LOG_ERROR(
            "model %s: llama.rope.dimension_count %d != head_dim %d (partial rope "
            "is not supported)",
            path, rope_dims, c->head_dim);
        return PD_ERR_UNSUPPORTED;
    }
    /* the vocabulary size is the embedding's row count */
    pd_tensor_t emb;
    if (pd_gguf_find_tensor(g, "token_embd.weight", &emb) != PD_OK) {
        PD_LOG_ERROR("model %s: missing tensor token_embd.weight", path);
        return PD_ERR_FORMAT;
    }
    c->vocab_size = emb.n_dims == 2 && emb.ne[1] <= MAX_VOCAB ? (int32_t)emb.ne[1] : -1;
    return pd_model_config_check(c, path);
}

static pd_status_t find(const pd_gguf_t *g, const char *path, const char *name,
                        pd_tensor_t *t_p)
{
    if (pd_gguf_find_tensor(g, name, t_p) == PD_OK)
        return PD_OK;
    PD_LOG_ERROR("model %s: missing tensor %s", path, name);
    return PD_ERR_FORMAT;
}

static pd_status_t gguf_layer(const pd_gguf_t *g, const char *path, int i,
                              pd_layer_weights_t *ly)
{
    const struct {
        const char *suffix;
        pd_tensor_t *t;
    } names[] = {
        {"attn_norm", &ly->attn_norm}, {"attn_q", &ly->wq},
        {"attn_k", &ly->wk},           {"attn_v", &ly->wv},
        {"attn_output", &ly->wo},      {"ffn_norm", &ly->ffn_norm},
        {"ffn_gate", &ly->w_gate},     {"ffn_down", &ly->w_down},
        {"ffn_up", &ly->w_up},
    };
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        char name[64];
        snprintf(name, sizeof name, "blk.%d.%s.weight", i, names[k].suffix);
        pd_status_t st = find(g, path, name, names[k].t);
        if (st != PD_OK)
            return st;
    }
    return PD_OK;
}

static pd_status_t gguf_weights(const pd_gguf_t *g, const char *path, pd_model_t *m)
{
    m->w.layers = calloc((size_t)m->cfg.n_layers, sizeof *m->w.layers);
    if (!m->w.layers) {
        PD_LOG_ERROR("model %s: out of memory for %d layers", path, m->cfg.n_layers);
        return PD_ERR_NOMEM;
    }
    pd_status_t st = find(g, path, "token_embd.weight", &m->w.tok_embd);
    if (st == PD_OK)
        st = find(g, path, "output_norm.weight", &m->w.output_norm);
    if (st == PD_OK && pd_gguf_find_tensor(g, "output.weight", &m->w.output) != PD_OK)
        m->w.output = m->w.tok_embd; /* tied classifier */
    for (int i = 0; st == PD_OK && i < m->cfg.n_layers; i++)
        st = gguf_layer(g, path, i, &m->w.layers[i]);
    return st;
}

static pd_status_t open_gguf(const char *path, unsigned map_flags, pd_model_t *m)
{
    pd_status_t st = pd_gguf_open_flags(path, map_flags, &m->gguf);
    if (st != PD_OK)
        return st;
    pd_gguf_data(m->gguf, &m->file_bytes);
    if ((st = gguf_config(m->gguf, path, &m->cfg)) != PD_OK)
        return st;
    return gguf_weights(m->gguf, path, m);
}

/* ---- llama2.c ---- */

static pd_status_t open_llama2c(const char *path, unsigned map_flags, pd_model_t *m)
{
    pd_status_t st = pd_llama2c_open(path, map_flags, &m->l2c);
    if (st != PD_OK)
        return st;
    m->cfg = m->l2c->cfg;
    m->w = m->l2c->w;
    m->l2c->w.layers = NULL; /* the model owns it now */
    m->file_bytes = m->l2c->size;
    return PD_OK;
}

/* ---- format detection, tokenizer, open ---- */

/* 1: GGUF by suffix or magic, 0: not, <0: a status (logged). */
static int is_gguf(const char *path)
{
    size_t n = strlen(path);
    if (n >= 5 && strcmp(path + n - 5, ".gguf") == 0)
        return 1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        PD_LOG_ERROR("model %s: open failed: %s", path, strerror(errno));
        return PD_ERR_IO;
    }
    char magic[4];
    ssize_t got = read(fd, magic, 4);
    close(fd);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

static pd_status_t open_tokenizer(const char *path, const char *tokenizer_path,
                                  pd_model_t *m)
{
    pd_status_t st;
    if (tokenizer_path) {
        st = pd_tokenizer_load_bin(tokenizer_path, m->cfg.vocab_size, &m->tok);
    } else if (m->gguf) {
        st = pd_tokenizer_from_gguf(m->gguf, &m->tok);
    } else {
        const char *slash = strrchr(path, '/');
        int dir_len = slash ? (int)(slash - path) + 1 : 0;
        size_t cap = (size_t)dir_len + sizeof "tokenizer.bin";
        char *tp = malloc(cap);
        if (!tp) {
            PD_LOG_ERROR("model %s: out of memory", path);
            return PD_ERR_NOMEM;
        }
        snprintf(tp, cap, "%.*stokenizer.bin", dir_len, path);
        st = pd_tokenizer_load_bin(tp, m->cfg.vocab_size, &m->tok);
        free(tp);
    }
    if (st != PD_OK)
        return st;
    int32_t n = pd_tokenizer_n_vocab(m->tok);
    if (n != m->cfg.vocab_size) {
        PD_LOG_ERROR("model %s: the tokenizer has %d tokens, the model %d", path, n,
                     m->cfg.vocab_size);
        return PD_ERR_FORMAT;
    }
    return PD_OK;
}

pd_status_t pd_model_open(const char *path, const char *tokenizer_path,
                          pd_model_t **model_p)
{
    return pd_model_open_ex(path, tokenizer_path, PD_MODEL_LOAD_MMAP, model_p);
}

pd_status_t pd_model_open_ex(const char *path, const char *tokenizer_path,
                             pd_model_load_t load, pd_model_t **model_p)
{
    if (!path || !model_p)
        return PD_ERR_INVALID;
    unsigned map_flags = load == PD_MODEL_LOAD_COPY ? PD_MAP_COPY : PD_MAP_POPULATE;
    int gguf = is_gguf(path);
    if (gguf < 0)
        return (pd_status_t)gguf;
    pd_model_t *m = calloc(1, sizeof *m);
    if (!m) {
        PD_LOG_ERROR("model %s: out of memory", path);
        return PD_ERR_NOMEM;
    }
    pd_status_t st =
        gguf ? open_gguf(path, map_flags, m) : open_llama2c(path, map_flags, m);
    if (st == PD_OK)
        st = check_weights(path, &m->cfg, &m->w);
    if (st == PD_OK)
        st = open_tokenizer(path, tokenizer_path, m);
    if (st != PD_OK) {
        pd_model_destroy(&m);
        return st;
    }
    m->dtype_name = matrices_dtype(m);
    PD_LOG_INFO("model %s: %s, dim %d, %d layers, %d/%d heads, vocab %d, %s", path,
                gguf ? "gguf" : "llama2.c", m->cfg.dim, m->cfg.n_layers, m->cfg.n_heads,
                m->cfg.n_kv_heads, m->cfg.vocab_size, m->dtype_name);
    *model_p = m;
    return PD_OK;
}

void pd_model_destroy(pd_model_t **model_p)
{
    if (!model_p || !*model_p)
        return;
    pd_model_t *m = *model_p;
    pd_tokenizer_destroy(&m->tok);
    free(m->w.layers);
    pd_gguf_destroy(&m->gguf);
    pd_llama2c_destroy(&m->l2c);
    free(m);
    *model_p = NULL;
}

const pd_model_config_t *pd_model_config(const pd_model_t *m)
{
    return &m->cfg;
}

const pd_model_weights_t *pd_model_weights(const pd_model_t *m)
{
    return &m->w;
}

const pd_tokenizer_t *pd_model_tokenizer(const pd_model_t *m)
{
    return m->tok;
}

const char *pd_model_dtype_name(const pd_model_t *m)
{
    return m->dtype_name;
}

size_t pd_model_file_bytes(const pd_model_t *m)
{
    return m->file_bytes;
}
