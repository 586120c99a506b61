/* pdctl_mkmodel.c - `pdctl mkmodel`: writes a random-weight Llama GGUF for benchmarks.
 *
 * Speed does not depend on weight values, so benchmark models (llama2.c's 15M and
 * 110M shapes, and a 1B Llama-3.2-like shape) are generated rather than shipped.
 * The file is llama.cpp-compatible GGUF v3: "llama" architecture metadata, the
 * SentencePiece vocabulary of a llama2.c tokenizer.bin (by default the 32000-token
 * Llama-2 one) converted to tokenizer.ggml.* arrays, and tensors with GGUF names,
 * ne[0] = input size, row-major [out][in]. Norms are F32; every matrix (embeddings
 * and output included) has the requested dtype.
 * Weights are deterministic from --seed: each tensor has its own xoshiro256+ stream
 * seeded from (seed, tensor name), uniform with std 0.02 (norm weights near 1), so
 * activations stay finite and the same seed always gives the same bytes.
 * Data is generated and written one chunk of rows at a time (a 1B F32 model is
 * 4.4 GB; memory use stays a few MB). Single-threaded. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/log.h"
#include "common/rng.h"
#include "common/tensor.h"
#include "common/tokenizer.h"
#include "tools/gguf_writer.h"
#include "tools/pdctl.h"

#define WEIGHT_STD        0.02f
#define NORM_SPREAD       0.1f       /* norm weights uniform in 1 +- this */
#define CHUNK_ELEMS       (1u << 20) /* floats generated per write */
#define DEFAULT_TOKENIZER "models/llama2_tokenizer.bin"

typedef struct preset {
    const char *name;
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, ctx_len;
} preset_t;

static const preset_t presets[] = {
    {"15M", 288, 768, 6, 6, 6, 256},
    {"110M", 768, 2048, 12, 12, 12, 1024},
    {"1B", 2048, 8192, 16, 32, 8, 2048},
};

typedef struct dtype_opt {
    const char *name;
    pd_dtype_t dtype;
    uint32_t file_type; /* general.file_type (llama_ftype) */
} dtype_opt_t;

static const dtype_opt_t dtypes[] = {
    {"f32", PD_DTYPE_F32, 0},
    {"f16", PD_DTYPE_F16, 1},
    {"q8_0", PD_DTYPE_Q8_0, 7},
    {"q4_0", PD_DTYPE_Q4_0, 2},
};

typedef struct vocab {
    char **pieces;  /* [n] GGUF form: U+2581 for spaces */
    size_t *lens;   /* [n] */
    float *scores;  /* [n] */
    int32_t *types; /* [n] llama token types */
    size_t n;
} vocab_t;

typedef struct options {
    const preset_t *preset;
    preset_t custom; /* the preset with --ctx applied */
    long ctx;
    const dtype_opt_t *dtype;
    uint64_t seed;
    const char *out_path;
    const char *tokenizer_path;
} options_t;

/* ---- deterministic random numbers ---------------------------------------------- */

/* One independent stream per (seed, tensor name): order of generation is free. */
static void rng_seed(pd_rng_t *r, uint64_t seed, const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a of the name */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    pd_rng_seed(r, seed ^ h);
}

/* Uniform in [-1, 1). */
static float rng_sym(pd_rng_t *r)
{
    return 2.0f * pd_rng_float(r) - 1.0f;
}

/* ---- vocabulary ---------------------------------------------------------------- */

static void vocab_free(vocab_t *v)
{
    for (size_t i = 0; v->pieces && i < v->n; i++)
        free(v->pieces[i]);
    free(v->pieces);
    free(v->lens);
    free(v->scores);
    free(v->types);
    memset(v, 0, sizeof *v);
}

/* Converts one tokenizer.bin piece to its GGUF form and sets its type. llama2.c's
 * export stores BOS/EOS as "\n<s>\n" / "\n</s>\n" and spaces for U+2581. */
