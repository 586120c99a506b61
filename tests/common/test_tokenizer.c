/* test_tokenizer.c - the SentencePiece BPE tokenizer and the streaming decoder.
 *
 * Golden: every prompt in the golden .jsonl files encodes to its prompt_ids (from
 * llama2.c's encode()) with tok512.bin and the GGUF vocabularies, and the prompt
 * plus generation decode to run.c's stdout. Round trips with the Llama-2 32000 vocab
 * (.bin and GGUF) and tok512 (byte fallback); invalid UTF-8; the decoder never
 * emits a partial character (checked chunk by chunk, also for random id streams);
 * corrupt and truncated tokenizer.bin files and small crafted GGUF files give
 * errors, never crashes; literal "<s>" is text; the empty prompt is just BOS; the
 * char-level tok105 maps unknown characters to UNK; encode speed.
 * Threading: single-threaded; Check forks per test. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/gguf.h"
#include "common/tokenizer.h"
#include "support/ggufbuild.h"
#include "support/golden.h"
#include "support/pdcheck.h"

#define MAX_IDS 4096

/* ---- helpers ---- */

static pd_tokenizer_t *load_bin(const char *name, int32_t vocab)
{
    const char *path = pd_test_model_path(name);
    pd_tokenizer_t *t = NULL;
    pd_status_t st = pd_tokenizer_load_bin(path, vocab, &t);
    ck_assert_msg(st == PD_OK, "load %s: %s (%s)", path, pd_status_str(st),
                  pd_test_last_error);
    ck_assert_int_eq(pd_tokenizer_n_vocab(t), vocab);
    return t;
}

typedef struct gtok {
    pd_gguf_t *g;
    pd_tokenizer_t *t;
} gtok_t;

static gtok_t load_gguf(const char *name)
{
    const char *path = pd_test_model_path(name);
    gtok_t r = {0};
    pd_status_t st = pd_gguf_open(path, &r.g);
    ck_assert_msg(st == PD_OK, "open %s: %s (%s)", path, pd_status_str(st),
                  pd_test_last_error);
    st = pd_tokenizer_from_gguf(r.g, &r.t);
    ck_assert_msg(st == PD_OK, "tokenizer of %s: %s (%s)", path, pd_status_str(st),
                  pd_test_last_error);
    return r;
}

static void gtok_free(gtok_t *r)
{
    pd_tokenizer_destroy(&r->t);
    pd_gguf_destroy(&r->g);
}

static size_t enc(const pd_tokenizer_t *t, const char *s, size_t len, bool bos,
                  int32_t *ids)
{
    size_t n = 0;
    pd_status_t st = pd_tokenizer_encode(t, s, len, bos, ids, MAX_IDS, &n);
    ck_assert_msg(st == PD_OK, "encode: %s", pd_status_str(st));
    return n;
}

static size_t enc_str(const pd_tokenizer_t *t, const char *s, int32_t *ids)
{
    return enc(t, s, strlen(s), true, ids);
}

/* An independent strict UTF-8 check (RFC 3629): no overlongs, surrogates, > U+10FFFF. */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 2, cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 3, cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 4, cp = c & 0x07;
        } else {
            return false;
        }
        if (i + k > n)
            return false;
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        static const unsigned min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[k] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k;
    }
    return true;
}

/* Decodes ids token by token, checking every chunk is whole valid UTF-8. */
static size_t detok_all(const pd_tokenizer_t *t, const int32_t *ids, size_t n, char *out,
                        size_t cap)
{
    size_t chunk_cap = pd_tokenizer_max_piece_len(t) + 16, len = 0;
    char *chunk = malloc(chunk_cap);
    ck_assert_ptr_nonnull(chunk);
    pd_detok_t d;
    pd_detok_init(&d, t);
    for (size_t i = 0; i <= n; i++) {
        size_t k = i < n ? pd_detok_feed(&d, ids[i], chunk, chunk_cap)
                         : pd_detok_flush(&d, chunk, chunk_cap);
        ck_assert_uint_lt(k, chunk_cap);
        ck_assert_int_eq(chunk[k], '\0');
        ck_assert_msg(valid_utf8((unsigned char *)chunk, k),
                      "chunk %zu (id %d) is not whole UTF-8", i,
                      i < n ? (int)ids[i] : -1);
        ck_assert_uint_lt(len + k, cap);
        memcpy(out + len, chunk, k);
        len += k;
    }
    out[len] = '\0';
    free(chunk);
    return len;
}

