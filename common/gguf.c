/* gguf.c - a bounds-checked GGUF v2/v3 reader over a read-only private mmap.
 *
 * Design: pd_gguf_open() maps the file and walks it once with a cursor that checks
 * every read against the mapped size. Metadata values stay in the mapping: each KV
 * records where its value starts, and string arrays also get a table of item
 * pointers so pd_gguf_get_arr_str() is O(1). Keys and tensor names are indexed in
 * open-addressing hash tables (FNV-1a, linear probing); duplicates are rejected.
 * Tensor names are copied into one NUL-terminated pool because the API hands them
 * out as C strings. Every count read from the file is first bounded by the bytes
 * left (a hostile 2^63 fails at once), and tables grow only as entries are actually
 * parsed, so what is allocated is proportional to the bytes consumed.
 * Errors name the file and the byte offset of the offending field.
 * Threading: open/destroy on one thread; the accessors only read and may run
 * concurrently from any thread after open. */
#include "common/gguf.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/mapfile.h"

#define GGUF_HEADER_BYTES      24 /* magic, version, n_tensors, n_kv */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MIN_KV_BYTES      13 /* key length, type, a 1-byte value */
#define GGUF_MIN_TENSOR_BYTES  33 /* name length + 1 byte, n_dims, ne[0], type, offset */
#define GGUF_KEY_SHOW          64 /* at most this many key bytes in a log line */

typedef struct gguf_kv {
    const char *key; /* into the mapping, not NUL-terminated */
    size_t key_len;
    uint32_t type;         /* pd_gguf_type_t */
    uint32_t arr_type;     /* arrays: element type */
    uint64_t arr_n;        /* arrays: element count */
    const uint8_t *val;    /* scalar: the value; string: its u64 length; array: item 0 */
    const uint8_t **items; /* string arrays: each item's u64 length prefix [arr_n] */
} gguf_kv_t;

typedef struct gguf_tensor {
    const char *src; /* name in the mapping while parsing */
    size_t name_len;
    size_t name_off; /* into pd_gguf.names */
    size_t info_off; /* file offset of the tensor info, for messages */
    uint64_t offset; /* relative to the data section */
    pd_tensor_t t;
} gguf_tensor_t;

typedef struct gguf_index {
    size_t *slots; /* entry index + 1; 0 = empty */
    size_t mask;
} gguf_index_t;

struct pd_gguf {
    const uint8_t *map;
    size_t size;
    unsigned map_flags; /* PD_MAP_* it was opened with */
    uint32_t version;
    gguf_kv_t *kvs;
    size_t n_kv;
    gguf_tensor_t *tensors;
    size_t n_tensors;
    char *names; /* tensor names, each NUL-terminated */
    gguf_index_t kv_index;
    gguf_index_t tensor_index;
    size_t alignment;
    size_t data_off;
};

typedef struct cursor {
    const uint8_t *p;
    size_t size;
    size_t pos;
    const char *path;
} cursor_t;

__attribute__((format(printf, 4, 5))) static pd_status_t
fail_at(const cursor_t *c, size_t off, pd_status_t st, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PD_LOG_ERROR("gguf %s: byte %zu: %s", c->path, off, msg);
    return st;
}

static int key_show(size_t len)
{
    return len > GGUF_KEY_SHOW ? GGUF_KEY_SHOW : (int)len;
}

static size_t bytes_left(const cursor_t *c)
{
    return c->size - c->pos;
}

static pd_status_t read_u32(cursor_t *c, const char *what, uint32_t *v_p)
{
    if (bytes_left(c) < 4)
        return fail_at(c, c->pos, PD_ERR_FORMAT, "truncated reading %s", what);
    memcpy(v_p, c->p + c->pos, 4);
    c->pos += 4;
    return PD_OK;
}

static pd_status_t read_u64(cursor_t *c, const char *what, uint64_t *v_p)
{
    if (bytes_left(c) < 8)
        return fail_at(c, c->pos, PD_ERR_FORMAT, "truncated reading %s", what);
    memcpy(v_p, c->p + c->pos, 8);
    c->pos += 8;
    return PD_OK;
}

