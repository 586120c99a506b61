/* tokenizer.c - SentencePiece BPE encoder and a streaming, UTF-8-safe decoder.
 *
 * Design. The vocabulary lives in one blob (each piece NUL-terminated, SentencePiece's
 * U+2581 stored as ' '), with per-id score and type. Only normal and user-defined
 * pieces can be matched by text or produced by a merge: control (<s>, </s>), unknown
 * and byte (<0xNN>) pieces are reachable only by id, so a prompt holding the literal
 * text "<s>" is encoded as its characters, as SentencePiece does. Lookup is an
 * open-addressing hash table over the matchable pieces.
 *
 * Encoding (pd_tokenizer_encode) is llama2.c's encode() made O(n log n): the text
 * (with the dummy-prefix space) is split into symbols, one per UTF-8 character or,
 * for invalid UTF-8, per byte; every adjacent pair whose concatenation is a piece
 * goes into a max-heap ordered by score, leftmost first on ties; the best pair is
 * merged and its new neighbours are pushed, stale heap entries being recognised by
 * their length. This is exactly SentencePiece's BPE loop, and picks the same merges
 * as llama2.c's repeated scan (highest score, leftmost). A symbol left without a
 * piece becomes its bytes' <0xNN> tokens, or UNK when the vocabulary has no byte
 * tokens (consecutive unknown characters collapsing into one UNK, as SentencePiece
 * does). Where llama2.c and SentencePiece differ, SentencePiece (what the model was
 * trained on) wins: a literal U+2581 in the text is a space to both SentencePiece and
 * llama.cpp, so it is encoded as one here too. SentencePiece's removal of extra
 * whitespace is applied only when a GGUF asks for it
 * (tokenizer.ggml.remove_extra_whitespaces): llama2.c never applies it.
 *
 * Decoding (pd_detok_*) runs every output byte through a UTF-8 assembler that holds
 * an incomplete character back and turns a byte that can never complete one into
 * U+FFFD (one per maximal invalid subpart, the Unicode recommendation).
 *
 * Threading: a tokenizer is immutable after construction; encode and the piece
 * accessors may run concurrently. A pd_detok_t belongs to one stream (one thread). */
#include "common/tokenizer.h"
#include "common/utf8.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

enum {
    TT_NORMAL = 1,
    TT_UNKNOWN = 2,
    TT_CONTROL = 3,
    TT_USER = 4,
    TT_UNUSED = 5,
    TT_BYTE = 6,
};

#define MAX_VOCAB      (1 << 24)
#define MAX_FILE_BYTES ((size_t)1 << 30)
#define MAX_TEXT_BYTES ((size_t)1 << 30)

struct pd_tokenizer {
    int32_t n_vocab;
    char *blob; /* all pieces, each NUL-terminated */
    size_t blob_cap, blob_used;
    size_t *off;   /* [n_vocab] offset of each piece in blob */
    uint32_t *len; /* [n_vocab] piece length in bytes */
    float *score;  /* [n_vocab] */
    uint8_t *type; /* [n_vocab] TT_* */
    int32_t bos, eos, unk;
    bool add_space_prefix;
    bool remove_extra_ws;
    bool has_bytes;       /* any <0xNN> token: byte fallback instead of UNK */
    int32_t byte_id[256]; /* byte -> its <0xNN> token, -1 if none */
    size_t max_piece_len; /* worst-case decoded bytes of one piece */
    int32_t *slots;       /* hash table of matchable piece ids, -1 empty */
    size_t slot_mask;
};

/* ---- vocabulary ------------------------------------------------------------ */

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static bool matchable(const pd_tokenizer_t *t, int32_t id)
{
    uint8_t ty = t->type[id];
    return (ty == TT_NORMAL || ty == TT_USER) && t->len[id] > 0;
}

/* The matchable piece equal to s[0..n), -1 if none. */
static int32_t lookup(const pd_tokenizer_t *t, const char *s, size_t n)
{
    for (size_t i = hash_bytes(s, n) & t->slot_mask;; i = (i + 1) & t->slot_mask) {
        int32_t id = t->slots[i];
        if (id < 0)
            return -1;
        if (t->len[id] == n && memcmp(t->blob + t->off[id], s, n) == 0)
            return id;
    }
}

