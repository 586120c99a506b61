/* test_model_corrupt.c - the loaders on hostile input: every real model file is
 * copied to a temp file and (a) truncated at many offsets, (b) overwritten with
 * hostile values at the offsets of its structural fields (found by walking the
 * original) and at a stride of blind offsets, plus (c) hand-crafted GGUF files with
 * one fault each, and hostile llama2.c headers. Each open must either fail with a
 * negative status and a logged error, or succeed with a model whose every tensor
 * matches its configuration and lies inside readable memory. Nothing may crash;
 * the ASan/UBSan build runs the same suite.
 * Threading: single-threaded; Check forks per test. */
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/gguf.h"
#include "common/model.h"
#include "support/ggufbuild.h"
#include "support/pdcheck.h"

/* ---- the real models ---- */

typedef struct target {
    const char *model;
    const char *tok; /* NULL: the GGUF's own vocabulary */
} target_t;

static const target_t targets[] = {
    {"stories260K.gguf", NULL},
    {"llama2xs_tok512_280K.gguf", NULL},
    {"llama-2-tiny-random.gguf", NULL},
    {"stories260K.bin", "tok512.bin"},
    {"llama2xs_tok512_280K.bin", "tok512.bin"},
    {"babyllama_tok105.bin", "tok105.bin"},
    {"aidreams260K.bin", "aidreams_tok512.bin"},
};
#define N_TARGETS      ((int)(sizeof targets / sizeof targets[0]))
#define N_GGUF_TARGETS 3

/* A temp copy with the original's suffix, held open for pwrite/ftruncate. */
typedef struct work {
    char path[128];
    int fd;
    char tok[4096]; /* empty: none */
    uint8_t *orig;
    size_t size;
    int is_gguf;
    int n_ok, n_fail;
} work_t;

static void work_write(work_t *w, const uint8_t *p, size_t n)
{
    ck_assert_int_eq(ftruncate(w->fd, 0), 0);
    ck_assert_int_eq(pwrite(w->fd, p, n, 0), (ssize_t)n);
}

static void work_init(work_t *w, const target_t *t)
{
    memset(w, 0, sizeof *w);
    w->orig = pd_test_read_file(pd_test_model_path(t->model), &w->size);
    w->is_gguf = strstr(t->model, ".gguf") != NULL;
    w->fd =
        pd_test_temp_fd("model_", w->is_gguf ? ".gguf" : ".bin", w->path, sizeof w->path);
    if (t->tok)
        snprintf(w->tok, sizeof w->tok, "%s", pd_test_model_path(t->tok));
    work_write(w, w->orig, w->size);
}

static void work_fini(work_t *w, const char *test)
{
    fprintf(stderr, "%s %s: %d opens failed cleanly, %d opened and checked\n", test,
            w->path, w->n_fail, w->n_ok);
    close(w->fd);
    unlink(w->path);
    free(w->orig);
}