/* A u64-length-prefixed string; *s_p points into the mapping. */
static pd_status_t read_str(cursor_t *c, const char *what, const char **s_p,
                            size_t *len_p)
{
    size_t at = c->pos;
    uint64_t n = 0;
    pd_status_t st = read_u64(c, what, &n);
    if (st != PD_OK)
        return st;
    if (n > bytes_left(c))
        return fail_at(c, at, PD_ERR_FORMAT, "%s length %llu exceeds the %zu bytes left",
                       what, (unsigned long long)n, bytes_left(c));
    *s_p = (const char *)(c->p + c->pos);
    *len_p = (size_t)n;
    c->pos += (size_t)n;
    return PD_OK;
}

static size_t scalar_size(uint32_t type)
{
    switch (type) {
    case PD_GGUF_TYPE_U8:
    case PD_GGUF_TYPE_I8:
    case PD_GGUF_TYPE_BOOL:
        return 1;
    case PD_GGUF_TYPE_U16:
    case PD_GGUF_TYPE_I16:
        return 2;
    case PD_GGUF_TYPE_U32:
    case PD_GGUF_TYPE_I32:
    case PD_GGUF_TYPE_F32:
        return 4;
    case PD_GGUF_TYPE_U64:
    case PD_GGUF_TYPE_I64:
    case PD_GGUF_TYPE_F64:
        return 8;
    default:
        return 0;
    }
}

/* ---- hash indexes over keys and tensor names ---- */

enum { IX_KV, IX_TENSOR };

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static void entry_key(const pd_gguf_t *g, int kind, size_t i, const char **k_p,
                      size_t *n_p)
{
    if (kind == IX_KV) {
        *k_p = g->kvs[i].key;
        *n_p = g->kvs[i].key_len;
    } else {
        *k_p = g->tensors[i].src;
        *n_p = g->tensors[i].name_len;
    }
}

/* Entry index + 1 of key k, or 0. */
static size_t index_lookup(const pd_gguf_t *g, int kind, const char *k, size_t n)
{
    const gguf_index_t *ix = kind == IX_KV ? &g->kv_index : &g->tensor_index;
    if (!ix->slots)
        return 0;
    for (size_t s = (size_t)hash_bytes(k, n) & ix->mask;; s = (s + 1) & ix->mask) {
        size_t e = ix->slots[s];
        if (e == 0)
            return 0;
        const char *ek;
        size_t en;
        entry_key(g, kind, e - 1, &ek, &en);
        if (en == n && memcmp(ek, k, n) == 0)
            return e;
    }
}

/* Builds the index of n entries; on a duplicate sets *dup_p to its entry index and
 * returns PD_ERR_FORMAT (the caller logs it). */
static pd_status_t index_build(pd_gguf_t *g, int kind, size_t n, size_t *dup_p)
{
    gguf_index_t *ix = kind == IX_KV ? &g->kv_index : &g->tensor_index;
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2; /* n is bounded by the file size, so this cannot overflow */
    ix->slots = calloc(cap, sizeof *ix->slots);
    if (!ix->slots) {
        PD_LOG_ERROR("gguf: out of memory for an index of %zu entries", n);
        return PD_ERR_NOMEM;
    }
    ix->mask = cap - 1;
    for (size_t i = 0; i < n; i++) {
        const char *k;
        size_t kn;
        entry_key(g, kind, i, &k, &kn);
        size_t s = (size_t)hash_bytes(k, kn) & ix->mask;
        for (; ix->slots[s] != 0; s = (s + 1) & ix->mask) {
            const char *ek;
            size_t en;
            entry_key(g, kind, ix->slots[s] - 1, &ek, &en);
            if (en == kn && memcmp(ek, k, kn) == 0) {
                *dup_p = i;
                return PD_ERR_FORMAT;
            }
        }
        ix->slots[s] = i + 1;
    }
    return PD_OK;
}

/* ---- metadata ---- */