/* "<0xNN>" (uppercase or lowercase hex) -> NN, else -1. */
static int parse_byte_piece(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                       : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static pd_status_t tok_alloc(int32_t n, size_t blob_cap, pd_tokenizer_t **tok_p)
{
    pd_tokenizer_t *t = calloc(1, sizeof *t);
    if (!t) {
        PD_LOG_ERROR("tokenizer: out of memory");
        return PD_ERR_NOMEM;
    }
    t->n_vocab = n;
    t->blob_cap = blob_cap;
    t->blob = malloc(blob_cap ? blob_cap : 1);
    t->off = calloc((size_t)n, sizeof *t->off);
    t->len = calloc((size_t)n, sizeof *t->len);
    t->score = calloc((size_t)n, sizeof *t->score);
    t->type = calloc((size_t)n, sizeof *t->type);
    if (!t->blob || !t->off || !t->len || !t->score || !t->type) {
        pd_tokenizer_destroy(&t);
        PD_LOG_ERROR("tokenizer: out of memory for %d pieces", (int)n);
        return PD_ERR_NOMEM;
    }
    t->bos = 1;
    t->eos = 2;
    t->unk = 0;
    t->add_space_prefix = true;
    *tok_p = t;
    return PD_OK;
}

/* Appends piece id's bytes, turning U+2581 into ' ' when sp_escaped. The caller
 * sized blob_cap for len + 1 bytes per piece. */
static void tok_put(pd_tokenizer_t *t, int32_t id, const char *s, size_t n,
                    bool sp_escaped, float score, uint8_t type)
{
    char *dst = t->blob + t->blob_used;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (sp_escaped && i + 2 < n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
            dst[k++] = ' ';
            i += 2;
        } else {
            dst[k++] = s[i];
        }
    }
    dst[k] = '\0';
    t->off[id] = t->blob_used;
    t->len[id] = (uint32_t)k;
    t->blob_used += k + 1;
    t->score[id] = isnan(score) ? -INFINITY : score;
    t->type[id] = type;
}

static pd_status_t build_hash(pd_tokenizer_t *t)
{
    size_t cap = 16;
    while (cap < 2 * (size_t)t->n_vocab)
        cap *= 2;
    t->slots = malloc(cap * sizeof *t->slots);
    if (!t->slots) {
        PD_LOG_ERROR("tokenizer: out of memory for the piece table");
        return PD_ERR_NOMEM;
    }
    memset(t->slots, 0xff, cap * sizeof *t->slots);
    t->slot_mask = cap - 1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (!matchable(t, id))
            continue;
        const char *s = t->blob + t->off[id];
        if (lookup(t, s, t->len[id]) >= 0)
            continue; /* a duplicate piece: the lowest id wins */
        size_t i = hash_bytes(s, t->len[id]) & t->slot_mask;
        while (t->slots[i] >= 0)
            i = (i + 1) & t->slot_mask;
        t->slots[i] = id;
    }
    return PD_OK;
}

/* Validates the special ids and byte tokens and builds the lookup structures. */
static pd_status_t tok_finish(pd_tokenizer_t *t, const char *what)
{
    const int32_t special[3] = {t->bos, t->eos, t->unk};
    for (int i = 0; i < 3; i++) {
        if (special[i] < 0 || special[i] >= t->n_vocab) {
            PD_LOG_ERROR("%s: special token id %d outside the vocabulary of %d", what,
                         (int)special[i], (int)t->n_vocab);
            return PD_ERR_FORMAT;
        }
    }
    for (int b = 0; b < 256; b++)
        t->byte_id[b] = -1;
    t->max_piece_len = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = t->blob + t->off[id];
        size_t n = t->len[id];
        if (t->type[id] == TT_BYTE) {
            int b = parse_byte_piece(s, n);
            if (b < 0) {
                PD_LOG_ERROR("%s: byte token %d is not of the form <0xNN>", what,
                             (int)id);
                return PD_ERR_FORMAT;
            }
            if (t->byte_id[b] < 0)
                t->byte_id[b] = id;
            t->has_bytes = true;
        }
        /* A piece that is not valid UTF-8 may decode to U+FFFD for every byte. */
        size_t dec = pd_utf8_valid((const unsigned char *)s, n) ? n : 3 * n;
        if (dec > t->max_piece_len)
            t->max_piece_len = dec;
    }
    return build_hash(t);
}

void pd_tokenizer_destroy(pd_tokenizer_t **tok_p)
{
    if (!tok_p || !*tok_p)
        return;
    pd_tokenizer_t *t = *tok_p;
    free(t->slots);
    free(t->type);
    free(t->score);
    free(t->len);
    free(t->off);
    free(t->blob);
    free(t);
    *tok_p = NULL;
}