static void expect_round_trip(const pd_tokenizer_t *t, const char *s)
{
    static int32_t ids[MAX_IDS];
    static char out[4 * MAX_IDS];
    size_t n = enc_str(t, s, ids);
    ck_assert_int_eq(ids[0], pd_tokenizer_bos(t));
    size_t len = detok_all(t, ids, n, out, sizeof out);
    ck_assert_msg(len == strlen(s) && memcmp(out, s, len) == 0,
                  "round trip of '%s' gave '%s'", s, out);
}

static void expect_ids(const pd_tokenizer_t *t, const char *s, size_t len,
                       const int32_t *want, size_t n_want)
{
    int32_t ids[MAX_IDS];
    size_t n = enc(t, s, len, true, ids);
    ck_assert_msg(n == n_want, "'%s': %zu ids, expected %zu", s, n, n_want);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(ids[i] == want[i], "'%s': id %zu is %d, expected %d", s, i,
                      (int)ids[i], (int)want[i]);
}

#define EXPECT_IDS(t, s, ...)                                                            \
    do {                                                                                 \
        const int32_t want_[] = {__VA_ARGS__};                                           \
        expect_ids((t), (s), strlen(s), want_, sizeof want_ / sizeof want_[0]);          \
    } while (0)

/* ---- golden ---- */

static void check_golden_file(const char *file, const pd_tokenizer_t *const *toks,
                              int n_toks)
{
    static char out[1 << 16];
    pd_test_golden_t *gs;
    int n = pd_test_golden_read(file, &gs);
    for (int i = 0; i < n; i++) {
        const pd_test_golden_t *g = &gs[i];
        for (int k = 0; k < n_toks; k++) {
            expect_ids(toks[k], g->prompt, g->prompt_len, g->ids, g->n_prompt);
            /* run.c prints the prompt and generation, stopping at a generated BOS. */
            size_t end = g->n_prompt;
            while (end < g->n_ids && g->ids[end] != 1)
                end++;
            size_t len = detok_all(toks[k], g->ids, end, out, sizeof out);
            ck_assert_msg(len == g->stdout_len && memcmp(out, g->run_c_stdout, len) == 0,
                          "%s line %d: decode differs", file, i);
        }
    }
    pd_test_golden_free(&gs, n);
}

START_TEST(test_golden_prompts)
{
    pd_tokenizer_t *bin = load_bin("tok512.bin", 512);
    gtok_t a = load_gguf("stories260K.gguf"), b = load_gguf("llama2xs_tok512_280K.gguf");
    const pd_tokenizer_t *toks[3] = {bin, a.t, b.t};
    check_golden_file("stories260K_greedy.jsonl", toks, 3);
    check_golden_file("llama2xs280K_greedy.jsonl", toks, 3);
    pd_tokenizer_destroy(&bin);
    ck_assert_ptr_null(bin);
    gtok_free(&a);
    gtok_free(&b);
    ck_assert_int_eq(pd_test_n_errors, 0);
}
END_TEST

/* ---- the vocabularies ---- */

START_TEST(test_gguf_equals_bin)
{
    struct {
        const char *bin, *gguf;
        int32_t n;
    } pairs[2] = {{"tok512.bin", "stories260K.gguf", 512},
                  {"llama2_tokenizer.bin", "llama-2-tiny-random.gguf", 32000}};
    for (int p = 0; p < 2; p++) {
        pd_tokenizer_t *bin = load_bin(pairs[p].bin, pairs[p].n);
        gtok_t g = load_gguf(pairs[p].gguf);
        ck_assert_int_eq(pd_tokenizer_n_vocab(g.t), pairs[p].n);
        ck_assert_int_eq(pd_tokenizer_bos(g.t), 1);
        ck_assert_int_eq(pd_tokenizer_eos(g.t), 2);
        ck_assert_int_eq(pd_tokenizer_bos(bin), 1);
        ck_assert_int_eq(pd_tokenizer_eos(bin), 2);
        for (int32_t id = 3; id < pairs[p].n; id++) { /* the specials are spelled apart */
            size_t la, lb;
            const char *a = pd_tokenizer_piece(bin, id, &la),
                       *b = pd_tokenizer_piece(g.t, id, &lb);
            ck_assert_msg(la == lb && memcmp(a, b, la) == 0, "piece %d differs", (int)id);
            ck_assert_int_eq(a[la], '\0');
        }
        ck_assert_ptr_null(pd_tokenizer_piece(bin, -1, NULL));
        ck_assert_ptr_null(pd_tokenizer_piece(bin, pairs[p].n, NULL));
        size_t len;
        ck_assert_str_eq(pd_tokenizer_piece(g.t, 3 + 'A', &len), "<0x41>");
        ck_assert_uint_ge(pd_tokenizer_max_piece_len(g.t), 6);
        pd_tokenizer_destroy(&bin);
        gtok_free(&g);
    }
    gtok_t g = load_gguf("stories260K.gguf"); /* U+2581 became a space */
    ck_assert_str_eq(pd_tokenizer_piece(g.t, 410, NULL), " ");
    gtok_free(&g);
}
END_TEST