static pd_status_t parse_str_array(cursor_t *c, gguf_kv_t *kv, size_t arr_at)
{
    uint64_t n = kv->arr_n;
    if (n > bytes_left(c) / 8)
        return fail_at(c, arr_at, PD_ERR_FORMAT,
                       "key '%.*s': %llu strings cannot fit in the %zu bytes left",
                       key_show(kv->key_len), kv->key, (unsigned long long)n,
                       bytes_left(c));
    size_t start = c->pos;
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        pd_status_t st = read_str(c, "array string", &s, &len);
        if (st != PD_OK)
            return st;
    }
    /* n * 8 <= the bytes just consumed, so this allocation is bounded by the file */
    kv->items = malloc(n ? (size_t)n * sizeof *kv->items : 1);
    if (!kv->items) {
        PD_LOG_ERROR("gguf %s: out of memory indexing %llu strings", c->path,
                     (unsigned long long)n);
        return PD_ERR_NOMEM;
    }
    for (size_t i = 0, pos = start; i < (size_t)n; i++) {
        uint64_t len;
        memcpy(&len, c->p + pos, 8);
        kv->items[i] = c->p + pos;
        pos += 8 + (size_t)len;
    }
    return PD_OK;
}

static pd_status_t parse_array(cursor_t *c, gguf_kv_t *kv)
{
    size_t at = c->pos;
    pd_status_t st = read_u32(c, "array element type", &kv->arr_type);
    if (st == PD_OK)
        st = read_u64(c, "array length", &kv->arr_n);
    if (st != PD_OK)
        return st;
    kv->val = c->p + c->pos;
    if (kv->arr_type == PD_GGUF_TYPE_ARRAY)
        return fail_at(c, at, PD_ERR_UNSUPPORTED,
                       "key '%.*s': nested arrays are not supported",
                       key_show(kv->key_len), kv->key);
    if (kv->arr_type == PD_GGUF_TYPE_STRING)
        return parse_str_array(c, kv, at);
    size_t esz = scalar_size(kv->arr_type);
    if (esz == 0)
        return fail_at(c, at, PD_ERR_FORMAT, "key '%.*s': invalid array element type %u",
                       key_show(kv->key_len), kv->key, kv->arr_type);
    if (kv->arr_n > bytes_left(c) / esz)
        return fail_at(
            c, at, PD_ERR_FORMAT,
            "key '%.*s': array of %llu %zu-byte items exceeds the %zu bytes left",
            key_show(kv->key_len), kv->key, (unsigned long long)kv->arr_n, esz,
            bytes_left(c));
    c->pos += (size_t)kv->arr_n * esz;
    return PD_OK;
}

static pd_status_t parse_value(cursor_t *c, gguf_kv_t *kv, size_t type_at)
{
    if (kv->type == PD_GGUF_TYPE_ARRAY)
        return parse_array(c, kv);
    kv->val = c->p + c->pos;
    if (kv->type == PD_GGUF_TYPE_STRING) {
        const char *s;
        size_t len;
        return read_str(c, "string value", &s, &len);
    }
    size_t sz = scalar_size(kv->type);
    if (sz == 0)
        return fail_at(c, type_at, PD_ERR_FORMAT, "key '%.*s': invalid value type %u",
                       key_show(kv->key_len), kv->key, kv->type);
    if (bytes_left(c) < sz)
        return fail_at(c, c->pos, PD_ERR_FORMAT, "key '%.*s': truncated value",
                       key_show(kv->key_len), kv->key);
    c->pos += sz;
    return PD_OK;
}

/* Grows *arr (of *cap items of size esz) to hold one more, doubling up to max. */
static pd_status_t grow(void **arr, size_t *cap, size_t used, size_t max, size_t esz)
{
    if (used < *cap)
        return PD_OK;
    size_t ncap = *cap ? *cap * 2 : 16;
    if (ncap > max)
        ncap = max;
    void *p = realloc(*arr, ncap * esz); /* ncap <= file size / 13: no overflow */
    if (!p) {
        PD_LOG_ERROR("gguf: out of memory growing a table to %zu entries", ncap);
        return PD_ERR_NOMEM;
    }
    memset((char *)p + *cap * esz, 0, (ncap - *cap) * esz);
    *arr = p;
    *cap = ncap;
    return PD_OK;
}