/* ---- tokenizer.bin ------------------------------------------------------------ */

static pd_status_t read_file(const char *path, unsigned char **data_p, size_t *size_p)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        PD_LOG_ERROR("cannot open tokenizer %s: %s", path, strerror(errno));
        return PD_ERR_IO;
    }
    pd_status_t st = PD_ERR_IO;
    unsigned char *data = NULL;
    long sz = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        sz = ftell(f);
    if (sz < 0 || fseek(f, 0, SEEK_SET) != 0) {
        PD_LOG_ERROR("cannot size tokenizer %s: %s", path, strerror(errno));
        goto err_close;
    }
    if ((size_t)sz > MAX_FILE_BYTES) {
        PD_LOG_ERROR("tokenizer %s is too large (%ld bytes)", path, sz);
        st = PD_ERR_FORMAT;
        goto err_close;
    }
    data = malloc((size_t)sz + 1);
    if (!data) {
        PD_LOG_ERROR("out of memory reading tokenizer %s", path);
        st = PD_ERR_NOMEM;
        goto err_close;
    }
    if (fread(data, 1, (size_t)sz, f) != (size_t)sz) {
        PD_LOG_ERROR("short read on tokenizer %s", path);
        goto err_free;
    }
    fclose(f);
    *data_p = data;
    *size_p = (size_t)sz;
    return PD_OK;
err_free:
    free(data);
err_close:
    fclose(f);
    return st;
}

/* Records (score, len, bytes) in a tokenizer.bin image up to the first malformed
 * one; parse_bin then checks them all. Capped past MAX_VOCAB. */
static int32_t count_bin_records(const unsigned char *d, size_t size)
{
    size_t pos = 4;
    int32_t n = 0, len;
    while (size >= pos + 8 && n <= MAX_VOCAB) {
        memcpy(&len, d + pos + 4, 4);
        if (len < 0 || (size_t)len > size - pos - 8)
            break;
        pos += 8 + (size_t)len;
        n++;
    }
    return n;
}

/* Parses the pieces of a tokenizer.bin image into a new tokenizer. */
static pd_status_t parse_bin(const char *path, const unsigned char *d, size_t size,
                             int32_t n, pd_tokenizer_t **tok_p)
{
    if (size < 4 + 8 * (size_t)n) { /* before allocating for n tokens */
        PD_LOG_ERROR("tokenizer %s: %zu bytes cannot hold %d tokens", path, size, (int)n);
        return PD_ERR_FORMAT;
    }
    int32_t max_len, len; /* little-endian, as the host (as everywhere in pdserve) */
    memcpy(&max_len, d, 4);
    if (max_len < 0) {
        PD_LOG_ERROR("tokenizer %s: negative max_token_length %d", path, (int)max_len);
        return PD_ERR_FORMAT;
    }
    pd_tokenizer_t *t = NULL;
    pd_status_t st = tok_alloc(n, size, &t); /* pieces + NULs fit in the file size */
    if (st != PD_OK)
        return st;
    size_t pos = 4;
    for (int32_t id = 0; id < n; id++) {
        if (size - pos < 8) {
            PD_LOG_ERROR("tokenizer %s: truncated at token %d of %d (offset %zu)", path,
                         (int)id, (int)n, pos);
            goto err_format;
        }
        float score;
        memcpy(&score, d + pos, 4);
        memcpy(&len, d + pos + 4, 4);
        pos += 8;
        if (len < 0 || len > max_len || (size_t)len > size - pos) {
            PD_LOG_ERROR("tokenizer %s: token %d has length %d (max_token_length %d, "
                         "%zu bytes left)",
                         path, (int)id, (int)len, (int)max_len, size - pos);
            goto err_format;
        }
        const char *s = (const char *)d + pos;
        uint8_t type = id == 0                                 ? TT_UNKNOWN
                       : id <= 2                               ? TT_CONTROL
                       : parse_byte_piece(s, (size_t)len) >= 0 ? TT_BYTE
                                                               : TT_NORMAL;
        tok_put(t, id, s, (size_t)len, false, score, type);
        pos += (size_t)len;
    }
    if (pos != size) {
        PD_LOG_ERROR("tokenizer %s: %zu bytes left after %d tokens (wrong vocab_size?)",
                     path, size - pos, (int)n);
        goto err_format;
    }
    st = tok_finish(t, path);
    if (st != PD_OK)
        goto err_destroy;
    *tok_p = t;
    return PD_OK;
err_format:
    st = PD_ERR_FORMAT;
err_destroy:
    pd_tokenizer_destroy(&t);
    return st;
}

