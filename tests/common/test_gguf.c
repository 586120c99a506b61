/* test_gguf.c - the GGUF reader against the shared model files (metadata values and
 * tensor shapes known from models/README.md) and against small files built here
 * for every value type, alignment, and the not-found / wrong-type / range contract.
 * Threading: single-threaded; Check forks per test. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "support/ggufbuild.h"
#include "support/pdcheck.h"

static pd_gguf_t *open_shared(const char *name)
{
    const char *path = pd_test_model_path(name);
    pd_gguf_t *g = NULL;
    pd_status_t st = pd_gguf_open(path, &g);
    ck_assert_msg(st == PD_OK, "open %s: %s (%s)", path, pd_status_str(st),
                  pd_test_last_error);
    ck_assert_int_eq(pd_test_n_errors, 0);
    return g;
}

static uint32_t u32_of(const pd_gguf_t *g, const char *key)
{
    uint32_t v = 0;
    pd_status_t st = pd_gguf_get_u32(g, key, &v);
    ck_assert_msg(st == PD_OK, "%s: %s", key, pd_status_str(st));
    return v;
}

static void expect_str(const pd_gguf_t *g, const char *key, const char *want)
{
    const char *s;
    size_t len;
    ck_assert_int_eq(pd_gguf_get_str(g, key, &s, &len), PD_OK);
    ck_assert_uint_eq(len, strlen(want));
    ck_assert(memcmp(s, want, len) == 0);
}

static void expect_arr_str(const pd_gguf_t *g, uint64_t i, const char *want)
{
    const char *s;
    size_t len;
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "tokenizer.ggml.tokens", i, &s, &len), PD_OK);
    ck_assert_msg(len == strlen(want) && memcmp(s, want, len) == 0, "token %llu",
                  (unsigned long long)i);
}

static void expect_tensor(const pd_gguf_t *g, const char *name, pd_dtype_t dtype,
                          int n_dims, int64_t ne0, int64_t ne1)
{
    pd_tensor_t t;
    ck_assert_msg(pd_gguf_find_tensor(g, name, &t) == PD_OK, "missing %s", name);
    ck_assert_int_eq(t.dtype, dtype);
    ck_assert_int_eq(t.n_dims, n_dims);
    ck_assert_int_eq(t.ne[0], ne0);
    ck_assert_int_eq(t.ne[1], ne1);
    ck_assert_int_eq(t.ne[2], 1);
    ck_assert_int_eq(t.ne[3], 1);
    ck_assert_uint_eq(t.nbytes, (size_t)(ne0 * ne1) * (dtype == PD_DTYPE_F32 ? 4 : 2));
    size_t size;
    const uint8_t *base = pd_gguf_data(g, &size);
    const uint8_t *d = t.data;
    ck_assert(d >= base && d + t.nbytes <= base + size);
}

/* Every tensor_at entry is findable by name and gives the same view. */
static void check_tensor_table(const pd_gguf_t *g, int64_t n_want)
{
    ck_assert_int_eq(pd_gguf_n_tensors(g), n_want);
    for (int64_t i = 0; i < n_want; i++) {
        const char *name;
        pd_tensor_t a, b;
        ck_assert_int_eq(pd_gguf_tensor_at(g, i, &name, &a), PD_OK);
        ck_assert_int_eq(pd_gguf_find_tensor(g, name, &b), PD_OK);
        ck_assert(a.data == b.data && a.nbytes == b.nbytes);
    }
    ck_assert_int_eq(pd_gguf_tensor_at(g, n_want, NULL, NULL), PD_ERR_RANGE);
    ck_assert_int_eq(pd_gguf_tensor_at(g, -1, NULL, NULL), PD_ERR_RANGE);
}