static const char *const ROUND_TRIP[] = {
    "Once upon a time, there was a little girl named Lily.",
    "Hello world",
    " leading space",
    "two  spaces and trailing ",
    "tabs\tand\nnew\nlines\n\n",
    "caf\xc3\xa9 na\xc3\xafve \xc3\xa9t\xc3\xa9", /* café naïve été */
    "\xe4\xb8\xad\xe6\x96\x87 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", /* 中文 日本語 */
    /* 😀 🚀👍🏽 */
    "emoji \xf0\x9f\x98\x80 \xf0\x9f\x9a\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",
    "mix: a\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80z 123 4.5% <tag> {json: [1, 2]}",
    "<s> literal </s> and <unk> and <0x41>",
    "\x01\x02\x7f control bytes",
    "e\xcc\x81 combining, \xe2\x80\x8a hair space, \xc2\xa0 nbsp",
};

START_TEST(test_round_trip)
{
    pd_tokenizer_t *bins[2] = {load_bin("llama2_tokenizer.bin", 32000),
                               load_bin("tok512.bin", 512)};
    gtok_t g = load_gguf("llama-2-tiny-random.gguf");
    const pd_tokenizer_t *toks[3] = {bins[0], bins[1], g.t};
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < sizeof ROUND_TRIP / sizeof ROUND_TRIP[0]; i++)
            expect_round_trip(toks[k], ROUND_TRIP[i]);
    /* The multi-byte text really went through byte fallback with tok512. */
    int32_t ids[MAX_IDS];
    EXPECT_IDS(bins[1], "\xe4\xb8\xad", 1, 410, 3 + 0xe4, 3 + 0xb8, 3 + 0xad);
    size_t n =
        enc_str(bins[0], "\xe4\xb8\xad\xe6\x96\x87", ids); /* whole pieces in Llama-2 */
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(ids[2], 30275);
    pd_tokenizer_destroy(&bins[0]);
    pd_tokenizer_destroy(&bins[1]);
    gtok_free(&g);
}
END_TEST

START_TEST(test_specials_are_text)
{
    pd_tokenizer_t *t = load_bin("llama2_tokenizer.bin", 32000);
    /* As SentencePiece encodes them: never the control or byte tokens. */
    EXPECT_IDS(t, "<s>", 1, 529, 29879, 29958);
    EXPECT_IDS(t, "<s>hi", 1, 529, 29879, 29958, 2918);
    int32_t ids[MAX_IDS];
    const char *texts[] = {"</s>", "<unk>", "<0x41>", "<s></s><s>", "<<s>>"};
    for (size_t k = 0; k < 5; k++) {
        size_t n = enc_str(t, texts[k], ids);
        for (size_t i = 1; i < n; i++)
            ck_assert_msg(ids[i] > 2 + 256, "'%s' gave special/byte id %d", texts[k],
                          (int)ids[i]);
    }
    pd_tokenizer_destroy(&t);
    pd_tokenizer_t *s = load_bin("tok512.bin", 512); /* '<' 's' '>' are pieces there */
    EXPECT_IDS(s, "<s>hi", 1, 410, 504, 419, 505, 415, 417);
    pd_tokenizer_destroy(&s);
}
END_TEST