/* Every tensor of an opened model matches its configuration and is readable. */
static void check_consistent(const pd_model_t *m)
{
    const pd_model_config_t *c = pd_model_config(m);
    ck_assert(c->dim > 0 && c->n_heads > 0 && c->dim % c->n_heads == 0);
    ck_assert(c->n_kv_heads > 0 && c->n_heads % c->n_kv_heads == 0);
    ck_assert_int_eq(c->head_dim, c->dim / c->n_heads);
    ck_assert(c->vocab_size > 0 && c->ctx_len > 0 && c->n_layers > 0 &&
              c->hidden_dim > 0);
    ck_assert(c->norm_eps > 0 && isfinite(c->rope_theta) && c->rope_theta > 0);
    ck_assert_int_eq(pd_tokenizer_n_vocab(pd_model_tokenizer(m)), c->vocab_size);
    const pd_model_weights_t *w = pd_model_weights(m);
    int64_t q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim;
    struct {
        const pd_tensor_t *t;
        int64_t ne0, ne1;
    } want[3 + 9] = {{&w->tok_embd, c->dim, c->vocab_size},
                     {&w->output, c->dim, c->vocab_size},
                     {&w->output_norm, c->dim, 1}};
    unsigned sum = 0;
    for (int i = -1; i < c->n_layers; i++) {
        int n = 3;
        if (i >= 0) {
            const pd_layer_weights_t *l = &w->layers[i];
            n = 9;
            want[0] = (typeof(want[0])){&l->attn_norm, c->dim, 1};
            want[1] = (typeof(want[0])){&l->ffn_norm, c->dim, 1};
            want[2] = (typeof(want[0])){&l->wq, c->dim, q};
            want[3] = (typeof(want[0])){&l->wk, c->dim, kv};
            want[4] = (typeof(want[0])){&l->wv, c->dim, kv};
            want[5] = (typeof(want[0])){&l->wo, q, c->dim};
            want[6] = (typeof(want[0])){&l->w_gate, c->dim, c->hidden_dim};
            want[7] = (typeof(want[0])){&l->w_down, c->hidden_dim, c->dim};
            want[8] = (typeof(want[0])){&l->w_up, c->dim, c->hidden_dim};
        }
        for (int k = 0; k < n; k++) {
            const pd_tensor_t *t = want[k].t;
            size_t bytes;
            ck_assert(t->ne[0] == want[k].ne0 && t->ne[1] == want[k].ne1);
            ck_assert(t->ne[2] == 1 && t->ne[3] == 1);
            ck_assert_int_eq(pd_tensor_size(t->dtype, t->ne, 2, &bytes), PD_OK);
            ck_assert_uint_eq(bytes, t->nbytes);
            if (want[k].ne1 == 1 && (i >= 0 ? k < 2 : k == 2))
                ck_assert_int_eq(t->dtype, PD_DTYPE_F32);
            for (size_t b = 0; b < t->nbytes; b += 61)
                sum += ((const uint8_t *)t->data)[b];
            sum += ((const uint8_t *)t->data)[t->nbytes - 1];
        }
    }
    (void)sum;
    /* the tokenizer built from the (possibly mutated) vocabulary must work too */
    int32_t ids[64];
    size_t n_ids = 0;
    static const char text[] = "Once upon a time, \xe2\x96\x81 there was a <s> cat.\xff";
    pd_status_t st = pd_tokenizer_encode(pd_model_tokenizer(m), text, sizeof text - 1,
                                         true, ids, 64, &n_ids);
    ck_assert(st == PD_OK || st == PD_ERR_RANGE);
    pd_detok_t d;
    pd_detok_init(&d, pd_model_tokenizer(m));
    char out[4096];
    for (size_t i = 0; i < n_ids && i < 64; i++)
        pd_detok_feed(&d, ids[i], out, sizeof out);
    pd_detok_flush(&d, out, sizeof out);
}

/* Opens the work file; a failure must be negative and logged, a success consistent. */
static pd_status_t try_open(work_t *w, const char *what, size_t at)
{
    int before = pd_test_n_errors;
    pd_model_t *m = NULL;
    pd_status_t st = pd_model_open(w->path, w->tok[0] ? w->tok : NULL, &m);
    if (st == PD_OK) {
        ck_assert_ptr_nonnull(m);
        check_consistent(m);
        pd_model_destroy(&m);
        w->n_ok++;
    } else {
        ck_assert_msg(st < 0, "%s at %zu: status %d", what, at, st);
        ck_assert_ptr_null(m);
        ck_assert_msg(pd_test_n_errors > before, "%s at %zu: %s without an error logged",
                      what, at, pd_status_str(st));
        w->n_fail++;
    }
    return st;
}

/* ---- (a) truncation ---- */

/* End of the GGUF header (tensor infos) or of the llama2.c header. */
static size_t header_end(const work_t *w);

START_TEST(test_truncate)
{
    work_t w;
    work_init(&w, &targets[_i]);
    size_t hend = header_end(&w);
    size_t stride = hend / 400 + 1;
    /* from long to short, so each step is one ftruncate */
    size_t offs[1200];
    int n = 0;
    offs[n++] = w.size - 1;
    for (int k = 23; k >= 1; k--)
        offs[n++] = hend + (w.size - hend) / 24 * (size_t)k;
    for (size_t o = hend + 64; o > 64 && n < 1100; o -= stride)
        offs[n++] = o;
    for (int o = 64; o >= 0; o--)
        offs[n++] = (size_t)o;
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq(ftruncate(w.fd, (off_t)offs[i]), 0);
        ck_assert_int_ne(try_open(&w, "truncated", offs[i]), PD_OK);
    }
    /* and one byte too many */
    work_write(&w, w.orig, w.size);
    ck_assert_int_eq(pwrite(w.fd, "\0\0\0\0", 4, (off_t)w.size), 4);
    if (!w.is_gguf)
        ck_assert_int_ne(try_open(&w, "extended", w.size), PD_OK);
    /* the untouched copy still opens */
    work_write(&w, w.orig, w.size);
    ck_assert_int_eq(try_open(&w, "original", 0), PD_OK);
    ck_assert_int_ge(w.n_fail, 60);
    work_fini(&w, "truncate");
}
END_TEST

/* ---- (b) structural mutation of the real GGUF files ---- */

typedef enum field_kind {
    F_COUNT,  /* u64: string length, array count, n_tensors, n_kv */
    F_TYPE,   /* u32: value type, array element type, tensor type, n_dims, version */
    F_NE,     /* u64 tensor dimension */
    F_TOFF,   /* u64 tensor data offset */
    F_VALU32, /* u32 scalar value */
    F_VALF32, /* f32 scalar value */
    F_NAME,   /* first byte of a key or tensor name */
    F_ELEM,   /* first element of a numeric array (4 bytes) */
} field_kind_t;