static void check_tok512_vocab(const pd_gguf_t *g)
{
    uint64_t n;
    ck_assert_int_eq(pd_gguf_get_arr_len(g, "tokenizer.ggml.tokens", &n), PD_OK);
    ck_assert_uint_eq(n, 512);
    expect_arr_str(g, 0, "<unk>");
    expect_arr_str(g, 1, "<s>");
    expect_arr_str(g, 2, "</s>");
    expect_arr_str(g, 3, "<0x00>");
    pd_gguf_type_t type;
    const void *data;
    ck_assert_int_eq(pd_gguf_get_arr(g, "tokenizer.ggml.scores", &type, &n, &data),
                     PD_OK);
    ck_assert_int_eq(type, PD_GGUF_TYPE_F32);
    ck_assert_uint_eq(n, 512);
    ck_assert_int_eq(pd_gguf_get_arr(g, "tokenizer.ggml.token_type", &type, &n, &data),
                     PD_OK);
    ck_assert_int_eq(type, PD_GGUF_TYPE_I32);
    int32_t tt[4];
    memcpy(tt, data, sizeof tt);
    ck_assert(tt[0] == 2 && tt[1] == 3 && tt[2] == 3 && tt[3] == 6);
    ck_assert_uint_eq(u32_of(g, "tokenizer.ggml.bos_token_id"), 1);
    ck_assert_uint_eq(u32_of(g, "tokenizer.ggml.eos_token_id"), 2);
    ck_assert_uint_eq(u32_of(g, "tokenizer.ggml.unknown_token_id"), 0);
}

/* The llama hyperparameters every shared GGUF carries, and its vocabulary size. */
typedef struct llama_hp {
    uint32_t embd, ffn, blocks, heads, kv_heads, ctx, rope_dims, vocab;
} llama_hp_t;

static void expect_llama(const pd_gguf_t *g, llama_hp_t w)
{
    expect_str(g, "general.architecture", "llama");
    ck_assert_uint_eq(u32_of(g, "llama.embedding_length"), w.embd);
    ck_assert_uint_eq(u32_of(g, "llama.feed_forward_length"), w.ffn);
    ck_assert_uint_eq(u32_of(g, "llama.block_count"), w.blocks);
    ck_assert_uint_eq(u32_of(g, "llama.attention.head_count"), w.heads);
    ck_assert_uint_eq(u32_of(g, "llama.attention.head_count_kv"), w.kv_heads);
    ck_assert_uint_eq(u32_of(g, "llama.context_length"), w.ctx);
    ck_assert_uint_eq(u32_of(g, "llama.rope.dimension_count"), w.rope_dims);
}

/* Every tensor of the model, shaped as w implies: matrices in mat, norms in F32. */
static void expect_llama_tensors(const pd_gguf_t *g, llama_hp_t w, pd_dtype_t mat)
{
    int64_t e = w.embd, f = w.ffn, q = (int64_t)w.heads * (w.embd / w.heads),
            kv = (int64_t)w.kv_heads * (w.embd / w.heads);
    expect_tensor(g, "token_embd.weight", mat, 2, e, w.vocab);
    expect_tensor(g, "output.weight", mat, 2, e, w.vocab);
    expect_tensor(g, "output_norm.weight", PD_DTYPE_F32, 1, e, 1);
    const struct {
        const char *name;
        int n_dims;
        int64_t ne0, ne1;
    } layer[] = {
        {"attn_norm", 1, e, 1}, {"ffn_norm", 1, e, 1}, {"attn_q", 2, e, q},
        {"attn_k", 2, e, kv},   {"attn_v", 2, e, kv},  {"attn_output", 2, q, e},
        {"ffn_gate", 2, e, f},  {"ffn_down", 2, f, e}, {"ffn_up", 2, e, f},
    };
    for (uint32_t l = 0; l < w.blocks; l++) {
        for (size_t k = 0; k < sizeof layer / sizeof layer[0]; k++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%u.%s.weight", l, layer[k].name);
            expect_tensor(g, name, layer[k].n_dims == 1 ? PD_DTYPE_F32 : mat,
                          layer[k].n_dims, layer[k].ne0, layer[k].ne1);
        }
    }
}