pd_status_t pd_tokenizer_load_bin(const char *path, int32_t vocab_size,
                                  pd_tokenizer_t **tok_p)
{
    if (!path || !tok_p) {
        PD_LOG_ERROR("tokenizer: null argument to load_bin");
        return PD_ERR_INVALID;
    }
    unsigned char *data = NULL;
    size_t size = 0;
    pd_status_t st = read_file(path, &data, &size);
    if (st != PD_OK)
        return st;
    if (vocab_size <= 0)
        vocab_size = count_bin_records(data, size);
    if (vocab_size < 3 || vocab_size > MAX_VOCAB) {
        PD_LOG_ERROR("tokenizer %s: vocab_size %d out of range [3, %d]", path,
                     (int)vocab_size, MAX_VOCAB);
        free(data);
        return PD_ERR_FORMAT;
    }
    st = parse_bin(path, data, size, vocab_size, tok_p);
    free(data);
    return st;
}

/* ---- GGUF ----------------------------------------------------------------------- */

#define KEY_MODEL  "tokenizer.ggml.model"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES  "tokenizer.ggml.token_type"

/* An optional u32 key: default when absent, error when malformed. */
static pd_status_t opt_id(const pd_gguf_t *g, const char *key, int32_t *v_p)
{
    uint32_t v;
    pd_status_t st = pd_gguf_get_u32(g, key, &v);
    if (st == PD_ERR_NOT_FOUND)
        return PD_OK;
    if (st != PD_OK) {
        PD_LOG_ERROR("gguf: bad %s: %s", key, pd_status_str(st));
        return st;
    }
    if (v > (uint32_t)INT32_MAX) {
        PD_LOG_ERROR("gguf: %s = %u is not a token id", key, v);
        return PD_ERR_FORMAT;
    }
    *v_p = (int32_t)v;
    return PD_OK;
}

static pd_status_t opt_bool(const pd_gguf_t *g, const char *key, bool *v_p)
{
    int v;
    pd_status_t st = pd_gguf_get_bool(g, key, &v);
    if (st == PD_ERR_NOT_FOUND)
        return PD_OK;
    if (st != PD_OK) {
        PD_LOG_ERROR("gguf: bad %s: %s", key, pd_status_str(st));
        return st;
    }
    *v_p = v != 0;
    return PD_OK;
}

static pd_status_t check_model(const pd_gguf_t *g)
{
    const char *s = NULL;
    size_t n = 0;
    pd_status_t st = pd_gguf_get_str(g, KEY_MODEL, &s, &n);
    if (st == PD_ERR_NOT_FOUND) {
        PD_LOG_ERROR("gguf: no %s: not a SentencePiece (llama) vocabulary", KEY_MODEL);
        return PD_ERR_UNSUPPORTED;
    }
    if (st != PD_OK) {
        PD_LOG_ERROR("gguf: bad %s: %s", KEY_MODEL, pd_status_str(st));
        return st;
    }
    if (n != 5 || memcmp(s, "llama", 5) != 0) {
        PD_LOG_ERROR("gguf: tokenizer model '%.*s' is not supported (only 'llama', "
                     "SentencePiece BPE)",
                     (int)(n > 64 ? 64 : n), s);
        return PD_ERR_UNSUPPORTED;
    }
    return PD_OK;
}

/* A numeric array of exactly n elements of one of two element types. */
static pd_status_t get_arr_n(const pd_gguf_t *g, const char *key, uint64_t n,
                             pd_gguf_type_t ty1, pd_gguf_type_t ty2, const void **data_p)
{
    pd_gguf_type_t ty;
    uint64_t cnt;
    pd_status_t st = pd_gguf_get_arr(g, key, &ty, &cnt, data_p);
    if (st == PD_ERR_NOT_FOUND)
        return st;
    if (st != PD_OK) {
        PD_LOG_ERROR("gguf: bad %s: %s", key, pd_status_str(st));
        return st;
    }
    if ((ty != ty1 && ty != ty2) || cnt != n) {
        PD_LOG_ERROR("gguf: %s has element type %d and %llu elements, expected %llu", key,
                     (int)ty, (unsigned long long)cnt, (unsigned long long)n);
        return PD_ERR_FORMAT;
    }
    return PD_OK;
}