static pd_status_t parse_kvs(pd_gguf_t *g, cursor_t *c, uint64_t n_kv)
{
    if (n_kv > bytes_left(c) / GGUF_MIN_KV_BYTES)
        return fail_at(c, 16, PD_ERR_FORMAT, "n_kv %llu cannot fit in the %zu bytes left",
                       (unsigned long long)n_kv, bytes_left(c));
    size_t cap = 0;
    for (size_t i = 0; i < (size_t)n_kv; i++) {
        pd_status_t st = grow((void **)&g->kvs, &cap, i, (size_t)n_kv, sizeof *g->kvs);
        if (st != PD_OK)
            return st;
        gguf_kv_t *kv = &g->kvs[i];
        size_t at = c->pos;
        st = read_str(c, "key", &kv->key, &kv->key_len);
        if (st != PD_OK)
            return st;
        if (kv->key_len == 0)
            return fail_at(c, at, PD_ERR_FORMAT, "kv %zu has an empty key", i);
        size_t type_at = c->pos;
        st = read_u32(c, "value type", &kv->type);
        if (st == PD_OK)
            st = parse_value(c, kv, type_at);
        g->n_kv = i + 1; /* counted even on failure so its items are freed */
        if (st != PD_OK)
            return st;
    }
    size_t dup;
    pd_status_t st = index_build(g, IX_KV, g->n_kv, &dup);
    if (st == PD_ERR_FORMAT) {
        const gguf_kv_t *kv = &g->kvs[dup];
        return fail_at(c, (size_t)((const uint8_t *)kv->key - c->p) - 8, st,
                       "duplicate key '%.*s'", key_show(kv->key_len), kv->key);
    }
    return st;
}

static pd_status_t parse_alignment(pd_gguf_t *g, const cursor_t *c)
{
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    static const char key[] = "general.alignment";
    size_t e = index_lookup(g, IX_KV, key, sizeof key - 1);
    if (e == 0)
        return PD_OK;
    const gguf_kv_t *kv = &g->kvs[e - 1];
    size_t at = (size_t)(kv->val - c->p);
    if (kv->type != PD_GGUF_TYPE_U32)
        return fail_at(c, at, PD_ERR_FORMAT, "general.alignment has type %u, not u32",
                       kv->type);
    uint32_t a;
    memcpy(&a, kv->val, 4);
    if (a == 0 || (a & (a - 1)) != 0)
        return fail_at(c, at, PD_ERR_FORMAT,
                       "general.alignment %u is not a nonzero power of two", a);
    g->alignment = a;
    return PD_OK;
}

/* ---- tensors ---- */

static const char *ggml_type_name(uint32_t type)
{
    static const char *const names[] = {
        "f32",        "f16",        "q4_0",       "q4_1",     "q4_2",    "q4_3",
        "q5_0",       "q5_1",       "q8_0",       "q8_1",     "q2_k",    "q3_k",
        "q4_k",       "q5_k",       "q6_k",       "q8_k",     "iq2_xxs", "iq2_xs",
        "iq3_xxs",    "iq1_s",      "iq4_nl",     "iq3_s",    "iq2_s",   "iq4_xs",
        "i8",         "i16",        "i32",        "i64",      "f64",     "iq1_m",
        "bf16",       "q4_0_4_4",   "q4_0_4_8",   "q4_0_8_8", "tq1_0",   "tq2_0",
        "iq4_nl_4_4", "iq4_nl_4_8", "iq4_nl_8_8", "mxfp4"};
    return type < sizeof names / sizeof names[0] ? names[type] : NULL;
}

static pd_status_t parse_tensor_type(const cursor_t *c, gguf_tensor_t *t, size_t at,
                                     uint32_t type)
{
    if (pd_dtype_valid(type)) {
        t->t.dtype = (pd_dtype_t)type;
        return PD_OK;
    }
    const char *name = ggml_type_name(type);
    if (name)
        return fail_at(c, at, PD_ERR_UNSUPPORTED,
                       "tensor '%.*s': unsupported tensor type %s (%u); supported are "
                       "f32, f16, bf16, q8_0, q4_0",
                       key_show(t->name_len), t->src, name, type);
    return fail_at(c, at, PD_ERR_FORMAT, "tensor '%.*s': invalid tensor type %u",
                   key_show(t->name_len), t->src, type);
}