START_TEST(test_stories260k)
{
    pd_gguf_t *g = open_shared("stories260K.gguf");
    const llama_hp_t hp = {64, 172, 5, 8, 4, 2048, 8, 512};
    ck_assert_uint_eq(pd_gguf_version(g), 3);
    expect_llama(g, hp);
    ck_assert_uint_eq(u32_of(g, "tokenizer.ggml.seperator_token_id"), 4294967295u);
    float eps;
    ck_assert_int_eq(pd_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &eps),
                     PD_OK);
    ck_assert_float_eq_tol(eps, 1e-5f, 1e-9f);
    expect_str(g, "tokenizer.ggml.model", "llama");
    check_tok512_vocab(g);
    check_tensor_table(g, 48);
    expect_llama_tensors(g, hp, PD_DTYPE_F32);
    /* the header ends at byte 14152; data starts at the next multiple of 32 */
    pd_tensor_t t;
    ck_assert_int_eq(pd_gguf_find_tensor(g, "token_embd.weight", &t), PD_OK);
    size_t size;
    const uint8_t *base = pd_gguf_data(g, &size);
    ck_assert_uint_eq(size, 1185376);
    ck_assert_int_eq((const uint8_t *)t.data - base, 14176);
    ck_assert_int_eq(pd_gguf_find_tensor(g, "blk.1.attn_q.weight", &t), PD_OK);
    ck_assert_int_eq((const uint8_t *)t.data - base, 14176 + 444160);
    ck_assert_int_eq(pd_gguf_find_tensor(g, "blk.5.attn_q.weight", &t), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_test_n_errors, 0);
    pd_gguf_destroy(&g);
    ck_assert_ptr_null(g);
    pd_gguf_destroy(&g); /* NULL is fine */
}
END_TEST

START_TEST(test_llama2xs)
{
    pd_gguf_t *g = open_shared("llama2xs_tok512_280K.gguf");
    const llama_hp_t hp = {64, 192, 5, 8, 4, 256, 8, 512};
    ck_assert_uint_eq(pd_gguf_version(g), 3);
    expect_str(g, "general.name", "llama2xs-tok512-280K");
    expect_llama(g, hp);
    check_tok512_vocab(g);
    check_tensor_table(g, 48);
    expect_llama_tensors(g, hp, PD_DTYPE_F32);
    ck_assert_int_eq(pd_test_n_errors, 0);
    pd_gguf_destroy(&g);
}
END_TEST

START_TEST(test_tiny_random_f16)
{
    pd_gguf_t *g = open_shared("llama-2-tiny-random.gguf");
    const llama_hp_t hp = {8, 32, 1, 2, 2, 4096, 4, 32000};
    expect_str(g, "general.name", "LLaMA v2");
    expect_llama(g, hp);
    ck_assert_uint_eq(u32_of(g, "general.file_type"), 1);
    check_tensor_table(g, 12);
    expect_llama_tensors(g, hp, PD_DTYPE_F16);
    /* the full Llama-2 vocabulary, every item reachable (byte sum from Python) */
    uint64_t n;
    ck_assert_int_eq(pd_gguf_get_arr_len(g, "tokenizer.ggml.tokens", &n), PD_OK);
    ck_assert_uint_eq(n, 32000);
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        ck_assert_int_eq(pd_gguf_get_arr_str(g, "tokenizer.ggml.tokens", i, &s, &len),
                         PD_OK);
        total += len;
    }
    ck_assert_uint_eq(total, 210919);
    expect_arr_str(g, 13, "<0x0A>");
    expect_arr_str(g, 29871, "\xe2\x96\x81");
    expect_arr_str(g, 31999, "\xe7\xbb\x99");
    expect_arr_str(g, 1000, "ied");
    const char *s;
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "tokenizer.ggml.tokens", 32000, &s, NULL),
                     PD_ERR_RANGE);
    pd_gguf_type_t type;
    const void *data;
    ck_assert_int_eq(pd_gguf_get_arr(g, "tokenizer.ggml.scores", &type, &n, &data),
                     PD_OK);
    float score;
    memcpy(&score, (const char *)data + 4 * 1000, 4);
    ck_assert_float_eq(score, -741.0f);
    ck_assert_int_eq(pd_test_n_errors, 0);
    pd_gguf_destroy(&g);
}
END_TEST

/* Missing keys are PD_ERR_NOT_FOUND without an error log; a wrong type is
 * PD_ERR_FORMAT with one. */