static pd_status_t vocab_set(vocab_t *v, size_t id, const char *raw, size_t n,
                             float score, int type)
{
    if ((id == 1 || id == 2) && n >= 2 && raw[0] == '\n' && raw[n - 1] == '\n') {
        raw++;
        n -= 2;
    }
    size_t spaces = 0;
    for (size_t i = 0; i < n; i++)
        spaces += raw[i] == ' ';
    char *p = malloc(n + 2 * spaces + 1);
    if (!p)
        return PD_ERR_NOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (raw[i] == ' ') {
            memcpy(p + k, "\xe2\x96\x81", 3);
            k += 3;
        } else {
            p[k++] = raw[i];
        }
    }
    p[k] = '\0';
    v->pieces[id] = p;
    v->lens[id] = k;
    v->scores[id] = score;
    v->types[id] = type;
    return PD_OK;
}

/* Reads a llama2.c tokenizer.bin (every record it holds) through the tokenizer
 * module, which validates it, and converts it to GGUF's arrays. */
static pd_status_t vocab_load(const char *path, vocab_t *v)
{
    pd_tokenizer_t *tok = NULL;
    pd_status_t st = pd_tokenizer_load_bin(path, 0, &tok);
    if (st != PD_OK)
        return st;
    memset(v, 0, sizeof *v);
    v->n = (size_t)pd_tokenizer_n_vocab(tok);
    v->pieces = calloc(v->n, sizeof *v->pieces);
    v->lens = calloc(v->n, sizeof *v->lens);
    v->scores = calloc(v->n, sizeof *v->scores);
    v->types = calloc(v->n, sizeof *v->types);
    if (!v->pieces || !v->lens || !v->scores || !v->types) {
        PD_LOG_ERROR("out of memory for a vocabulary of %zu tokens", v->n);
        st = PD_ERR_NOMEM;
    }
    for (int32_t id = 0; st == PD_OK && (size_t)id < v->n; id++) {
        size_t len;
        const char *piece = pd_tokenizer_piece(tok, id, &len);
        st = vocab_set(v, (size_t)id, piece, len, pd_tokenizer_score(tok, id),
                       pd_tokenizer_type(tok, id));
    }
    pd_tokenizer_destroy(&tok);
    if (st != PD_OK)
        vocab_free(v);
    return st;
}

/* --tokenizer, else $PD_SHARED_DIR/models/..., else ../shared/models/... from the
 * cwd, else relative to the binary (build/bin/pdctl beside ../shared). */
static int find_tokenizer(char *out, size_t cap)
{
    const char *shared = getenv("PD_SHARED_DIR");
    char exe[PATH_MAX];
    if (shared && *shared) {
        int k = snprintf(out, cap, "%s/%s", shared, DEFAULT_TOKENIZER);
        if (k > 0 && (size_t)k < cap && !access(out, R_OK))
            return 0;
    }
    snprintf(out, cap, "../shared/%s", DEFAULT_TOKENIZER);
    if (!access(out, R_OK))
        return 0;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash)
            *slash = '\0';
        const char *ups[] = {"../../../shared", "../../shared", "../shared"};
        for (size_t i = 0; i < sizeof ups / sizeof ups[0]; i++) {
            int k = snprintf(out, cap, "%s/%s/%s", exe, ups[i], DEFAULT_TOKENIZER);
            if (k > 0 && (size_t)k < cap && !access(out, R_OK))
                return 0;
        }
    }
    return -1;
}

/* ---- the model ----------------------------------------------------------------- */

enum tensor_kind { KIND_MATRIX, KIND_NORM };

typedef struct tensor_spec {
    char name[64];
    enum tensor_kind kind;
    int n_dims;
    int64_t ne[2];
} tensor_spec_t;

/* Lists the tensors in llama.cpp's usual order; returns the count (specs may be NULL
 * to count only). */