static pd_status_t parse_tensor_shape(cursor_t *c, gguf_tensor_t *t)
{
    size_t at = c->pos;
    uint32_t n_dims = 0;
    pd_status_t st = read_u32(c, "tensor n_dims", &n_dims);
    if (st != PD_OK)
        return st;
    if (n_dims < 1 || n_dims > PD_TENSOR_MAX_DIMS)
        return fail_at(c, at, PD_ERR_FORMAT, "tensor '%.*s': n_dims %u is not in 1..%d",
                       key_show(t->name_len), t->src, n_dims, PD_TENSOR_MAX_DIMS);
    t->t.n_dims = (int)n_dims;
    for (int d = 0; d < PD_TENSOR_MAX_DIMS; d++)
        t->t.ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne = 0;
        at = c->pos;
        if ((st = read_u64(c, "tensor dimension", &ne)) != PD_OK)
            return st;
        if (ne == 0 || ne > (uint64_t)INT64_MAX)
            return fail_at(c, at, PD_ERR_FORMAT,
                           "tensor '%.*s': ne[%u] = %llu is invalid",
                           key_show(t->name_len), t->src, d, (unsigned long long)ne);
        t->t.ne[d] = (int64_t)ne;
    }
    return PD_OK;
}

static pd_status_t parse_tensor(cursor_t *c, gguf_tensor_t *t)
{
    size_t at = c->pos;
    t->info_off = at;
    pd_status_t st = read_str(c, "tensor name", &t->src, &t->name_len);
    if (st != PD_OK)
        return st;
    if (t->name_len == 0 || memchr(t->src, 0, t->name_len))
        return fail_at(c, at, PD_ERR_FORMAT, "tensor name is empty or contains a NUL");
    if ((st = parse_tensor_shape(c, t)) != PD_OK)
        return st;
    uint32_t type = 0;
    at = c->pos;
    if ((st = read_u32(c, "tensor type", &type)) != PD_OK)
        return st;
    if ((st = parse_tensor_type(c, t, at, type)) != PD_OK)
        return st;
    st = pd_tensor_size(t->t.dtype, t->t.ne, t->t.n_dims, &t->t.nbytes);
    if (st == PD_ERR_FORMAT)
        return fail_at(
            c, t->info_off, st,
            "tensor '%.*s': ne[0] = %lld is not a multiple of the %s block (%lld)",
            key_show(t->name_len), t->src, (long long)t->t.ne[0],
            pd_dtype_name(t->t.dtype), (long long)pd_dtype_block_elems(t->t.dtype));
    if (st != PD_OK)
        return fail_at(c, t->info_off, PD_ERR_FORMAT, "tensor '%.*s': size overflows",
                       key_show(t->name_len), t->src);
    return read_u64(c, "tensor offset", &t->offset);
}

/* Places every tensor's data after the aligned end of the header and checks it. */
static pd_status_t place_tensors(pd_gguf_t *g, const cursor_t *c)
{
    size_t a = g->alignment, end;
    if (pd_add_size(c->pos, a - 1, &end))
        return fail_at(c, c->pos, PD_ERR_FORMAT, "data section offset overflows");
    g->data_off = end / a * a;
    if (g->n_tensors > 0 && g->data_off > g->size)
        return fail_at(c, c->pos, PD_ERR_FORMAT,
                       "data section at %zu starts past the end of the file (%zu bytes)",
                       g->data_off, g->size);
    for (size_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        size_t room = g->size - g->data_off;
        if (t->offset % a != 0)
            return fail_at(c, t->info_off, PD_ERR_FORMAT,
                           "tensor '%s': data offset %llu is not a multiple of %zu",
                           g->names + t->name_off, (unsigned long long)t->offset, a);
        if (t->offset > room || t->t.nbytes > room - (size_t)t->offset)
            return fail_at(
                c, t->info_off, PD_ERR_FORMAT,
                "tensor '%s': data [%llu, +%zu) runs past the %zu bytes of data",
                g->names + t->name_off, (unsigned long long)t->offset, t->t.nbytes, room);
        t->t.data = g->map + g->data_off + (size_t)t->offset;
    }
    return PD_OK;
}