/* Reads the per-token type, or infers it (ids, <0xNN>) when the array is absent. */
static pd_status_t token_type(const pd_tokenizer_t *t, const void *types, int32_t id,
                              const char *s, size_t n, uint8_t *type_p)
{
    if (!types) {
        *type_p = id == t->unk                   ? TT_UNKNOWN
                  : id == t->bos || id == t->eos ? TT_CONTROL
                  : parse_byte_piece(s, n) >= 0  ? TT_BYTE
                                                 : TT_NORMAL;
        return PD_OK;
    }
    int32_t v;
    memcpy(&v, (const unsigned char *)types + 4 * (size_t)id, sizeof v);
    if (v < 0 || v > TT_BYTE) {
        PD_LOG_ERROR("gguf: token %d has unknown type %d", (int)id, (int)v);
        return PD_ERR_FORMAT;
    }
    *type_p = v == 0 ? TT_NORMAL : (uint8_t)v; /* 0: llama.cpp's "undefined" */
    return PD_OK;
}

static pd_status_t fill_from_gguf(pd_tokenizer_t *t, const pd_gguf_t *g,
                                  const void *scores, const void *types)
{
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s;
        size_t n;
        pd_status_t st = pd_gguf_get_arr_str(g, KEY_TOKENS, (uint64_t)id, &s, &n);
        if (st != PD_OK) {
            PD_LOG_ERROR("gguf: token %d: %s", (int)id, pd_status_str(st));
            return st;
        }
        if (n > t->blob_cap - t->blob_used - 1) { /* pass 1 sized it; guard anyway */
            PD_LOG_ERROR("gguf: token %d changed size", (int)id);
            return PD_ERR_INTERNAL;
        }
        float score;
        memcpy(&score, (const unsigned char *)scores + 4 * (size_t)id, sizeof score);
        uint8_t type;
        st = token_type(t, types, id, s, n, &type);
        if (st != PD_OK)
            return st;
        tok_put(t, id, s, n, true, score, type);
    }
    return PD_OK;
}

/* Sums the piece sizes (plus a NUL each) for the blob. */
static pd_status_t gguf_blob_size(const pd_gguf_t *g, uint64_t n, size_t *size_p)
{
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        pd_status_t st = pd_gguf_get_arr_str(g, KEY_TOKENS, i, &s, &len);
        if (st != PD_OK) {
            PD_LOG_ERROR("gguf: token %llu: %s", (unsigned long long)i,
                         pd_status_str(st));
            return st;
        }
        if (len > UINT32_MAX || len + 1 > SIZE_MAX - total) {
            PD_LOG_ERROR("gguf: token %llu is too long", (unsigned long long)i);
            return PD_ERR_OVERFLOW;
        }
        total += len + 1;
    }
    *size_p = total;
    return PD_OK;
}