START_TEST(test_empty_and_bos)
{
    pd_tokenizer_t *t = load_bin("tok512.bin", 512);
    int32_t ids[4] = {-5, -5, -5, -5};
    size_t n = 99;
    ck_assert_int_eq(pd_tokenizer_encode(t, "", 0, true, ids, 4, &n), PD_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ids[0], 1);
    ck_assert_int_eq(pd_tokenizer_encode(t, NULL, 0, false, ids, 4, &n), PD_OK);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(pd_tokenizer_encode(t, "a", 1, false, ids, 4, &n), PD_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ids[0], 261); /* " a": the dummy prefix */
    EXPECT_IDS(t, " ", 1, 410, 410);
    /* Too small: RANGE, the full count, the first cap ids. */
    int32_t small[2] = {0, 0};
    ck_assert_int_eq(pd_tokenizer_encode(t, "Once upon a time", 16, true, small, 2, &n),
                     PD_ERR_RANGE);
    ck_assert_uint_eq(n, 5);
    ck_assert_int_eq(small[0], 1);
    ck_assert_int_eq(small[1], 403);
    ck_assert_int_eq(pd_tokenizer_encode(t, "Once", 4, true, NULL, 0, &n), PD_ERR_RANGE);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(pd_tokenizer_encode(t, NULL, 3, true, ids, 4, &n), PD_ERR_INVALID);
    pd_tokenizer_destroy(&t);
    pd_tokenizer_destroy(&t); /* NULL is fine */
    pd_tokenizer_destroy(NULL);
}
END_TEST

START_TEST(test_char_level_unk)
{
    pd_tokenizer_t *t = load_bin("tok105.bin", 105);
    /* tok105 has no byte tokens: unknown characters are UNK, a run of them one UNK,
     * as SentencePiece encodes them. */
    EXPECT_IDS(t, "\xe4\xb8\xad", 1, 3, 0);
    EXPECT_IDS(t, "a\xe4\xb8\xad\xe6\x96\x87\x62", 1, 3, 5, 0, 23); /* \x62: b */
    EXPECT_IDS(t, "\xe4\xb8\xad\x61\xe6\x96\x87", 1, 3, 0, 5, 0);   /* \x61: a */
    EXPECT_IDS(t, "a\n\nb", 1, 3, 5, 0, 23);
    EXPECT_IDS(t, "a\xff\x80\x62", 1, 3, 5, 0, 23); /* invalid UTF-8 too */
    EXPECT_IDS(t, "Hello", 1, 3, 33, 4, 14, 14, 7);
    /* UNK decodes to nothing; the rest comes back. */
    int32_t ids[MAX_IDS];
    char out[256];
    size_t n = enc_str(t, "a\xe4\xb8\xad\x62 c", ids);
    detok_all(t, ids, n, out, sizeof out);
    ck_assert_str_eq(out, "ab c");
    pd_tokenizer_destroy(&t);
}
END_TEST

/* ---- invalid UTF-8 and the decoder ---- */