static pd_status_t name_tensors(pd_gguf_t *g, const cursor_t *c)
{
    size_t total = 0;
    for (size_t i = 0; i < g->n_tensors; i++)
        total += g->tensors[i].name_len + 1; /* bounded by the file size */
    g->names = malloc(total ? total : 1);
    if (!g->names) {
        PD_LOG_ERROR("gguf %s: out of memory for %zu bytes of tensor names", c->path,
                     total);
        return PD_ERR_NOMEM;
    }
    for (size_t i = 0, off = 0; i < g->n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        memcpy(g->names + off, t->src, t->name_len);
        g->names[off + t->name_len] = '\0';
        t->name_off = off;
        off += t->name_len + 1;
    }
    size_t dup;
    pd_status_t st = index_build(g, IX_TENSOR, g->n_tensors, &dup);
    if (st == PD_ERR_FORMAT)
        return fail_at(c, g->tensors[dup].info_off, st, "duplicate tensor name '%s'",
                       g->names + g->tensors[dup].name_off);
    return st;
}

static pd_status_t parse_tensors(pd_gguf_t *g, cursor_t *c, uint64_t n_tensors)
{
    if (n_tensors > bytes_left(c) / GGUF_MIN_TENSOR_BYTES)
        return fail_at(c, 8, PD_ERR_FORMAT,
                       "n_tensors %llu cannot fit in the %zu bytes left",
                       (unsigned long long)n_tensors, bytes_left(c));
    size_t cap = 0;
    for (size_t i = 0; i < (size_t)n_tensors; i++) {
        pd_status_t st =
            grow((void **)&g->tensors, &cap, i, (size_t)n_tensors, sizeof *g->tensors);
        if (st != PD_OK)
            return st;
        if ((st = parse_tensor(c, &g->tensors[i])) != PD_OK)
            return st;
        g->n_tensors = i + 1;
    }
    pd_status_t st = name_tensors(g, c);
    if (st != PD_OK)
        return st;
    return place_tensors(g, c);
}

static uint32_t bswap32(uint32_t v)
{
    return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
}

static pd_status_t parse(pd_gguf_t *g, const char *path)
{
    cursor_t c = {.p = g->map, .size = g->size, .pos = 0, .path = path};
    if (memcmp(g->map, "GGUF", 4) != 0)
        return fail_at(&c, 0, PD_ERR_FORMAT, "bad magic: not a gguf file");
    c.pos = 4;
    uint64_t n_tensors = 0, n_kv = 0;
    pd_status_t st = read_u32(&c, "version", &g->version);
    if (st == PD_OK)
        st = read_u64(&c, "n_tensors", &n_tensors);
    if (st == PD_OK)
        st = read_u64(&c, "n_kv", &n_kv);
    if (st != PD_OK)
        return st;
    if (g->version == 1)
        return fail_at(&c, 4, PD_ERR_UNSUPPORTED,
                       "gguf version 1 is not supported (only versions 2 and 3)");
    if (bswap32(g->version) == 2 || bswap32(g->version) == 3)
        return fail_at(&c, 4, PD_ERR_UNSUPPORTED,
                       "big-endian gguf files are not supported");
    if (g->version != 2 && g->version != 3)
        return fail_at(&c, 4, PD_ERR_FORMAT, "unknown gguf version %u", g->version);
    if ((st = parse_kvs(g, &c, n_kv)) != PD_OK)
        return st;
    if ((st = parse_alignment(g, &c)) != PD_OK)
        return st;
    return parse_tensors(g, &c, n_tensors);
}

pd_status_t pd_gguf_open(const char *path, pd_gguf_t **gguf_p)
{
    return pd_gguf_open_flags(path, 0, gguf_p);
}

pd_status_t pd_gguf_open_flags(const char *path, unsigned map_flags, pd_gguf_t **gguf_p)
{
    if (!path || !gguf_p)
        return PD_ERR_INVALID;
    const void *map;
    size_t size;
    pd_status_t st = pd_map_file(path, "gguf", GGUF_HEADER_BYTES, map_flags, &map, &size);
    if (st != PD_OK)
        return st;
    pd_gguf_t *g = calloc(1, sizeof *g);
    if (!g) {
        pd_unmap_file(map, size, map_flags);
        PD_LOG_ERROR("gguf %s: out of memory", path);
        return PD_ERR_NOMEM;
    }
    g->map = map;
    g->size = size;
    g->map_flags = map_flags;
    st = parse(g, path);
    if (st != PD_OK) {
        pd_gguf_destroy(&g);
        return st;
    }
    *gguf_p = g;
    return PD_OK;
}