pd_status_t pd_tokenizer_from_gguf(const pd_gguf_t *g, pd_tokenizer_t **tok_p)
{
    if (!g || !tok_p) {
        PD_LOG_ERROR("tokenizer: null argument to from_gguf");
        return PD_ERR_INVALID;
    }
    pd_status_t st = check_model(g);
    if (st != PD_OK)
        return st;
    uint64_t n;
    st = pd_gguf_get_arr_len(g, KEY_TOKENS, &n);
    if (st != PD_OK) {
        PD_LOG_ERROR("gguf: no usable %s: %s", KEY_TOKENS, pd_status_str(st));
        return st == PD_ERR_NOT_FOUND ? PD_ERR_FORMAT : st;
    }
    if (n < 3 || n > MAX_VOCAB) {
        PD_LOG_ERROR("gguf: %llu tokens, expected 3..%d", (unsigned long long)n,
                     MAX_VOCAB);
        return PD_ERR_FORMAT;
    }
    const void *scores = NULL, *types = NULL;
    st = get_arr_n(g, KEY_SCORES, n, PD_GGUF_TYPE_F32, PD_GGUF_TYPE_F32, &scores);
    if (st == PD_ERR_NOT_FOUND)
        PD_LOG_ERROR("gguf: no %s (a SentencePiece BPE vocabulary needs scores)",
                     KEY_SCORES);
    if (st != PD_OK)
        return st == PD_ERR_NOT_FOUND ? PD_ERR_FORMAT : st;
    st = get_arr_n(g, KEY_TYPES, n, PD_GGUF_TYPE_I32, PD_GGUF_TYPE_U32, &types);
    if (st != PD_OK && st != PD_ERR_NOT_FOUND)
        return st;
    size_t blob = 0;
    st = gguf_blob_size(g, n, &blob);
    if (st != PD_OK)
        return st;
    pd_tokenizer_t *t = NULL;
    st = tok_alloc((int32_t)n, blob, &t);
    if (st != PD_OK)
        return st;
    if ((st = opt_id(g, "tokenizer.ggml.bos_token_id", &t->bos)) != PD_OK ||
        (st = opt_id(g, "tokenizer.ggml.eos_token_id", &t->eos)) != PD_OK ||
        (st = opt_id(g, "tokenizer.ggml.unknown_token_id", &t->unk)) != PD_OK ||
        (st = opt_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix)) !=
            PD_OK ||
        (st = opt_bool(g, "tokenizer.ggml.remove_extra_whitespaces",
                       &t->remove_extra_ws)) != PD_OK)
        goto err_destroy;
    st = fill_from_gguf(t, g, scores, types);
    if (st != PD_OK)
        goto err_destroy;
    st = tok_finish(t, "gguf tokenizer");
    if (st != PD_OK)
        goto err_destroy;
    *tok_p = t;
    return PD_OK;
err_destroy:
    pd_tokenizer_destroy(&t);
    return st;
}

/* ---- accessors ------------------------------------------------------------------ */

int32_t pd_tokenizer_n_vocab(const pd_tokenizer_t *tok)
{
    return tok->n_vocab;
}

int32_t pd_tokenizer_bos(const pd_tokenizer_t *tok)
{
    return tok->bos;
}

int32_t pd_tokenizer_eos(const pd_tokenizer_t *tok)
{
    return tok->eos;
}

size_t pd_tokenizer_max_piece_len(const pd_tokenizer_t *tok)
{
    return tok->max_piece_len;
}

float pd_tokenizer_score(const pd_tokenizer_t *tok, int32_t id)
{
    return id >= 0 && id < tok->n_vocab ? tok->score[id] : 0.0f;
}

int pd_tokenizer_type(const pd_tokenizer_t *tok, int32_t id)
{
    return id >= 0 && id < tok->n_vocab ? tok->type[id] : 0;
}

const char *pd_tokenizer_piece(const pd_tokenizer_t *tok, int32_t id, size_t *len_p)
{
    if (!tok || id < 0 || id >= tok->n_vocab)
        return NULL;
    if (len_p)
        *len_p = tok->len[id];
    return tok->blob + tok->off[id];
}

/* ---- encoding ------------------------------------------------------------------- */

typedef struct sym {
    int32_t start, len; /* bytes of the normalized text; len 0 once merged away */
    int32_t prev, next; /* neighbours, -1 at the ends */
    int32_t id;         /* matchable piece, -1 if the text is not one */
} sym_t;

typedef struct pair {
    float score;
    int32_t left; /* symbol index: the leftmost pair wins ties */
    int32_t len;  /* left.len + right.len when pushed: stale if they changed */
    int32_t id;   /* the merged piece */
} pair_t;

typedef struct heap {
    pair_t *a;
    size_t n;
} heap_t;

static bool pair_before(const pair_t *x, const pair_t *y)
{
    return x->score > y->score || (x->score == y->score && x->left < y->left);
}

static void heap_push(heap_t *h, pair_t p)
{
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!pair_before(&p, &h->a[parent]))
            break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = p;
}

static pair_t heap_pop(heap_t *h)
{
    pair_t top = h->a[0], last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && pair_before(&h->a[c + 1], &h->a[c]))
            c++;
        if (!pair_before(&h->a[c], &last))
            break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0)
        h->a[i] = last;
    return top;
}

typedef struct enc {
    const pd_tokenizer_t *t;
    char *buf;  /* [len + 1] normalized text */
    sym_t *sym; /* [len + 1] */
    int32_t n_sym;
    heap_t heap; /* capacity 3 * (len + 1): n - 1 initial pairs + 2 per merge */
} enc_t;