START_TEST(test_lookup_contract)
{
    pd_gguf_t *g = open_shared("stories260K.gguf");
    uint32_t u = 7;
    float f = 7;
    int b = 7;
    const char *s = NULL;
    size_t len = 7;
    uint64_t n = 7;
    ck_assert_int_eq(pd_gguf_get_u32(g, "llama.rope.freq_base", &u), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_f32(g, "no.such.key", &f), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_bool(g, "no.such.key", &b), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_str(g, "no.such.key", &s, &len), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_arr_len(g, "no.such.key", &n), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "no.such.key", 0, &s, &len),
                     PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_gguf_get_arr(g, "", NULL, &n, NULL), PD_ERR_NOT_FOUND);
    pd_tensor_t t;
    ck_assert_int_eq(pd_gguf_find_tensor(g, "nope.weight", &t), PD_ERR_NOT_FOUND);
    ck_assert_int_eq(pd_test_n_errors, 0);
    ck_assert(u == 7 && f == 7 && b == 7 && s == NULL && len == 7 && n == 7);

    ck_assert_int_eq(pd_gguf_get_u32(g, "general.architecture", &u), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_test_n_errors, 1);
    ck_assert_int_eq(pd_gguf_get_f32(g, "llama.block_count", &f), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_str(g, "tokenizer.ggml.tokens", &s, &len),
                     PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_arr(g, "tokenizer.ggml.tokens", NULL, &n, NULL),
                     PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "tokenizer.ggml.scores", 0, &s, &len),
                     PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_arr_len(g, "llama.block_count", &n), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_bool(g, "llama.block_count", &b), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_test_n_errors, 7);
    ck_assert(u == 7 && f == 7 && b == 7 && s == NULL && len == 7 && n == 7);
    pd_gguf_destroy(&g);
}
END_TEST

START_TEST(test_open_failures)
{
    pd_gguf_t *g = NULL;
    ck_assert_int_eq(pd_gguf_open("/nonexistent/dir/x.gguf", &g), PD_ERR_IO);
    ck_assert_int_eq(pd_gguf_open("/tmp", &g), PD_ERR_IO);
    ck_assert_int_eq(pd_test_n_errors, 2);
    ck_assert_ptr_null(g);
    /* a llama2.c checkpoint is not GGUF */
    ck_assert_int_eq(pd_gguf_open(pd_test_model_path("stories260K.bin"), &g),
                     PD_ERR_FORMAT);
    ck_assert_ptr_null(g);
    ck_assert(strstr(pd_test_last_error, "magic") != NULL);
    ck_assert(strstr(pd_test_last_error, "byte 0") != NULL);
}
END_TEST

/* ---- files built here ---- */

/* One key of every value type, and arrays; a16 and a64 are returned for checking. */
static void build_value_types(pd_gb_t *b_p, uint16_t a16[3], double a64[2])
{
    pd_gb_t b = {0};
    pd_gb_header(&b, 2, 0, 21);
    uint8_t u8 = 200;
    int8_t i8 = -5;
    uint16_t u16 = 60000;
    int16_t i16 = 1234;
    int32_t i32 = -7, i32p = 99;
    float f32 = 1.5f;
    uint8_t bl = 1;
    uint64_t u64 = 1ull << 40, u64s = 77;
    int64_t i64 = -3;
    double f64 = 0.25;
    pd_gb_key(&b, "u8", PD_GGUF_TYPE_U8);
    pd_gb_put(&b, &u8, 1);
    pd_gb_key(&b, "i8", PD_GGUF_TYPE_I8);
    pd_gb_put(&b, &i8, 1);
    pd_gb_key(&b, "u16", PD_GGUF_TYPE_U16);
    pd_gb_put(&b, &u16, 2);
    pd_gb_key(&b, "i16", PD_GGUF_TYPE_I16);
    pd_gb_put(&b, &i16, 2);
    pd_gb_key(&b, "u32", PD_GGUF_TYPE_U32);
    pd_gb_u32(&b, 4000000000u);
    pd_gb_key(&b, "i32", PD_GGUF_TYPE_I32);
    pd_gb_put(&b, &i32, 4);
    pd_gb_key(&b, "i32p", PD_GGUF_TYPE_I32);
    pd_gb_put(&b, &i32p, 4);
    pd_gb_key(&b, "f32", PD_GGUF_TYPE_F32);
    pd_gb_put(&b, &f32, 4);
    pd_gb_key(&b, "bool", PD_GGUF_TYPE_BOOL);
    pd_gb_put(&b, &bl, 1);
    pd_gb_key(&b, "str", PD_GGUF_TYPE_STRING);
    pd_gb_str(&b, "hello");
    pd_gb_key(&b, "u64", PD_GGUF_TYPE_U64);
    pd_gb_put(&b, &u64, 8);
    pd_gb_key(&b, "u64s", PD_GGUF_TYPE_U64);
    pd_gb_put(&b, &u64s, 8);
    pd_gb_key(&b, "i64", PD_GGUF_TYPE_I64);
    pd_gb_put(&b, &i64, 8);
    pd_gb_key(&b, "f64", PD_GGUF_TYPE_F64);
    pd_gb_put(&b, &f64, 8);
    pd_gb_arr(&b, "arr.u16", PD_GGUF_TYPE_U16, 3);
    a16[0] = 1, a16[1] = 2, a16[2] = 65535;
    pd_gb_put(&b, a16, 3 * sizeof *a16);
    pd_gb_arr(&b, "arr.f64", PD_GGUF_TYPE_F64, 2);
    a64[0] = -1.0, a64[1] = 3.0;
    pd_gb_put(&b, a64, 2 * sizeof *a64);
    pd_gb_arr(&b, "arr.bool", PD_GGUF_TYPE_BOOL, 0);
    pd_gb_arr(&b, "arr.str", PD_GGUF_TYPE_STRING, 3);
    pd_gb_str(&b, "a");
    pd_gb_str(&b, "");
    pd_gb_str(&b, "ccc");
    pd_gb_arr(&b, "arr.i8", PD_GGUF_TYPE_I8, 1);
    pd_gb_put(&b, &i8, 1);
    pd_gb_arr(&b, "arr.str0", PD_GGUF_TYPE_STRING, 0);
    pd_gb_key(&b, "f64big", PD_GGUF_TYPE_F64);
    double big = 1e300;
    pd_gb_put(&b, &big, 8);
    ck_assert_uint_eq(b.n_kv, 21);
    *b_p = b;
}