void pd_gguf_destroy(pd_gguf_t **gguf_p)
{
    if (!gguf_p || !*gguf_p)
        return;
    pd_gguf_t *g = *gguf_p;
    for (size_t i = 0; i < g->n_kv; i++)
        free(g->kvs[i].items);
    free(g->kvs);
    free(g->tensors);
    free(g->names);
    free(g->kv_index.slots);
    free(g->tensor_index.slots);
    pd_unmap_file(g->map, g->size, g->map_flags);
    free(g);
    *gguf_p = NULL;
}

uint32_t pd_gguf_version(const pd_gguf_t *g)
{
    return g->version;
}

const void *pd_gguf_data(const pd_gguf_t *g, size_t *size_p)
{
    if (size_p)
        *size_p = g->size;
    return g->map;
}

/* ---- metadata accessors ---- */

static pd_status_t find_kv(const pd_gguf_t *g, const char *key, const gguf_kv_t **kv_p)
{
    if (!g || !key)
        return PD_ERR_INVALID;
    size_t e = index_lookup(g, IX_KV, key, strlen(key));
    if (e == 0)
        return PD_ERR_NOT_FOUND;
    *kv_p = &g->kvs[e - 1];
    return PD_OK;
}

static pd_status_t wrong_type(const pd_gguf_t *g, const gguf_kv_t *kv, const char *want)
{
    PD_LOG_ERROR("gguf: byte %zu: key '%.*s' has type %u, expected %s",
                 (size_t)(kv->val - g->map), key_show(kv->key_len), kv->key, kv->type,
                 want);
    return PD_ERR_FORMAT;
}

/* Reads an integer KV as signed or unsigned 64-bit; -1 if it is not an integer. */
static int kv_integer(const gguf_kv_t *kv, int *is_signed, uint64_t *u, int64_t *s)
{
    uint8_t u8;
    uint16_t u16;
    uint32_t u32;
    int8_t i8;
    int16_t i16;
    int32_t i32;
    *is_signed = 0;
    switch (kv->type) {
    case PD_GGUF_TYPE_U8:
        memcpy(&u8, kv->val, 1);
        *u = u8;
        return 0;
    case PD_GGUF_TYPE_U16:
        memcpy(&u16, kv->val, 2);
        *u = u16;
        return 0;
    case PD_GGUF_TYPE_U32:
        memcpy(&u32, kv->val, 4);
        *u = u32;
        return 0;
    case PD_GGUF_TYPE_U64:
        memcpy(u, kv->val, 8);
        return 0;
    default:
        break;
    }
    *is_signed = 1;
    switch (kv->type) {
    case PD_GGUF_TYPE_I8:
        memcpy(&i8, kv->val, 1);
        *s = i8;
        return 0;
    case PD_GGUF_TYPE_I16:
        memcpy(&i16, kv->val, 2);
        *s = i16;
        return 0;
    case PD_GGUF_TYPE_I32:
        memcpy(&i32, kv->val, 4);
        *s = i32;
        return 0;
    case PD_GGUF_TYPE_I64:
        memcpy(s, kv->val, 8);
        return 0;
    default:
        return -1;
    }
}

pd_status_t pd_gguf_get_u32(const pd_gguf_t *g, const char *key, uint32_t *v_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    int is_signed;
    uint64_t u = 0;
    int64_t s = 0;
    if (kv_integer(kv, &is_signed, &u, &s) != 0)
        return wrong_type(g, kv, "an integer");
    if (is_signed) {
        if (s < 0)
            goto out_of_range;
        u = (uint64_t)s;
    }
    if (u > UINT32_MAX)
        goto out_of_range;
    *v_p = (uint32_t)u;
    return PD_OK;
out_of_range:
    PD_LOG_ERROR("gguf: byte %zu: key '%.*s' does not fit in a u32",
                 (size_t)(kv->val - g->map), key_show(kv->key_len), kv->key);
    return PD_ERR_FORMAT;
}