typedef struct field {
    size_t off;
    field_kind_t kind;
} field_t;

typedef struct walker {
    const uint8_t *p;
    size_t pos;
    field_t *fields;
    int n, cap;
} walker_t;

static void add_field(walker_t *k, size_t off, field_kind_t kind)
{
    if (k->n < k->cap)
        k->fields[k->n++] = (field_t){off, kind};
}

static uint64_t w_u64(walker_t *k)
{
    uint64_t v;
    memcpy(&v, k->p + k->pos, 8);
    k->pos += 8;
    return v;
}

static uint32_t w_u32(walker_t *k)
{
    uint32_t v;
    memcpy(&v, k->p + k->pos, 4);
    k->pos += 4;
    return v;
}

static void w_str(walker_t *k, int record)
{
    if (record) {
        add_field(k, k->pos, F_COUNT);
        add_field(k, k->pos + 8, F_NAME);
    }
    k->pos += (size_t)w_u64(k);
}

static size_t elem_size(uint32_t t)
{
    static const size_t sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < 13 ? sz[t] : 0;
}

static void walk_value(walker_t *k, uint32_t type)
{
    if (type == PD_GGUF_TYPE_STRING) {
        w_str(k, 1);
    } else if (type == PD_GGUF_TYPE_ARRAY) {
        add_field(k, k->pos, F_TYPE);
        uint32_t et = w_u32(k);
        add_field(k, k->pos, F_COUNT);
        uint64_t n = w_u64(k);
        if (et == PD_GGUF_TYPE_STRING) {
            uint64_t stride = n / 6 + 1;
            for (uint64_t i = 0; i < n; i++)
                w_str(k, i < 2 || i + 1 == n || i % stride == 0);
        } else {
            if (n > 0 && elem_size(et) == 4)
                add_field(k, k->pos, F_ELEM);
            k->pos += (size_t)n * elem_size(et);
        }
    } else {
        if (type == PD_GGUF_TYPE_U32)
            add_field(k, k->pos, F_VALU32);
        if (type == PD_GGUF_TYPE_F32)
            add_field(k, k->pos, F_VALF32);
        k->pos += elem_size(type);
    }
}

/* Lists the fields of a valid GGUF file; returns the end of the tensor infos. */
static size_t walk_gguf(const uint8_t *p, field_t *fields, int cap, int *n_p)
{
    walker_t k = {.p = p, .pos = 4, .fields = fields, .cap = cap};
    add_field(&k, 4, F_TYPE);
    add_field(&k, 8, F_COUNT);
    add_field(&k, 16, F_COUNT);
    k.pos = 8;
    uint64_t n_tensors = w_u64(&k), n_kv = w_u64(&k);
    for (uint64_t i = 0; i < n_kv; i++) {
        w_str(&k, 1);
        add_field(&k, k.pos, F_TYPE);
        walk_value(&k, w_u32(&k));
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        int record = i < 13 || i + 1 == n_tensors;
        w_str(&k, record);
        if (record)
            add_field(&k, k.pos, F_TYPE);
        uint32_t nd = w_u32(&k);
        for (uint32_t d = 0; d < nd; d++) {
            if (record)
                add_field(&k, k.pos, F_NE);
            k.pos += 8;
        }
        if (record) {
            add_field(&k, k.pos, F_TYPE);
            add_field(&k, k.pos + 4, F_TOFF);
        }
        k.pos += 12;
    }
    *n_p = k.n;
    return k.pos;
}

static size_t header_end(const work_t *w)
{
    if (!w->is_gguf)
        return 28;
    static field_t scratch[4096];
    int n;
    return walk_gguf(w->orig, scratch, 4096, &n);
}