START_TEST(test_value_types)
{
    pd_gb_t b;
    uint16_t a16[3];
    double a64[2];
    build_value_types(&b, a16, a64);
    pd_gguf_t *g = pd_gb_open(&b, "built gguf");
    ck_assert_uint_eq(pd_gguf_version(g), 2);
    ck_assert_int_eq(pd_gguf_n_tensors(g), 0);
    uint32_t u;
    ck_assert(pd_gguf_get_u32(g, "u8", &u) == PD_OK && u == 200);
    ck_assert(pd_gguf_get_u32(g, "u16", &u) == PD_OK && u == 60000);
    ck_assert(pd_gguf_get_u32(g, "i16", &u) == PD_OK && u == 1234);
    ck_assert(pd_gguf_get_u32(g, "u32", &u) == PD_OK && u == 4000000000u);
    ck_assert(pd_gguf_get_u32(g, "i32p", &u) == PD_OK && u == 99);
    ck_assert(pd_gguf_get_u32(g, "u64s", &u) == PD_OK && u == 77);
    ck_assert_int_eq(pd_test_n_errors, 0);
    ck_assert_int_eq(pd_gguf_get_u32(g, "i8", &u), PD_ERR_FORMAT); /* negative */
    ck_assert_int_eq(pd_gguf_get_u32(g, "i32", &u), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_u32(g, "i64", &u), PD_ERR_FORMAT);
    ck_assert_int_eq(pd_gguf_get_u32(g, "u64", &u), PD_ERR_FORMAT); /* too big */
    ck_assert_int_eq(pd_gguf_get_u32(g, "f32", &u), PD_ERR_FORMAT);
    float f;
    ck_assert(pd_gguf_get_f32(g, "f32", &f) == PD_OK && f == 1.5f);
    ck_assert(pd_gguf_get_f32(g, "f64", &f) == PD_OK && f == 0.25f);
    ck_assert_int_eq(pd_gguf_get_f32(g, "f64big", &f), PD_ERR_FORMAT);
    int bv = 0;
    ck_assert(pd_gguf_get_bool(g, "bool", &bv) == PD_OK && bv == 1);
    const char *s;
    size_t len;
    ck_assert(pd_gguf_get_str(g, "str", &s, &len) == PD_OK && len == 5 &&
              memcmp(s, "hello", 5) == 0);
    pd_gguf_type_t type;
    uint64_t n;
    const void *data;
    ck_assert_int_eq(pd_gguf_get_arr(g, "arr.u16", &type, &n, &data), PD_OK);
    ck_assert(type == PD_GGUF_TYPE_U16 && n == 3 && memcmp(data, a16, sizeof a16) == 0);
    ck_assert_int_eq(pd_gguf_get_arr(g, "arr.f64", &type, &n, &data), PD_OK);
    ck_assert(type == PD_GGUF_TYPE_F64 && n == 2 && memcmp(data, a64, sizeof a64) == 0);
    ck_assert(pd_gguf_get_arr(g, "arr.bool", &type, &n, &data) == PD_OK && n == 0 &&
              type == PD_GGUF_TYPE_BOOL);
    ck_assert(pd_gguf_get_arr(g, "arr.i8", &type, &n, &data) == PD_OK && n == 1 &&
              *(const int8_t *)data == -5);
    ck_assert(pd_gguf_get_arr_len(g, "arr.str", &n) == PD_OK && n == 3);
    ck_assert(pd_gguf_get_arr_str(g, "arr.str", 0, &s, &len) == PD_OK && len == 1 &&
              s[0] == 'a');
    ck_assert(pd_gguf_get_arr_str(g, "arr.str", 1, &s, &len) == PD_OK && len == 0);
    ck_assert(pd_gguf_get_arr_str(g, "arr.str", 2, &s, &len) == PD_OK && len == 3 &&
              memcmp(s, "ccc", 3) == 0);
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "arr.str", 3, &s, &len), PD_ERR_RANGE);
    ck_assert(pd_gguf_get_arr_len(g, "arr.str0", &n) == PD_OK && n == 0);
    ck_assert_int_eq(pd_gguf_get_arr_str(g, "arr.str0", 0, &s, &len), PD_ERR_RANGE);
    pd_gguf_destroy(&g);
}
END_TEST