static void try_pair(enc_t *e, int32_t l)
{
    if (l < 0 || e->sym[l].next < 0)
        return;
    const sym_t *a = &e->sym[l], *b = &e->sym[a->next];
    int32_t id = lookup(e->t, e->buf + a->start, (size_t)(a->len + b->len));
    if (id >= 0)
        heap_push(&e->heap, (pair_t){e->t->score[id], l, a->len + b->len, id});
}

static void add_sym(enc_t *e, int32_t start, int32_t len)
{
    int32_t i = e->n_sym++;
    e->sym[i] = (sym_t){start, len, i - 1, -1, lookup(e->t, e->buf + start, (size_t)len)};
    if (i > 0)
        e->sym[i - 1].next = i;
}

/* Normalizes text into e->buf (dummy-prefix space, U+2581 as ' ', extra spaces
 * removed if the vocabulary asks) and splits it into one symbol per UTF-8
 * character, one per byte where the UTF-8 is invalid. */
static void split_text(enc_t *e, const char *text, size_t len)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t b = 0, end = len;
    if (e->t->remove_extra_ws) {
        while (b < end && s[b] == ' ')
            b++;
        /* SentencePiece strips trailing whitespace after escaping spaces as U+2581,
         * so a literal U+2581 at the end goes too; leading ones stay. */
        for (;;) {
            if (end > b && s[end - 1] == ' ')
                end--;
            else if (end - b >= 3 && memcmp(s + end - 3, "\xe2\x96\x81", 3) == 0)
                end -= 3;
            else
                break;
        }
    }
    int32_t w = 0;
    if (e->t->add_space_prefix && end > b) {
        e->buf[w] = ' ';
        add_sym(e, w++, 1);
    }
    for (size_t i = b; i < end;) {
        if (e->t->remove_extra_ws && s[i] == ' ' && i > b && s[i - 1] == ' ') {
            i++;
            continue;
        }
        int k = pd_utf8_char_len(s + i, end - i);
        if (k == 0)
            k = 1;
        if (k == 3 && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
            e->buf[w] = ' ';
            add_sym(e, w++, 1);
        } else {
            memcpy(e->buf + w, s + i, (size_t)k);
            add_sym(e, w, k);
            w += k;
        }
        i += (size_t)k;
    }
}

static void merge_all(enc_t *e)
{
    for (int32_t i = 0; i + 1 < e->n_sym; i++)
        try_pair(e, i);
    while (e->heap.n > 0) {
        pair_t p = heap_pop(&e->heap);
        sym_t *a = &e->sym[p.left];
        if (a->len == 0 || a->next < 0)
            continue;
        sym_t *b = &e->sym[a->next];
        if (a->len + b->len != p.len)
            continue; /* stale: one side has merged since */
        a->len += b->len;
        a->id = p.id;
        b->len = 0;
        a->next = b->next;
        if (a->next >= 0)
            e->sym[a->next].prev = p.left;
        try_pair(e, a->prev);
        try_pair(e, p.left);
    }
}

/* Emits the final symbols: pieces as themselves, the rest as byte tokens or UNK. */
static size_t emit_ids(const enc_t *e, size_t n, int32_t *ids, size_t cap)
{
    const pd_tokenizer_t *t = e->t;
    bool last_unk = false;
    for (int32_t i = e->n_sym > 0 ? 0 : -1; i >= 0; i = e->sym[i].next) {
        const sym_t *s = &e->sym[i];
        if (s->id >= 0) {
            if (n < cap)
                ids[n] = s->id;
            n++;
            last_unk = false;
        } else if (t->has_bytes) {
            for (int32_t j = 0; j < s->len; j++) {
                int32_t id = t->byte_id[(unsigned char)e->buf[s->start + j]];
                if (n < cap)
                    ids[n] = id >= 0 ? id : t->unk;
                n++;
            }
            last_unk = false;
        } else if (!last_unk) { /* SentencePiece: consecutive unknowns are one UNK */
            if (n < cap)
                ids[n] = t->unk;
            n++;
            last_unk = true;
        }
    }
    return n;
}