/* The hostile values tried for a field, as 8 little-endian bytes; returns the count. */
static int hostile_values(field_kind_t kind, uint64_t orig, size_t file_size, uint64_t *v)
{
    int n = 0;
    switch (kind) {
    case F_COUNT:
    case F_NE:
        v[n++] = 0;
        v[n++] = orig + 1;
        v[n++] = orig - 1;
        v[n++] = orig * 2;
        v[n++] = 1ull << 32;
        v[n++] = 1ull << 62;
        v[n++] = 1ull << 63;
        v[n++] = ~0ull;
        v[n++] = file_size;
        break;
    case F_TOFF:
        v[n++] = orig + 1;
        v[n++] = orig + 32;
        v[n++] = orig - 32;
        v[n++] = file_size;
        v[n++] = 1ull << 62;
        v[n++] = ~0ull - 31;
        v[n++] = 0;
        break;
    case F_TYPE:
        v[n++] = 0;
        v[n++] = 1;
        v[n++] = 2;
        v[n++] = 5;
        v[n++] = 8;
        v[n++] = 9;
        v[n++] = 12;
        v[n++] = 13;
        v[n++] = 30;
        v[n++] = 0xffffffffu;
        v[n++] = (orig + 1) & 0xffffffffu;
        break;
    case F_VALU32:
        v[n++] = 0;
        v[n++] = 1;
        v[n++] = (orig + 1) & 0xffffffffu;
        v[n++] = (orig * 2) & 0xffffffffu;
        v[n++] = 0x7fffffff;
        v[n++] = 0xffffffffu;
        break;
    case F_VALF32:
        v[n++] = 0;
        v[n++] = 0xbf800000u;
        v[n++] = 0x7fc00000u;
        v[n++] = 0x7f800000u;
        v[n++] = 0x7149f2cau; /* 1e30 */
        break;
    case F_NAME:
        v[n++] = 'x';
        v[n++] = 0;
        v[n++] = 0xff;
        break;
    case F_ELEM:
        v[n++] = 0xffffffffu;
        v[n++] = 7;
        v[n++] = 0x7fc00000u;
        break;
    }
    return n;
}

static size_t field_width(field_kind_t kind)
{
    switch (kind) {
    case F_COUNT:
    case F_NE:
    case F_TOFF:
        return 8;
    case F_NAME:
        return 1;
    default:
        return 4;
    }
}

START_TEST(test_mutate_gguf_fields)
{
    work_t w;
    work_init(&w, &targets[_i]);
    static field_t fields[4096];
    int n_fields;
    walk_gguf(w.orig, fields, 4096, &n_fields);
    ck_assert_int_gt(n_fields, 50);
    int n_tries = 0;
    for (int f = 0; f < n_fields; f++) {
        size_t off = fields[f].off, width = field_width(fields[f].kind);
        uint64_t orig = 0, vals[16];
        memcpy(&orig, w.orig + off, width);
        int nv = hostile_values(fields[f].kind, orig, w.size, vals);
        for (int j = 0; j < nv; j++) {
            if (memcmp(&vals[j], &orig, width) == 0)
                continue;
            ck_assert_int_eq(pwrite(w.fd, &vals[j], width, (off_t)off), (ssize_t)width);
            try_open(&w, "field mutation", off);
            n_tries++;
        }
        ck_assert_int_eq(pwrite(w.fd, w.orig + off, width, (off_t)off), (ssize_t)width);
    }
    ck_assert_int_eq(try_open(&w, "restored", 0), PD_OK);
    ck_assert_int_gt(n_tries, 300);
    ck_assert_int_gt(w.n_fail, n_tries / 2);
    work_fini(&w, "mutate_gguf_fields");
}
END_TEST