/* general.alignment places the data section and is enforced on tensor offsets;
 * quantized and half types get the right byte sizes. */
START_TEST(test_alignment_and_dtypes)
{
    for (int align = 0; align <= 256; align = align ? align * 4 : 1) {
        size_t a = align ? (size_t)align : 32;
        pd_gb_t b = {0};
        pd_gb_header(&b, 3, 4, align ? 2 : 1);
        pd_gb_key(&b, "general.architecture", PD_GGUF_TYPE_STRING);
        pd_gb_str(&b, "test");
        if (align) {
            pd_gb_key(&b, "general.alignment", PD_GGUF_TYPE_U32);
            pd_gb_u32(&b, (uint32_t)align);
        }
        const struct {
            const char *name;
            uint32_t type;
            uint64_t ne0, ne1;
            size_t bytes;
        } ts[] = {
            {"a", PD_DTYPE_F32, 3, 1, 12},
            {"b", PD_DTYPE_Q8_0, 64, 2, 4 * 34},
            {"c", PD_DTYPE_Q4_0, 32, 3, 3 * 18},
            {"d", PD_DTYPE_BF16, 5, 7, 70},
        };
        size_t off = 0, offs[4];
        for (int i = 0; i < 4; i++) {
            pd_gb_str(&b, ts[i].name);
            pd_gb_u32(&b, 2);
            pd_gb_u64(&b, ts[i].ne0);
            pd_gb_u64(&b, ts[i].ne1);
            pd_gb_u32(&b, ts[i].type);
            pd_gb_u64(&b, off);
            offs[i] = off;
            off = (off + ts[i].bytes + a - 1) / a * a;
        }
        pd_gb_pad(&b, a);
        size_t data_off = b.n;
        uint8_t *zeros = calloc(1, off);
        pd_gb_put(&b, zeros, off);
        free(zeros);
        pd_gguf_t *g = pd_gb_open(&b, "built gguf");
        size_t size;
        const uint8_t *base = pd_gguf_data(g, &size);
        for (int i = 0; i < 4; i++) {
            const char *name;
            pd_tensor_t t;
            ck_assert_int_eq(pd_gguf_tensor_at(g, i, &name, &t), PD_OK);
            ck_assert_str_eq(name, ts[i].name);
            ck_assert_int_eq(t.dtype, ts[i].type);
            ck_assert_uint_eq(t.nbytes, ts[i].bytes);
            ck_assert_uint_eq((size_t)((const uint8_t *)t.data - base),
                              data_off + offs[i]);
            ck_assert_uint_eq((size_t)((const uint8_t *)t.data - base) % a, 0);
        }
        pd_gguf_destroy(&g);
    }
    ck_assert_int_eq(pd_test_n_errors, 0);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 120, pd_test_log_setup, NULL);
    PD_TEST_ADD(tc, test_stories260k, test_llama2xs, test_tiny_random_f16,
                test_lookup_contract, test_open_failures, test_value_types,
                test_alignment_and_dtypes);
    return pd_test_run("gguf", tc);
}