START_TEST(test_invalid_utf8)
{
    static const struct {
        const char *in, *out; /* out: U+FFFD per maximal invalid subpart */
    } cases[] = {
        {"\xff", "\xef\xbf\xbd"},
        {"\x80xyz", "\xef\xbf\xbdxyz"},
        {"x\xe4\xb8", "x\xef\xbf\xbd"},           /* truncated at the end */
        {"\xe4\xb8z", "\xef\xbf\xbdz"},           /* truncated inside */
        {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"}, /* overlong '/' */
        {"\xe0\x80\xaf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* overlong */
        {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* surrogate */
        {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {"a\xf0\x9f\x98", "a\xef\xbf\xbd"},
        {"\xf0\x9f\x98\x80\x80", "\xf0\x9f\x98\x80\xef\xbf\xbd"}, /* emoji + stray */
        {"ok \xc3\xa9\xc3", "ok \xc3\xa9\xef\xbf\xbd"},
    };
    pd_tokenizer_t *t = load_bin("tok512.bin", 512);
    gtok_t g = load_gguf("llama-2-tiny-random.gguf");
    const pd_tokenizer_t *toks[2] = {t, g.t};
    int32_t ids[MAX_IDS];
    char out[256];
    for (int k = 0; k < 2; k++) {
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            size_t n = enc_str(toks[k], cases[i].in, ids);
            ck_assert_uint_le(n, strlen(cases[i].in) + 2);
            detok_all(toks[k], ids, n, out, sizeof out);
            ck_assert_msg(strcmp(out, cases[i].out) == 0, "case %zu decoded wrong", i);
        }
    }
    /* Each invalid byte is its own byte token. */
    EXPECT_IDS(t, "\xff\x80", 1, 410, 3 + 0xff, 3 + 0x80);
    pd_tokenizer_destroy(&t);
    gtok_free(&g);
}
END_TEST

START_TEST(test_detok_rules)
{
    pd_tokenizer_t *t = load_bin("tok512.bin", 512);
    char out[64];
    pd_detok_t d;
    pd_detok_init(&d, t);
    ck_assert_uint_eq(pd_detok_feed(&d, 261, out, sizeof out), 1); /* " a" first: "a" */
    ck_assert_str_eq(out, "a");
    ck_assert_uint_eq(pd_detok_feed(&d, 261, out, sizeof out), 2); /* then " a" */
    ck_assert_str_eq(out, " a");
    ck_assert_uint_eq(pd_detok_feed(&d, 1, out, sizeof out), 0); /* BOS: nothing */
    ck_assert_str_eq(out, "");
    ck_assert_uint_eq(pd_detok_feed(&d, 261, out, sizeof out), 1); /* after BOS: "a" */
    ck_assert_uint_eq(pd_detok_feed(&d, 2, out, sizeof out), 0);   /* EOS */
    ck_assert_uint_eq(pd_detok_feed(&d, 0, out, sizeof out), 0);   /* UNK */
    ck_assert_uint_eq(pd_detok_feed(&d, 512, out, sizeof out), 0); /* out of range */
    ck_assert_uint_eq(pd_detok_feed(&d, -3, out, sizeof out), 0);
    /* A character split over byte tokens comes out whole, once complete. */
    ck_assert_uint_eq(pd_detok_feed(&d, 3 + 0xe4, out, sizeof out), 0);
    ck_assert_uint_eq(pd_detok_feed(&d, 3 + 0xb8, out, sizeof out), 0);
    ck_assert_uint_eq(pd_detok_feed(&d, 3 + 0xad, out, sizeof out), 3);
    ck_assert_str_eq(out, "\xe4\xb8\xad");
    /* An interrupted one becomes U+FFFD before the text that interrupted it. */
    ck_assert_uint_eq(pd_detok_feed(&d, 3 + 0xe4, out, sizeof out), 0);
    ck_assert_uint_eq(pd_detok_feed(&d, 261, out, sizeof out), 5);
    ck_assert_str_eq(out, "\xef\xbf\xbd a");
    /* flush: a pending partial character is U+FFFD, then nothing. */
    ck_assert_uint_eq(pd_detok_feed(&d, 3 + 0xf0, out, sizeof out), 0);
    ck_assert_uint_eq(pd_detok_flush(&d, out, sizeof out), 3);
    ck_assert_str_eq(out, "\xef\xbf\xbd");
    ck_assert_uint_eq(pd_detok_flush(&d, out, sizeof out), 0);
    /* A too small buffer is never overrun and stays NUL-terminated. */
    char tiny[3] = {'x', 'x', 'x'};
    pd_detok_init(&d, t);
    pd_detok_feed(&d, 403, tiny, 1);
    ck_assert_int_eq(tiny[0], '\0');
    ck_assert_int_eq(tiny[1], 'x');
    ck_assert_uint_eq(pd_detok_feed(&d, 403, NULL, 0), 0);
    pd_tokenizer_destroy(&t);
}
END_TEST

START_TEST(test_detok_random_streams)
{
    /* Random ids (byte tokens and multi-byte pieces mixed): every chunk whole UTF-8. */
    pd_tokenizer_t *t[2] = {load_bin("tok512.bin", 512),
                            load_bin("llama2_tokenizer.bin", 32000)};
    static int32_t ids[2000];
    static char out[2000 * 64];
    srand(12345);
    for (int k = 0; k < 2; k++) {
        int32_t nv = pd_tokenizer_n_vocab(t[k]);
        for (int round = 0; round < 20; round++) {
            for (size_t i = 0; i < 2000; i++) {
                int r = rand() % 4;
                ids[i] = r == 0   ? 3 + rand() % 256
                         : r == 1 ? 3 + 0x80 + rand() % 0x40
                                  : rand() % nv;
            }
            detok_all(t[k], ids, 2000, out, sizeof out);
        }
        pd_tokenizer_destroy(&t[k]);
    }
}
END_TEST

/* ---- corrupt files ---- */

static pd_status_t load_bytes(const unsigned char *d, size_t n, int32_t vocab)
{
    char tmp_path[4096];
    pd_test_temp_write("tok_", ".bin", d, n, tmp_path, sizeof tmp_path);
    pd_tokenizer_t *t = NULL;
    pd_status_t st = pd_tokenizer_load_bin(tmp_path, vocab, &t);
    unlink(tmp_path);
    ck_assert(st == PD_OK ? t != NULL : t == NULL);
    if (t) { /* whatever loaded must work */
        int32_t ids[64];
        size_t k;
        pd_status_t est = pd_tokenizer_encode(t, "hi there", 8, true, ids, 64, &k);
        ck_assert(est == PD_OK || est == PD_ERR_RANGE);
    }
    pd_tokenizer_destroy(&t);
    return st;
}

static void put_i32(unsigned char *p, int32_t v)
{
    memcpy(p, &v, 4);
}

START_TEST(test_corrupt_bin)
{
    size_t n;
    unsigned char *orig = pd_test_read_file(pd_test_model_path("tok512.bin"), &n);
    static unsigned char d[1 << 20];
    ck_assert_uint_le(n, sizeof d);
    ck_assert_int_eq(load_bytes(orig, n, 512), PD_OK);
    const size_t cuts[] = {0, 2, 4, 7, 12, 100, n / 2, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++)
        ck_assert_int_eq(load_bytes(orig, cuts[i], 512), PD_ERR_FORMAT);
    ck_assert_int_eq(load_bytes(orig, n, 513), PD_ERR_FORMAT); /* vocab too large */
    ck_assert_int_eq(load_bytes(orig, n, 511), PD_ERR_FORMAT); /* bytes left over */
    /* vocab_size <= 0: every record; a truncated file is still refused */
    ck_assert_int_eq(load_bytes(orig, n, 0), PD_OK);
    ck_assert_int_eq(load_bytes(orig, n, -7), PD_OK);
    ck_assert_int_eq(load_bytes(orig, n - 1, 0), PD_ERR_FORMAT);
    ck_assert_int_eq(load_bytes(orig, 12, 0), PD_ERR_FORMAT); /* fewer than 3 records */
    pd_tokenizer_t *all = NULL;
    char all_path[4096];
    pd_test_temp_write("tok_", ".bin", orig, n, all_path, sizeof all_path);
    ck_assert_int_eq(pd_tokenizer_load_bin(all_path, 0, &all), PD_OK);
    unlink(all_path);
    ck_assert_int_eq(pd_tokenizer_n_vocab(all), 512);
    ck_assert_int_eq(pd_tokenizer_type(all, 0), 2);   /* unknown */
    ck_assert_int_eq(pd_tokenizer_type(all, 1), 3);   /* control */
    ck_assert_int_eq(pd_tokenizer_type(all, 3), 6);   /* <0x00> byte */
    ck_assert_int_eq(pd_tokenizer_type(all, 300), 1); /* normal */
    ck_assert_int_eq(pd_tokenizer_type(all, 512), 0); /* out of range */
    size_t pos = 4; /* walk the variable-size records to token 300's score */
    for (int id = 0; id < 300; id++) {
        int32_t len;
        memcpy(&len, orig + pos + 4, 4);
        pos += 8 + (size_t)len;
    }
    float want;
    memcpy(&want, orig + pos, 4);
    ck_assert_float_eq(pd_tokenizer_score(all, 300), want);
    ck_assert_float_eq(pd_tokenizer_score(all, -1), 0.0f);
    pd_tokenizer_destroy(&all);
    memcpy(d, orig, n);
    put_i32(d, -1); /* max_token_length */
    ck_assert_int_eq(load_bytes(d, n, 512), PD_ERR_FORMAT);
    const int32_t bad_lens[] = {-1, INT32_MIN, INT32_MAX, 8, 1 << 20};
    for (size_t i = 0; i < sizeof bad_lens / sizeof bad_lens[0]; i++) {
        memcpy(d, orig, n);
        put_i32(d + 4 + 4, bad_lens[i]); /* token 0's length */
        ck_assert_int_eq(load_bytes(d, n, 512), PD_ERR_FORMAT);
    }
    /* Random corruption: an error or a working tokenizer, never a crash. */
    srand(7);
    for (int round = 0; round < 200; round++) {
        memcpy(d, orig, n);
        for (int k = 0; k < 1 + rand() % 8; k++)
            d[rand() % n] = (unsigned char)rand();
        pd_status_t st = load_bytes(d, n, 512);
        ck_assert(st == PD_OK || st == PD_ERR_FORMAT);
    }
    pd_tokenizer_t *t = NULL;
    ck_assert_int_eq(pd_tokenizer_load_bin("/nonexistent/tok.bin", 512, &t), PD_ERR_IO);
    ck_assert_ptr_null(t);
    ck_assert_int_gt(pd_test_n_errors, 0);
    free(orig);
}
END_TEST

/* ---- crafted GGUF files ---- */

#define SP "\xe2\x96\x81"
/* Besides plain merges: a control piece "ba" and a byte piece "<0x63>" that merges
 * could spell (they must not), and "aa" for leftmost-first ties. */
static const char *const G_TOKENS[] = {
    "<unk>", "<s>", "</s>", SP,  "a", "b",  SP "a", "ab",   "ba", "<0x63>", "<",
    "0",     "x",   "6",    "3", ">", "<0", "<0x",  "<0x6", "3>", "aa"};
static const float G_SCORES[] = {0,  0,  0,  -1, -2, -3, -0.5f, -0.7f, 0,  0,    -4,
                                 -4, -4, -4, -4, -4, -1, -1,    -1,    -1, -1.5f};
static const int32_t G_TYPES[] = {2, 3, 3, 1, 1, 1, 1, 1, 3, 6, 1,
                                  1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
#define G_N 21

typedef struct gopts {
    const char *model; /* NULL: no key */
    int n_scores;      /* 0: no key */
    int32_t bad_type;  /* type of token 4 if nonzero */
    uint32_t bos;
    int add_space; /* -1: no key */
    int remove_ws; /* -1: no key */
} gopts_t;

static const gopts_t G_DEFAULT = {"llama", G_N, 0, 1, -1, -1};

static pd_status_t gguf_tokenizer(const gopts_t *o, pd_tokenizer_t **t_p)
{
    pd_gb_t kv = {0};
    if (o->model)
        pd_gb_kv_str(&kv, "tokenizer.ggml.model", o->model);
    pd_gb_arr(&kv, "tokenizer.ggml.tokens", PD_GGUF_TYPE_STRING, G_N);
    for (int i = 0; i < G_N; i++)
        pd_gb_str(&kv, G_TOKENS[i]);
    if (o->n_scores) {
        pd_gb_arr(&kv, "tokenizer.ggml.scores", PD_GGUF_TYPE_F32, (uint64_t)o->n_scores);
        for (int i = 0; i < o->n_scores; i++)
            pd_gb_put(&kv, &G_SCORES[i % G_N], 4);
    }
    pd_gb_arr(&kv, "tokenizer.ggml.token_type", PD_GGUF_TYPE_I32, G_N);
    for (int i = 0; i < G_N; i++) {
        int32_t ty = i == 4 && o->bad_type ? o->bad_type : G_TYPES[i];
        pd_gb_put(&kv, &ty, 4);
    }
    pd_gb_kv_u32(&kv, "tokenizer.ggml.bos_token_id", o->bos);
    if (o->add_space >= 0) {
        pd_gb_key(&kv, "tokenizer.ggml.add_space_prefix", PD_GGUF_TYPE_BOOL);
        pd_gb_put(&kv, &(uint8_t){(uint8_t)o->add_space}, 1);
    }
    if (o->remove_ws >= 0) {
        pd_gb_key(&kv, "tokenizer.ggml.remove_extra_whitespaces", PD_GGUF_TYPE_BOOL);
        pd_gb_put(&kv, &(uint8_t){(uint8_t)o->remove_ws}, 1);
    }
    pd_gb_t f = {0};
    pd_gb_header(&f, 3, 0, kv.n_kv);
    pd_gb_put(&f, kv.p, kv.n);
    pd_gb_free(&kv);
    pd_gb_pad(&f, 32);
    pd_gguf_t *g = pd_gb_open(&f, "crafted gguf");
    *t_p = NULL;
    pd_status_t st = pd_tokenizer_from_gguf(g, t_p);
    pd_gguf_destroy(&g); /* the tokenizer owns copies */
    return st;
}

START_TEST(test_crafted_gguf)
{
    pd_tokenizer_t *t = NULL;
    gopts_t o = G_DEFAULT;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_OK);
    EXPECT_IDS(t, "a b", 1, 6, 3, 5);      /* " a" wins over "ab"-less spellings */
    EXPECT_IDS(t, "ab", 1, 6, 5);          /* " a" (-0.5) beats "ab" (-0.7) */
    EXPECT_IDS(t, "c", 1, 3, 9);           /* byte fallback */
    EXPECT_IDS(t, "d", 1, 3, 0);           /* no byte token for it: UNK */
    EXPECT_IDS(t, "ba", 1, 3, 5, 4);       /* never the control piece */
    EXPECT_IDS(t, "<0x63>", 1, 3, 18, 19); /* never the byte piece */
    EXPECT_IDS(t, "  a", 1, 3, 3, 6);      /* spaces kept by default */
    EXPECT_IDS(t, SP "a", 1, 3, 6);        /* a literal U+2581 is a space */
    pd_tokenizer_destroy(&t);

    o.add_space = 0;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_OK);
    EXPECT_IDS(t, "ab", 1, 7);
    EXPECT_IDS(t, "aaa", 1, 20, 4); /* equal scores: the leftmost pair first */
    EXPECT_IDS(t, "aaaaa", 1, 20, 20, 4);
    char out[32];
    pd_detok_t d;
    pd_detok_init(&d, t);
    pd_detok_feed(&d, 1, out, sizeof out);
    ck_assert_uint_eq(pd_detok_feed(&d, 6, out, sizeof out), 2); /* no prefix to drop */
    pd_tokenizer_destroy(&t);

    o = G_DEFAULT;
    o.remove_ws = 1;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_OK);
    EXPECT_IDS(t, "  a   b  ", 1, 6, 3, 5);
    EXPECT_IDS(t, "a b " SP " ", 1, 6, 3, 5);
    EXPECT_IDS(t, "   ", 1);
    pd_tokenizer_destroy(&t);

    o = G_DEFAULT;
    o.model = "gpt2";
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_UNSUPPORTED);
    ck_assert_ptr_null(t);
    ck_assert_ptr_nonnull(strstr(pd_test_last_error, "gpt2"));
    o.model = NULL;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_UNSUPPORTED);
    o = G_DEFAULT;
    o.n_scores = 0;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_FORMAT);
    o.n_scores = G_N - 1;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_FORMAT);
    o = G_DEFAULT;
    o.bos = G_N;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_FORMAT);
    o = G_DEFAULT;
    o.bad_type = 9;
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_FORMAT);
    o.bad_type = 6; /* "a" claimed to be a byte token */
    ck_assert_int_eq(gguf_tokenizer(&o, &t), PD_ERR_FORMAT);
    ck_assert_ptr_null(t);
}
END_TEST