static size_t list_tensors(const preset_t *p, size_t n_vocab, tensor_spec_t *specs)
{
    int64_t head_dim = p->dim / p->n_heads, kv_dim = head_dim * p->n_kv_heads;
    size_t n = 0;
#define ADD(kind_, nd_, e0_, e1_, ...)                                                   \
    do {                                                                                 \
        if (specs) {                                                                     \
            snprintf(specs[n].name, sizeof specs[n].name, __VA_ARGS__);                  \
            specs[n].kind = (kind_);                                                     \
            specs[n].n_dims = (nd_);                                                     \
            specs[n].ne[0] = (e0_);                                                      \
            specs[n].ne[1] = (e1_);                                                      \
        }                                                                                \
        n++;                                                                             \
    } while (0)
    ADD(KIND_MATRIX, 2, p->dim, (int64_t)n_vocab, "token_embd.weight");
    for (int l = 0; l < p->n_layers; l++) {
        ADD(KIND_NORM, 1, p->dim, 1, "blk.%d.attn_norm.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, p->dim, "blk.%d.attn_q.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, kv_dim, "blk.%d.attn_k.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, kv_dim, "blk.%d.attn_v.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, p->dim, "blk.%d.attn_output.weight", l);
        ADD(KIND_NORM, 1, p->dim, 1, "blk.%d.ffn_norm.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, p->hidden_dim, "blk.%d.ffn_gate.weight", l);
        ADD(KIND_MATRIX, 2, p->hidden_dim, p->dim, "blk.%d.ffn_down.weight", l);
        ADD(KIND_MATRIX, 2, p->dim, p->hidden_dim, "blk.%d.ffn_up.weight", l);
    }
    ADD(KIND_NORM, 1, p->dim, 1, "output_norm.weight");
    ADD(KIND_MATRIX, 2, p->dim, (int64_t)n_vocab, "output.weight");
#undef ADD
    return n;
}

static pd_status_t add_metadata(pd_gguf_writer_t *w, const options_t *o, const vocab_t *v)
{
    const preset_t *p = o->preset;
    char name[96];
    pd_status_t st;
    snprintf(name, sizeof name, "pdserve random %s %s seed %llu", p->name, o->dtype->name,
             (unsigned long long)o->seed);
    if ((st = pd_gguf_writer_add_str(w, "general.architecture", "llama")) ||
        (st = pd_gguf_writer_add_str(w, "general.name", name)) ||
        (st = pd_gguf_writer_add_u32(w, "general.file_type", o->dtype->file_type)) ||
        (o->dtype->dtype != PD_DTYPE_F32 && o->dtype->dtype != PD_DTYPE_F16 &&
         (st = pd_gguf_writer_add_u32(w, "general.quantization_version", 2))) ||
        (st = pd_gguf_writer_add_u32(w, "llama.context_length", (uint32_t)p->ctx_len)) ||
        (st = pd_gguf_writer_add_u32(w, "llama.embedding_length", (uint32_t)p->dim)) ||
        (st = pd_gguf_writer_add_u32(w, "llama.block_count", (uint32_t)p->n_layers)) ||
        (st = pd_gguf_writer_add_u32(w, "llama.feed_forward_length",
                                     (uint32_t)p->hidden_dim)) ||
        (st = pd_gguf_writer_add_u32(w, "llama.rope.dimension_count",
                                     (uint32_t)(p->dim / p->n_heads))) ||
        (st = pd_gguf_writer_add_u32(w, "llama.attention.head_count",
                                     (uint32_t)p->n_heads)) ||
        (st = pd_gguf_writer_add_u32(w, "llama.attention.head_count_kv",
                                     (uint32_t)p->n_kv_heads)) ||
        (st = pd_gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon",
                                     1e-5f)) ||
        (st = pd_gguf_writer_add_f32(w, "llama.rope.freq_base", 10000.0f)) ||
        (st = pd_gguf_writer_add_u32(w, "general.alignment", 32)) ||
        (st = pd_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama")) ||
        (st =
             pd_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens",
                                        (const char *const *)v->pieces, v->lens, v->n)) ||
        (st = pd_gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", v->scores, v->n)) ||
        (st = pd_gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", v->types,
                                         v->n)) ||
        (st = pd_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1)) ||
        (st = pd_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2)) ||
        (st = pd_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0)) ||
        (st = pd_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 1)) ||
        (st = pd_gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", 0)))
        return st;
    return PD_OK;
}

/* Converts n floats to dtype into out (n a multiple of the block for quantized). */
static void convert(pd_dtype_t dtype, const float *x, size_t n, void *out)
{
    switch (dtype) {
    case PD_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            ((uint16_t *)out)[i] = pd_f32_to_fp16(x[i]);
        break;
    case PD_DTYPE_Q8_0:
        pd_quantize_q8_0(x, (int64_t)n, out);
        break;
    case PD_DTYPE_Q4_0:
        pd_quantize_q4_0(x, (int64_t)n, out);
        break;
    default:
        memcpy(out, x, n * sizeof *x);
        break;
    }
}