/* Blind overwrites at a stride through the header and a spread through the data. */
START_TEST(test_mutate_blind)
{
    work_t w;
    work_init(&w, &targets[_i]);
    size_t hend = header_end(&w);
    size_t stride = w.is_gguf ? hend / 150 + 1 : 1;
    static const uint8_t pats[3][8] = {
        {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
        {0, 0, 0, 0, 0, 0, 0, 0},
        {0, 0, 0, 0, 0, 0, 0, 0x80},
    };
    for (size_t off = 0; off < hend; off += stride) {
        size_t width = off + 8 <= w.size ? 8 : w.size - off;
        for (int p = 0; p < 3; p++) {
            ck_assert_int_eq(pwrite(w.fd, pats[p], width, (off_t)off), (ssize_t)width);
            try_open(&w, "blind overwrite", off);
        }
        ck_assert_int_eq(pwrite(w.fd, w.orig + off, width, (off_t)off), (ssize_t)width);
    }
    /* weight bytes are not validated: overwriting them keeps the model loadable */
    for (int k = 1; k < 8; k++) {
        size_t off = hend + (w.size - hend) / 8 * (size_t)k;
        ck_assert_int_eq(pwrite(w.fd, pats[0], 8, (off_t)off), 8);
        ck_assert_int_eq(try_open(&w, "weight overwrite", off), PD_OK);
        ck_assert_int_eq(pwrite(w.fd, w.orig + off, 8, (off_t)off), 8);
    }
    ck_assert_int_gt(w.n_fail, 40);
    work_fini(&w, "mutate_blind");
}
END_TEST

/* ---- llama2.c headers ---- */

START_TEST(test_llama2c_header)
{
    work_t w;
    work_init(&w, &targets[N_GGUF_TARGETS + _i]);
    int32_t h[7];
    memcpy(h, w.orig, sizeof h);
    for (int f = 0; f < 7; f++) {
        const int32_t vals[] = {0,        -1,       1,     3,       INT32_MIN, INT32_MAX,
                                h[f] + 1, h[f] * 2, -h[f], 1 << 20, h[f] - 1,  1 << 16};
        for (size_t j = 0; j < sizeof vals / sizeof vals[0]; j++) {
            if (vals[j] == h[f])
                continue;
            ck_assert_int_eq(pwrite(w.fd, &vals[j], 4, f * 4), 4);
            /* every change alters the size the header implies: all must fail */
            ck_assert_int_ne(try_open(&w, "llama2c header", (size_t)f * 4), PD_OK);
        }
        ck_assert_int_eq(pwrite(w.fd, &h[f], 4, f * 4), 4);
    }
    /* a negative vocab_size with the classifier appended is valid */
    int32_t neg = -h[5];
    ck_assert_int_eq(pwrite(w.fd, &neg, 4, 20), 4);
    size_t cls = (size_t)h[5] * (size_t)h[0] * 4;
    uint8_t *extra = malloc(cls);
    for (size_t i = 0; i < cls; i++)
        extra[i] = (uint8_t)(i * 7);
    ck_assert_int_eq(pwrite(w.fd, extra, cls, (off_t)w.size), (ssize_t)cls);
    free(extra);
    ck_assert_int_eq(try_open(&w, "unshared classifier", 0), PD_OK);
    pd_model_t *m = NULL;
    ck_assert_int_eq(pd_model_open(w.path, w.tok, &m), PD_OK);
    const pd_model_weights_t *wt = pd_model_weights(m);
    ck_assert(wt->output.data != wt->tok_embd.data);
    ck_assert_uint_eq(pd_model_file_bytes(m), w.size + cls);
    ck_assert_int_eq(((const uint8_t *)wt->output.data)[7], 49);
    pd_model_destroy(&m);
    ck_assert_int_ge(w.n_fail, 70);
    work_fini(&w, "llama2c_header");
}
END_TEST

/* ---- (c) hand-crafted GGUF files ---- */

typedef enum fault {
    OK_F32,
    OK_Q8_0,
    OK_Q4_0,
    OK_F16,
    OK_BF16,
    OK_MIXED,
    OK_NO_OUTPUT,
    OK_V2,
    BAD_MAGIC,
    BAD_V1,
    BAD_V99,
    BAD_BIG_ENDIAN,
    BAD_NKV_HUGE,
    BAD_NT_HUGE,
    BAD_NKV_PLUS1,
    BAD_KEYLEN_HUGE,
    BAD_STRLEN_HUGE,
    BAD_ARR_HUGE,
    BAD_NUMARR_HUGE,
    BAD_NESTED,
    BAD_VTYPE,
    BAD_ETYPE,
    BAD_DUP_KEY,
    BAD_EMPTY_KEY,
    BAD_NDIMS5,
    BAD_NDIMS0,
    BAD_NE0,
    BAD_NE_OVERFLOW,
    BAD_NE_SIGN,
    BAD_OFF_EOF,
    BAD_OFF_HUGE,
    BAD_OFF_MISALIGNED,
    BAD_ALIGN0,
    BAD_ALIGN3,
    BAD_ALIGN_TYPE,
    BAD_TYPE_Q4_K,
    BAD_TYPE_INVALID,
    BAD_Q8_NE0,
    BAD_DUP_TENSOR,
    BAD_NAME_NUL,
    BAD_TRUNC_DATA,
    /* valid GGUF, invalid model */
    BAD_ARCH,
    BAD_MISSING_KEY,
    BAD_KEY_TYPE,
    BAD_SHAPE,
    BAD_NORM_F16,
    BAD_MISSING_TENSOR,
    BAD_ROPE_DIMS,
    BAD_HEADS,
    BAD_KV_HEADS,
    BAD_VOCAB,
    BAD_EPS,
    BAD_3D,
    N_FAULTS
} fault_t;
#define FIRST_BAD       BAD_MAGIC
#define FIRST_MODEL_BAD BAD_ARCH

/* The tiny model: dim 32, 4 heads of 8, 2 kv heads, ffn 64, 1 layer, 6 tokens. */
enum { T_DIM = 32, T_HID = 64, T_HEADS = 4, T_KV = 2, T_HD = 8, T_VOCAB = 6 };

typedef struct tspec {
    const char *name;
    uint32_t type, n_dims;
    uint64_t ne[4];
} tspec_t;

static int tensor_list(fault_t f, tspec_t *ts)
{
    uint32_t mat = f == OK_Q8_0   ? PD_DTYPE_Q8_0
                   : f == OK_Q4_0 ? PD_DTYPE_Q4_0
                   : f == OK_F16  ? PD_DTYPE_F16
                   : f == OK_BF16 ? PD_DTYPE_BF16
                                  : PD_DTYPE_F32;
    uint64_t vocab = f == BAD_VOCAB ? T_VOCAB + 1 : T_VOCAB;
    int n = 0;
    ts[n++] = (tspec_t){"token_embd.weight", mat, 2, {T_DIM, vocab, 1, 1}};
    ts[n++] = (tspec_t){"output_norm.weight", PD_DTYPE_F32, 1, {T_DIM, 1, 1, 1}};
    if (f != OK_NO_OUTPUT)
        ts[n++] = (tspec_t){"output.weight", mat, 2, {T_DIM, vocab, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.attn_norm.weight",
                        f == BAD_NORM_F16 ? PD_DTYPE_F16 : PD_DTYPE_F32,
                        1,
                        {T_DIM, 1, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.attn_q.weight",
                        f == OK_MIXED ? PD_DTYPE_Q8_0 : mat,
                        2,
                        {T_DIM, f == BAD_SHAPE ? T_DIM / 2 : T_DIM, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.attn_k.weight", mat, 2, {T_DIM, T_KV * T_HD, 1, 1}};
    ts[n++] = (tspec_t){
        "blk.0.attn_v.weight", mat, f == BAD_3D ? 3 : 2, {T_DIM, T_KV * T_HD, 2, 1}};
    ts[n++] = (tspec_t){"blk.0.attn_output.weight", mat, 2, {T_DIM, T_DIM, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.ffn_norm.weight", PD_DTYPE_F32, 1, {T_DIM, 1, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.ffn_gate.weight", mat, 2, {T_DIM, T_HID, 1, 1}};
    ts[n++] = (tspec_t){"blk.0.ffn_down.weight", mat, 2, {T_HID, T_DIM, 1, 1}};
    if (f != BAD_MISSING_TENSOR)
        ts[n++] = (tspec_t){"blk.0.ffn_up.weight", mat, 2, {T_DIM, T_HID, 1, 1}};
    if (f == BAD_DUP_TENSOR) {
        ts[n] = ts[n - 1];
        n++;
    }
    return n;
}

/* The tokenizer metadata of the tiny model with fault f applied. */
static void build_vocab_kvs(fault_t f, pd_gb_t *b)
{
    pd_gb_kv_str(b, "tokenizer.ggml.model", "llama");
    static const char *const toks[T_VOCAB] = {"<unk>", "<s>", "</s>",
                                              "a",     "b",   "\xe2\x96\x81\x61"};
    pd_gb_arr(b, "tokenizer.ggml.tokens", f == BAD_ETYPE ? 99 : PD_GGUF_TYPE_STRING,
              f == BAD_ARR_HUGE ? 1ull << 63 : T_VOCAB);
    for (int i = 0; i < T_VOCAB; i++)
        pd_gb_str(b, toks[i]);
    pd_gb_arr(b, "tokenizer.ggml.scores", PD_GGUF_TYPE_F32,
              f == BAD_NUMARR_HUGE ? (1ull << 62) + 1 : T_VOCAB);
    const float scores[T_VOCAB] = {0, 0, 0, -1, -2, -3};
    pd_gb_put(b, scores, sizeof scores);
    pd_gb_arr(b, "tokenizer.ggml.token_type", PD_GGUF_TYPE_I32, T_VOCAB);
    const int32_t types[T_VOCAB] = {2, 3, 3, 1, 1, 1};
    pd_gb_put(b, types, sizeof types);
}

/* The metadata of the tiny model with fault f applied. */
static void build_kvs(fault_t f, pd_gb_t *b)
{
    if (f == BAD_KEYLEN_HUGE) {
        pd_gb_strn(b, "general.architecture", 1ull << 63, 20); /* the key */
        pd_gb_u32(b, PD_GGUF_TYPE_STRING);
        pd_gb_str(b, "llama");
        b->n_kv++;
    } else if (f == BAD_STRLEN_HUGE) {
        pd_gb_key(b, "general.architecture", PD_GGUF_TYPE_STRING);
        pd_gb_strn(b, "llama", 1ull << 63, 5);
    } else if (f == BAD_EMPTY_KEY)
        pd_gb_kv_str(b, "", "llama");
    else
        pd_gb_kv_str(b, "general.architecture", f == BAD_ARCH ? "gpt2" : "llama");
    if (f == BAD_DUP_KEY)
        pd_gb_kv_u32(b, "llama.block_count", 1);
    if (f == BAD_ALIGN0 || f == BAD_ALIGN3)
        pd_gb_kv_u32(b, "general.alignment", f == BAD_ALIGN0 ? 0 : 3);
    if (f == BAD_ALIGN_TYPE) {
        pd_gb_key(b, "general.alignment", PD_GGUF_TYPE_U64);
        pd_gb_u64(b, 32);
    }
    pd_gb_kv_u32(b, "llama.embedding_length", T_DIM);
    pd_gb_kv_u32(b, "llama.feed_forward_length", T_HID);
    if (f != BAD_MISSING_KEY)
        pd_gb_kv_u32(b, "llama.block_count", 1);
    pd_gb_kv_u32(b, "llama.attention.head_count", f == BAD_HEADS ? 3 : T_HEADS);
    pd_gb_kv_u32(b, "llama.attention.head_count_kv", f == BAD_KV_HEADS ? 0 : T_KV);
    if (f == BAD_KEY_TYPE)
        pd_gb_kv_str(b, "llama.context_length", "64");
    else
        pd_gb_kv_u32(b, "llama.context_length", 64);
    pd_gb_kv_u32(b, "llama.rope.dimension_count", f == BAD_ROPE_DIMS ? T_HD / 2 : T_HD);
    pd_gb_key(b, "llama.attention.layer_norm_rms_epsilon", PD_GGUF_TYPE_F32);
    float eps = f == BAD_EPS ? -1.0f : 1e-5f;
    pd_gb_put(b, &eps, 4);
    pd_gb_key(b, "llama.rope.freq_base", f == BAD_VTYPE ? 13 : PD_GGUF_TYPE_F32);
    float theta = 10000.0f;
    pd_gb_put(b, &theta, 4);
    build_vocab_kvs(f, b);
    if (f == BAD_NESTED) { /* [[u8 'x']] */
        pd_gb_arr(b, "nested", PD_GGUF_TYPE_ARRAY, 1);
        pd_gb_u32(b, PD_GGUF_TYPE_U8);
        pd_gb_u64(b, 1);
        pd_gb_put(b, "x", 1);
    }
}

static void put_tensor_info(fault_t f, pd_gb_t *b, const tspec_t *t, int first,
                            uint64_t off, uint64_t size_guess)
{
    if (f == BAD_NAME_NUL && first)
        pd_gb_strn(b, "tok\0embd", 8, 8);
    else
        pd_gb_str(b, t->name);
    uint32_t nd = t->n_dims;
    if (first && (f == BAD_NDIMS5 || f == BAD_NDIMS0))
        nd = f == BAD_NDIMS5 ? 5 : 0;
    pd_gb_u32(b, nd);
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t ne = d < 4 ? t->ne[d] : 1;
        if (first && f == BAD_NE0 && d == 1)
            ne = 0;
        if (first && f == BAD_NE_OVERFLOW)
            ne = 1ull << 32;
        if (first && f == BAD_NE_SIGN && d == 1)
            ne = 1ull << 63;
        if (first && f == BAD_Q8_NE0 && d == 0)
            ne = 8;
        pd_gb_u64(b, ne);
    }
    uint32_t type = t->type;
    if (first && (f == BAD_TYPE_Q4_K || f == BAD_TYPE_INVALID || f == BAD_Q8_NE0))
        type = f == BAD_TYPE_Q4_K ? 12 : f == BAD_TYPE_INVALID ? 1000 : PD_DTYPE_Q8_0;
    pd_gb_u32(b, type);
    if (first && f == BAD_OFF_EOF)
        off = size_guess;
    if (first && f == BAD_OFF_HUGE)
        off = ~0ull - 31;
    if (first && f == BAD_OFF_MISALIGNED)
        off += 4;
    pd_gb_u64(b, off);
}

/* A complete tiny GGUF llama model with fault f. */
static void build_gguf(fault_t f, pd_gb_t *b)
{
    pd_gb_t kvs = {0};
    build_kvs(f, &kvs);
    uint64_t n_kv = kvs.n_kv;
    tspec_t ts[16];
    int nt = tensor_list(f, ts);
    uint64_t sizes[16], offs[16], total = 0;
    for (int i = 0; i < nt; i++) {
        size_t bytes;
        ck_assert_int_eq(pd_tensor_size((pd_dtype_t)ts[i].type, (const int64_t *)ts[i].ne,
                                        (int)ts[i].n_dims, &bytes),
                         PD_OK);
        sizes[i] = bytes;
        offs[i] = total;
        total = (total + bytes + 31) / 32 * 32;
    }
    pd_gb_put(b, f == BAD_MAGIC ? "GGUG" : "GGUF", 4);
    uint32_t version = f == BAD_V1           ? 1
                       : f == BAD_V99        ? 99
                       : f == BAD_BIG_ENDIAN ? 3u << 24
                       : f == OK_V2          ? 2
                                             : 3;
    pd_gb_u32(b, version);
    pd_gb_u64(b, f == BAD_NT_HUGE ? 1ull << 62 : (uint64_t)nt);
    pd_gb_u64(b, f == BAD_NKV_HUGE ? 1ull << 62 : f == BAD_NKV_PLUS1 ? n_kv + 1 : n_kv);
    pd_gb_put(b, kvs.p, kvs.n);
    pd_gb_free(&kvs);
    for (int i = 0; i < nt; i++)
        put_tensor_info(f, b, &ts[i], i == 0, offs[i], total);
    pd_gb_pad(b, 32);
    for (uint64_t i = 0; i < total; i++) {
        uint8_t v = (uint8_t)(i * 131 + 7);
        pd_gb_put(b, &v, 1);
    }
    for (int i = 0; i < nt; i++) /* norms: F32 ones */
        if (ts[i].n_dims == 1 && ts[i].type == PD_DTYPE_F32)
            for (int j = 0; j < T_DIM; j++) {
                float one = 1.0f;
                memcpy(b->p + b->n - total + offs[i] + 4 * (size_t)j, &one, 4);
            }
    (void)sizes;
    if (f == BAD_TRUNC_DATA)
        b->n -= 1;
}

static const char *fault_want_dtype(fault_t f)
{
    switch (f) {
    case OK_Q8_0:
        return "q8_0";
    case OK_Q4_0:
        return "q4_0";
    case OK_F16:
        return "f16";
    case OK_BF16:
        return "bf16";
    case OK_MIXED:
        return "mixed";
    default:
        return "f32";
    }
}

START_TEST(test_handcrafted)
{
    fault_t f = (fault_t)_i;
    pd_gb_t b = {0};
    build_gguf(f, &b);
    char path[128];
    pd_test_temp_write("hand_", ".gguf", b.p, b.n, path, sizeof path);
    pd_gb_free(&b);

    pd_gguf_t *g = NULL;
    pd_status_t st = pd_gguf_open(path, &g);
    if (f < FIRST_BAD || f >= FIRST_MODEL_BAD) {
        ck_assert_msg(st == PD_OK, "fault %d: gguf %s (%s)", f, pd_status_str(st),
                      pd_test_last_error);
        ck_assert_int_eq(pd_test_n_errors, 0);
        pd_gguf_destroy(&g);
    } else {
        ck_assert_msg(st < 0, "fault %d opened", f);
        ck_assert_ptr_null(g);
        /* exactly one line, naming file and byte */
        ck_assert_int_eq(pd_test_n_errors, 1);
        ck_assert_msg(strstr(pd_test_last_error, path) &&
                          strstr(pd_test_last_error, "byte "),
                      "%s", pd_test_last_error);
        pd_status_t want = PD_ERR_FORMAT;
        if (f == BAD_V1 || f == BAD_BIG_ENDIAN || f == BAD_NESTED || f == BAD_TYPE_Q4_K)
            want = PD_ERR_UNSUPPORTED;
        ck_assert_msg(st == want, "fault %d: %s (%s)", f, pd_status_str(st),
                      pd_test_last_error);
        if (f == BAD_TYPE_Q4_K)
            ck_assert(strstr(pd_test_last_error, "unsupported tensor type") &&
                      strstr(pd_test_last_error, "token_embd.weight"));
    }
    pd_test_n_errors = 0;
    pd_model_t *m = NULL;
    st = pd_model_open(path, NULL, &m);
    if (f < FIRST_BAD) {
        ck_assert_msg(st == PD_OK, "fault %d: model %s (%s)", f, pd_status_str(st),
                      pd_test_last_error);
        check_consistent(m);
        ck_assert_str_eq(pd_model_dtype_name(m), fault_want_dtype(f));
        const pd_model_weights_t *w = pd_model_weights(m);
        ck_assert_int_eq(w->output.data == w->tok_embd.data, f == OK_NO_OUTPUT);
        ck_assert_int_eq(pd_model_config(m)->n_kv_heads, T_KV);
        pd_model_destroy(&m);
    } else {
        ck_assert_msg(st < 0, "fault %d: model opened", f);
        ck_assert_ptr_null(m);
        ck_assert_int_ge(pd_test_n_errors, 1);
    }
    unlink(path);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("corrupt", 300, pd_test_log_setup, NULL);
    tcase_add_loop_test(tc, test_handcrafted, 0, N_FAULTS);
    tcase_add_loop_test(tc, test_truncate, 0, N_TARGETS);
    tcase_add_loop_test(tc, test_mutate_gguf_fields, 0, N_GGUF_TARGETS);
    tcase_add_loop_test(tc, test_mutate_blind, 0, N_TARGETS);
    tcase_add_loop_test(tc, test_llama2c_header, 0, N_TARGETS - N_GGUF_TARGETS);
    return pd_test_run("model_corrupt", tc);
}