pd_status_t pd_tokenizer_encode(const pd_tokenizer_t *tok, const char *text, size_t len,
                                bool add_bos, int32_t *ids, size_t cap, size_t *n_p)
{
    if (!tok || (!text && len > 0) || (!ids && cap > 0) || !n_p) {
        PD_LOG_ERROR("tokenizer: bad arguments to encode");
        return PD_ERR_INVALID;
    }
    if (len > MAX_TEXT_BYTES) {
        PD_LOG_ERROR("tokenizer: text of %zu bytes is too long to encode", len);
        return PD_ERR_RANGE;
    }
    enc_t e = {.t = tok};
    e.buf = malloc(len + 1);
    e.sym = malloc((len + 1) * sizeof *e.sym);
    e.heap.a = malloc(3 * (len + 1) * sizeof *e.heap.a);
    if (!e.buf || !e.sym || !e.heap.a) {
        free(e.heap.a);
        free(e.sym);
        free(e.buf);
        PD_LOG_ERROR("tokenizer: out of memory encoding %zu bytes", len);
        return PD_ERR_NOMEM;
    }
    split_text(&e, text, len);
    merge_all(&e);
    size_t n = 0;
    if (add_bos) {
        if (cap > 0)
            ids[0] = tok->bos;
        n = 1;
    }
    n = emit_ids(&e, n, ids, cap);
    free(e.heap.a);
    free(e.sym);
    free(e.buf);
    *n_p = n;
    if (n > cap) {
        PD_LOG_DEBUG("tokenizer: %zu ids do not fit in %zu", n, cap);
        return PD_ERR_RANGE;
    }
    return PD_OK;
}

/* ---- streaming decoder -------------------------------------------------------- */

typedef struct out {
    char *p;
    size_t cap, n;
    bool full;
} out_t;

static void out_put(out_t *o, const unsigned char *s, size_t k)
{
    if (o->full || o->cap == 0 || k > o->cap - 1 - o->n) {
        if (!o->full)
            PD_LOG_WARN("detok: output buffer of %zu bytes too small, text dropped",
                        o->cap);
        o->full = true;
        return;
    }
    memcpy(o->p + o->n, s, k);
    o->n += k;
}

static const unsigned char REPLACEMENT[3] = {0xEF, 0xBF, 0xBD}; /* U+FFFD */

static void detok_byte(pd_detok_t *d, out_t *o, unsigned char b)
{
    if (d->n_pend > 0) {
        if (pd_utf8_cont_ok(d->pend[0], d->n_pend, b)) {
            d->pend[d->n_pend++] = b;
            if (d->n_pend == pd_utf8_lead_len(d->pend[0])) {
                out_put(o, d->pend, (size_t)d->n_pend);
                d->n_pend = 0;
            }
            return;
        }
        out_put(o, REPLACEMENT, 3); /* the held bytes can never complete */
        d->n_pend = 0;
    }
    int k = pd_utf8_lead_len(b);
    if (k == 1) {
        out_put(o, &b, 1);
    } else if (k == 0) {
        out_put(o, REPLACEMENT, 3);
    } else {
        d->pend[0] = b;
        d->n_pend = 1;
    }
}

static size_t out_end(out_t *o)
{
    if (o->cap > 0)
        o->p[o->n] = '\0';
    return o->n;
}

void pd_detok_init(pd_detok_t *d, const pd_tokenizer_t *tok)
{
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->prev = -1;
}

size_t pd_detok_feed(pd_detok_t *d, int32_t id, char *out, size_t cap)
{
    out_t o = {out, out ? cap : 0, 0, false};
    const pd_tokenizer_t *t = d ? d->tok : NULL;
    if (!t || id < 0 || id >= t->n_vocab)
        return out_end(&o);
    int32_t prev = d->prev;
    d->prev = id;
    uint8_t ty = t->type[id];
    if (id == t->bos || id == t->eos || id == t->unk || ty == TT_CONTROL ||
        ty == TT_UNKNOWN)
        return out_end(&o);
    const unsigned char *s = (const unsigned char *)t->blob + t->off[id];
    size_t n = t->len[id];
    if (ty == TT_BYTE) {
        detok_byte(d, &o, (unsigned char)parse_byte_piece((const char *)s, n));
        return out_end(&o);
    }
    if (t->add_space_prefix && (prev < 0 || prev == t->bos) && n > 0 && s[0] == ' ') {
        s++; /* the dummy prefix */
        n--;
    }
    for (size_t i = 0; i < n; i++)
        detok_byte(d, &o, s[i]);
    return out_end(&o);
}

size_t pd_detok_flush(pd_detok_t *d, char *out, size_t cap)
{
    out_t o = {out, out ? cap : 0, 0, false};
    if (d && d->n_pend > 0) {
        out_put(&o, REPLACEMENT, 3);
        d->n_pend = 0;
    }
    return out_end(&o);
}