pd_status_t pd_gguf_get_f32(const pd_gguf_t *g, const char *key, float *v_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type == PD_GGUF_TYPE_F32) {
        memcpy(v_p, kv->val, 4);
        return PD_OK;
    }
    if (kv->type != PD_GGUF_TYPE_F64)
        return wrong_type(g, kv, "f32 or f64");
    double d;
    memcpy(&d, kv->val, 8);
    if (isfinite(d) && fabs(d) > FLT_MAX) {
        PD_LOG_ERROR("gguf: byte %zu: key '%.*s' = %g does not fit in an f32",
                     (size_t)(kv->val - g->map), key_show(kv->key_len), kv->key, d);
        return PD_ERR_FORMAT;
    }
    *v_p = (float)d;
    return PD_OK;
}

pd_status_t pd_gguf_get_bool(const pd_gguf_t *g, const char *key, int *v_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type != PD_GGUF_TYPE_BOOL)
        return wrong_type(g, kv, "bool");
    *v_p = kv->val[0] != 0;
    return PD_OK;
}

pd_status_t pd_gguf_get_str(const pd_gguf_t *g, const char *key, const char **s_p,
                            size_t *len_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type != PD_GGUF_TYPE_STRING)
        return wrong_type(g, kv, "string");
    uint64_t len;
    memcpy(&len, kv->val, 8);
    *s_p = (const char *)kv->val + 8;
    if (len_p)
        *len_p = (size_t)len;
    return PD_OK;
}

pd_status_t pd_gguf_get_arr(const pd_gguf_t *g, const char *key, pd_gguf_type_t *type_p,
                            uint64_t *n_p, const void **data_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type != PD_GGUF_TYPE_ARRAY || kv->arr_type == PD_GGUF_TYPE_STRING)
        return wrong_type(g, kv, "a numeric array");
    if (type_p)
        *type_p = (pd_gguf_type_t)kv->arr_type;
    if (n_p)
        *n_p = kv->arr_n;
    if (data_p)
        *data_p = kv->val;
    return PD_OK;
}

pd_status_t pd_gguf_get_arr_len(const pd_gguf_t *g, const char *key, uint64_t *n_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type != PD_GGUF_TYPE_ARRAY)
        return wrong_type(g, kv, "an array");
    *n_p = kv->arr_n;
    return PD_OK;
}

pd_status_t pd_gguf_get_arr_str(const pd_gguf_t *g, const char *key, uint64_t i,
                                const char **s_p, size_t *len_p)
{
    const gguf_kv_t *kv;
    pd_status_t st = find_kv(g, key, &kv);
    if (st != PD_OK)
        return st;
    if (kv->type != PD_GGUF_TYPE_ARRAY || kv->arr_type != PD_GGUF_TYPE_STRING)
        return wrong_type(g, kv, "a string array");
    if (i >= kv->arr_n)
        return PD_ERR_RANGE;
    uint64_t len;
    memcpy(&len, kv->items[i], 8);
    *s_p = (const char *)kv->items[i] + 8;
    if (len_p)
        *len_p = (size_t)len;
    return PD_OK;
}

/* ---- tensor accessors ---- */

int64_t pd_gguf_n_tensors(const pd_gguf_t *g)
{
    return (int64_t)g->n_tensors;
}

pd_status_t pd_gguf_tensor_at(const pd_gguf_t *g, int64_t i, const char **name_p,
                              pd_tensor_t *t_p)
{
    if (!g)
        return PD_ERR_INVALID;
    if (i < 0 || (uint64_t)i >= g->n_tensors)
        return PD_ERR_RANGE;
    if (name_p)
        *name_p = g->names + g->tensors[i].name_off;
    if (t_p)
        *t_p = g->tensors[i].t;
    return PD_OK;
}

pd_status_t pd_gguf_find_tensor(const pd_gguf_t *g, const char *name, pd_tensor_t *t_p)
{
    if (!g || !name)
        return PD_ERR_INVALID;
    size_t e = index_lookup(g, IX_TENSOR, name, strlen(name));
    if (e == 0)
        return PD_ERR_NOT_FOUND;
    if (t_p)
        *t_p = g->tensors[e - 1].t;
    return PD_OK;
}