/* Generates and streams one tensor, a chunk of whole rows at a time. xbuf holds
 * CHUNK_ELEMS floats, obuf their largest encoding (CHUNK_ELEMS * 4 bytes). */
static pd_status_t write_tensor(pd_gguf_writer_t *w, const tensor_spec_t *t,
                                pd_dtype_t dtype, uint64_t seed, float *xbuf, void *obuf)
{
    pd_rng_t r;
    size_t row_bytes;
    int64_t ne0 = t->ne[0], rows = t->n_dims == 2 ? t->ne[1] : 1;
    int64_t rows_per_chunk = (int64_t)CHUNK_ELEMS / ne0;
    const float a = WEIGHT_STD * 1.7320508f; /* uniform [-a, a) has std a/sqrt(3) */
    pd_status_t st = pd_dtype_row_bytes(dtype, ne0, &row_bytes);
    if (st || rows_per_chunk < 1) {
        PD_LOG_ERROR("tensor %s: row of %lld is not valid for %s", t->name,
                     (long long)ne0, pd_dtype_name(dtype));
        return st ? st : PD_ERR_INVALID;
    }
    rng_seed(&r, seed, t->name);
    for (int64_t row = 0; row < rows; row += rows_per_chunk) {
        int64_t nr = rows - row < rows_per_chunk ? rows - row : rows_per_chunk;
        size_t n = (size_t)(nr * ne0);
        for (size_t i = 0; i < n; i++)
            xbuf[i] =
                t->kind == KIND_NORM ? 1.0f + NORM_SPREAD * rng_sym(&r) : a * rng_sym(&r);
        convert(dtype, xbuf, n, obuf);
        if ((st = pd_gguf_writer_write(w, obuf, (size_t)nr * row_bytes)))
            return st;
    }
    return PD_OK;
}

static pd_status_t write_model(const options_t *o, const vocab_t *v, uint64_t *size_p,
                               size_t *n_params_p)
{
    pd_gguf_writer_t *w = NULL;
    size_t n_t = list_tensors(o->preset, v->n, NULL), n_params = 0;
    tensor_spec_t *specs = calloc(n_t, sizeof *specs);
    float *xbuf = malloc(CHUNK_ELEMS * sizeof *xbuf);
    void *obuf = malloc(CHUNK_ELEMS * sizeof(float));
    pd_status_t st = PD_ERR_NOMEM;
    if (!specs || !xbuf || !obuf)
        goto out_free_buffers;
    list_tensors(o->preset, v->n, specs);
    if ((st = pd_gguf_writer_new(o->out_path, 32, &w)) || (st = add_metadata(w, o, v)))
        goto out_destroy_writer;
    for (size_t i = 0; i < n_t; i++) {
        pd_dtype_t dt = specs[i].kind == KIND_NORM ? PD_DTYPE_F32 : o->dtype->dtype;
        if ((st = pd_gguf_writer_add_tensor(w, specs[i].name, dt, specs[i].n_dims,
                                            specs[i].ne)))
            goto out_destroy_writer;
        n_params +=
            (size_t)(specs[i].ne[0] * (specs[i].n_dims == 2 ? specs[i].ne[1] : 1));
    }
    if ((st = pd_gguf_writer_begin_data(w)))
        goto out_destroy_writer;
    for (size_t i = 0; i < n_t; i++) {
        pd_dtype_t dt = specs[i].kind == KIND_NORM ? PD_DTYPE_F32 : o->dtype->dtype;
        if ((st = write_tensor(w, &specs[i], dt, o->seed, xbuf, obuf)))
            goto out_destroy_writer;
    }
    if ((st = pd_gguf_writer_finish(w)))
        goto out_destroy_writer;
    *size_p = pd_gguf_writer_file_size(w);
    *n_params_p = n_params;

out_destroy_writer:
    pd_gguf_writer_destroy(&w); /* removes the partial file unless finished */
out_free_buffers:
    free(obuf);
    free(xbuf);
    free(specs);
    return st;
}