/* ---- speed ---- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

START_TEST(test_encode_speed)
{
    pd_tokenizer_t *t[2] = {load_bin("llama2_tokenizer.bin", 32000),
                            load_bin("tok512.bin", 512)};
    static char text[64 * 1024];
    static int32_t ids[64 * 1024];
    size_t len = 0;
    const char *words[] = {"Once",
                           " upon",
                           " a",
                           " time",
                           ",",
                           " there",
                           " was",
                           " caf\xc3\xa9",
                           " \xe4\xb8\xad\xe6\x96\x87",
                           "\n",
                           " 12345",
                           " aaaaaaaa",
                           "  "};
    srand(3);
    while (len < 20000) {
        const char *w = words[rand() % 13];
        memcpy(text + len, w, strlen(w));
        len += strlen(w);
    }
    for (int k = 0; k < 2; k++) {
        size_t n = 0;
        double best = 1e9;
        for (int rep = 0; rep < 3; rep++) {
            double t0 = now_ms();
            ck_assert_int_eq(
                pd_tokenizer_encode(t[k], text, len, true, ids, 64 * 1024, &n), PD_OK);
            double dt = now_ms() - t0;
            best = dt < best ? dt : best;
        }
        ck_assert_uint_ge(n, 4000);
        fprintf(stderr, "encode: %zu bytes -> %zu tokens in %.2f ms\n", len, n, best);
        ck_assert_msg(best < 50.0, "encoding %zu tokens took %.1f ms", n, best);
        pd_tokenizer_destroy(&t[k]);
    }
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 120, pd_test_log_setup, NULL);
    PD_TEST_ADD(tc, test_golden_prompts, test_gguf_equals_bin, test_round_trip,
                test_specials_are_text, test_empty_and_bos, test_char_level_unk,
                test_invalid_utf8, test_detok_rules, test_detok_random_streams,
                test_corrupt_bin, test_crafted_gguf, test_encode_speed);
    return pd_test_run("tokenizer", tc);
}