/* ---- command line -------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pdctl mkmodel --preset 15M|110M|1B --dtype f32|f16|q8_0|q4_0\n"
            "                     [--seed N] [--ctx N] -o FILE.gguf [--tokenizer TOKENIZER.bin]\n"
            "Writes a llama.cpp-compatible GGUF with random weights (deterministic from\n"
            "the seed, default 1) and the vocabulary of a llama2.c tokenizer.bin\n"
            "(default: $PD_SHARED_DIR/%s, then ../shared/%s).\n"
            "--ctx sets the declared context length (presets: 15M 256, 110M 1024,\n"
            "1B 2048); the weights do not depend on it.\n",
            DEFAULT_TOKENIZER, DEFAULT_TOKENIZER);
}

/* Returns 0, or 2 for a usage error (reported on stderr). */
static int parse_args(int argc, char **argv, options_t *o)
{
    memset(o, 0, sizeof *o);
    o->seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 1;
        }
        if (!val) {
            fprintf(stderr, "pdctl mkmodel: unknown option or missing value: %s\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--preset")) {
            for (size_t k = 0; k < sizeof presets / sizeof presets[0]; k++)
                if (!strcasecmp(val, presets[k].name))
                    o->preset = &presets[k];
            if (!o->preset) {
                fprintf(stderr, "pdctl mkmodel: unknown preset %s (15M, 110M, 1B)\n",
                        val);
                return 2;
            }
        } else if (!strcmp(a, "--dtype")) {
            for (size_t k = 0; k < sizeof dtypes / sizeof dtypes[0]; k++)
                if (!strcasecmp(val, dtypes[k].name))
                    o->dtype = &dtypes[k];
            if (!o->dtype) {
                fprintf(stderr, "pdctl mkmodel: unknown dtype %s (f32 f16 q8_0 q4_0)\n",
                        val);
                return 2;
            }
        } else if (!strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            o->seed = strtoull(val, &end, 0);
            if (errno || end == val || *end || *val == '-') {
                fprintf(stderr, "pdctl mkmodel: bad seed %s\n", val);
                return 2;
            }
        } else if (!strcmp(a, "--ctx")) {
            char *end;
            errno = 0;
            o->ctx = strtol(val, &end, 10);
            if (errno || end == val || *end || o->ctx < 1 || o->ctx > (1 << 20)) {
                fprintf(stderr, "pdctl mkmodel: bad context length %s\n", val);
                return 2;
            }
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            o->out_path = val;
        } else if (!strcmp(a, "--tokenizer")) {
            o->tokenizer_path = val;
        } else {
            fprintf(stderr, "pdctl mkmodel: unknown option %s\n", a);
            return 2;
        }
    }
    if (!o->preset || !o->dtype || !o->out_path) {
        fprintf(stderr, "pdctl mkmodel: --preset, --dtype and -o are required\n");
        usage(stderr);
        return 2;
    }
    if (o->ctx) {
        o->custom = *o->preset;
        o->custom.ctx_len = (int32_t)o->ctx;
        o->preset = &o->custom;
    }
    return 0;
}

int pd_cmd_mkmodel(int argc, char **argv)
{
    options_t o;
    vocab_t v;
    char tok_path[PATH_MAX];
    uint64_t size = 0;
    size_t n_params = 0;
    int rc = parse_args(argc, argv, &o);
    if (rc)
        return rc == 1 ? 0 : rc;
    if (o.tokenizer_path) {
        snprintf(tok_path, sizeof tok_path, "%s", o.tokenizer_path);
    } else if (find_tokenizer(tok_path, sizeof tok_path)) {
        fprintf(stderr,
                "pdctl mkmodel: cannot find %s (looked in $PD_SHARED_DIR, "
                "../shared and beside the binary); pass --tokenizer PATH\n",
                DEFAULT_TOKENIZER);
        return 1;
    }
    if (vocab_load(tok_path, &v))
        return 1;
    size_t n_vocab = v.n;
    pd_status_t st = write_model(&o, &v, &size, &n_params);
    vocab_free(&v);
    if (st) {
        fprintf(stderr, "pdctl mkmodel: writing %s failed: %s\n", o.out_path,
                pd_status_str(st));
        return 1;
    }
    printf("wrote %s: preset %s, %s, seed %llu, %zu tokens, %zu parameters, %llu bytes\n",
           o.out_path, o.preset->name, o.dtype->name, (unsigned long long)o.seed, n_vocab,
           n_params, (unsigned long long)size);
    return 0;
}
