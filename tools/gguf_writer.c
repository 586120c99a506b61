/* gguf_writer.c - a streaming GGUF v3 writer.
 *
 * Design: metadata key/values are serialized into an in-memory buffer as they are
 * added (the header needs their count first); tensor declarations are kept as a
 * list. begin_data() computes every tensor's aligned offset, writes header, KVs and
 * infos, pads to the alignment, and from then on tensor bytes are streamed through
 * a buffered FILE in declaration order, each tensor padded to the alignment. All
 * I/O results are checked (fwrite, fflush, fclose); the output goes to
 * "<path>.partial" and is renamed only once complete, and removed on any failure.
 * Threading: a writer is used by one thread. */
#include "tools/gguf_writer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define GGUF_VERSION           3
#define GGUF_DEFAULT_ALIGNMENT 32
#define IO_BUFFER_BYTES        (1u << 20)

enum { T_U32 = 4, T_I32 = 5, T_F32 = 6, T_BOOL = 7, T_STRING = 8, T_ARRAY = 9 };

typedef struct bytebuf {
    unsigned char *data;
    size_t len, cap;
} bytebuf_t;

typedef struct tensor_decl {
    char *name;
    pd_dtype_t dtype;
    int n_dims;
    int64_t ne[PD_TENSOR_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* relative to the start of the data section */
} tensor_decl_t;

struct pd_gguf_writer {
    char *path;         /* final name */
    char *partial_path; /* "<path>.partial", written until finish() */
    FILE *f;
    char *iobuf;
    uint32_t alignment;
    pd_status_t failed; /* sticky error, PD_OK while healthy */
    int began, finished;

    bytebuf_t kv; /* serialized key/values */
    uint64_t n_kv;
    char **keys;
    size_t n_keys, cap_keys;

    tensor_decl_t *tensors;
    size_t n_tensors, cap_tensors;

    size_t cur;           /* tensor being streamed */
    uint64_t cur_written; /* bytes of it written so far */
    uint64_t data_start;  /* file offset of the data section */
    uint64_t file_size;
};

/* ---- small helpers ------------------------------------------------------------ */

static pd_status_t buf_put(bytebuf_t *b, const void *p, size_t n)
{
    if (n > SIZE_MAX - b->len)
        return PD_ERR_OVERFLOW;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) {
            if (cap > SIZE_MAX / 2)
                return PD_ERR_OVERFLOW;
            cap *= 2;
        }
        unsigned char *d = realloc(b->data, cap);
        if (!d)
            return PD_ERR_NOMEM;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return PD_OK;
}

/* GGUF is little endian; so are the hosts this project targets (x86-64, aarch64). */
static pd_status_t buf_u32(bytebuf_t *b, uint32_t v)
{
    return buf_put(b, &v, 4);
}
static pd_status_t buf_u64(bytebuf_t *b, uint64_t v)
{
    return buf_put(b, &v, 8);
}

static pd_status_t buf_str(bytebuf_t *b, const char *s, size_t n)
{
    pd_status_t st = buf_u64(b, (uint64_t)n);
    return st ? st : buf_put(b, s, n);
}

static uint64_t align_up(uint64_t x, uint32_t a)
{
    return (x + a - 1) & ~(uint64_t)(a - 1);
}

static pd_status_t fail(pd_gguf_writer_t *w, pd_status_t st)
{
    if (!w->failed)
        w->failed = st;
    return st;
}

static pd_status_t check_usable(pd_gguf_writer_t *w, int want_began, const char *what)
{
    if (w->failed)
        return w->failed;
    if (w->finished || w->began != want_began) {
        PD_LOG_ERROR("gguf writer: %s called in the wrong state", what);
        return fail(w, PD_ERR_INVALID);
    }
    return PD_OK;
}

static pd_status_t write_bytes(pd_gguf_writer_t *w, const void *p, size_t n)
{
    if (n && fwrite(p, 1, n, w->f) != n) {
        PD_LOG_ERROR("write to %s failed: %s", w->partial_path,
                     strerror(errno ? errno : EIO));
        return fail(w, PD_ERR_IO);
    }
    return PD_OK;
}

static pd_status_t write_zeros(pd_gguf_writer_t *w, size_t n)
{
    static const unsigned char zeros[256];
    while (n) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        pd_status_t st = write_bytes(w, zeros, k);
        if (st)
            return st;
        n -= k;
    }
    return PD_OK;
}

/* ---- construction ------------------------------------------------------------- */

pd_status_t pd_gguf_writer_new(const char *path, uint32_t alignment,
                               pd_gguf_writer_t **w_p)
{
    pd_status_t st = PD_ERR_NOMEM;
    if (!alignment)
        alignment = GGUF_DEFAULT_ALIGNMENT;
    if (!path || !*path || (alignment & (alignment - 1)) || alignment > (1u << 20)) {
        PD_LOG_ERROR("gguf writer: bad path or alignment %u", alignment);
        return PD_ERR_INVALID;
    }
    pd_gguf_writer_t *w = calloc(1, sizeof *w);
    if (!w)
        return PD_ERR_NOMEM;
    w->alignment = alignment;
    size_t n = strlen(path);
    w->path = strdup(path);
    w->partial_path = malloc(n + sizeof ".partial");
    w->iobuf = malloc(IO_BUFFER_BYTES);
    if (!w->path || !w->partial_path || !w->iobuf)
        goto err_free_writer;
    memcpy(w->partial_path, path, n);
    memcpy(w->partial_path + n, ".partial", sizeof ".partial");
    w->f = fopen(w->partial_path, "wb");
    if (!w->f) {
        PD_LOG_ERROR("cannot create %s: %s", w->partial_path, strerror(errno));
        st = PD_ERR_IO;
        goto err_free_writer;
    }
    setvbuf(w->f, w->iobuf, _IOFBF, IO_BUFFER_BYTES);
    if (alignment != GGUF_DEFAULT_ALIGNMENT &&
        (st = pd_gguf_writer_add_u32(w, "general.alignment", alignment)) != PD_OK)
        goto err_remove_file;
    *w_p = w;
    return PD_OK;

err_remove_file:
    fclose(w->f);
    remove(w->partial_path);
err_free_writer:
    for (size_t i = 0; i < w->n_keys; i++)
        free(w->keys[i]);
    free(w->keys);
    free(w->kv.data);
    free(w->iobuf);
    free(w->partial_path);
    free(w->path);
    free(w);
    return st;
}

void pd_gguf_writer_destroy(pd_gguf_writer_t **w_p)
{
    if (!w_p || !*w_p)
        return;
    pd_gguf_writer_t *w = *w_p;
    if (w->f) {
        fclose(w->f);
        w->f = NULL;
    }
    if (!w->finished)
        remove(w->partial_path);
    for (size_t i = 0; i < w->n_keys; i++)
        free(w->keys[i]);
    free(w->keys);
    for (size_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->tensors);
    free(w->kv.data);
    free(w->iobuf);
    free(w->partial_path);
    free(w->path);
    free(w);
    *w_p = NULL;
}

/* ---- metadata ----------------------------------------------------------------- */

/* Checks the state and key, then writes the key and the value type. */
static pd_status_t kv_begin(pd_gguf_writer_t *w, const char *key, uint32_t type)
{
    pd_status_t st = check_usable(w, 0, "add metadata");
    if (st)
        return st;
    if (!key || !*key) {
        PD_LOG_ERROR("gguf writer: empty metadata key");
        return fail(w, PD_ERR_INVALID);
    }
    for (size_t i = 0; i < w->n_keys; i++) {
        if (!strcmp(w->keys[i], key)) {
            PD_LOG_ERROR("gguf writer: duplicate metadata key %s", key);
            return fail(w, PD_ERR_INVALID);
        }
    }
    if (w->n_keys == w->cap_keys) {
        size_t cap = w->cap_keys ? 2 * w->cap_keys : 32;
        char **k = realloc(w->keys, cap * sizeof *k);
        if (!k)
            return fail(w, PD_ERR_NOMEM);
        w->keys = k;
        w->cap_keys = cap;
    }
    if (!(w->keys[w->n_keys] = strdup(key)))
        return fail(w, PD_ERR_NOMEM);
    w->n_keys++;
    w->n_kv++;
    if ((st = buf_str(&w->kv, key, strlen(key))) || (st = buf_u32(&w->kv, type)))
        return fail(w, st);
    return PD_OK;
}

static pd_status_t kv_scalar(pd_gguf_writer_t *w, const char *key, uint32_t type,
                             const void *v, size_t n)
{
    pd_status_t st = kv_begin(w, key, type);
    if (!st && (st = buf_put(&w->kv, v, n)))
        fail(w, st);
    return st;
}

pd_status_t pd_gguf_writer_add_u32(pd_gguf_writer_t *w, const char *key, uint32_t v)
{
    return kv_scalar(w, key, T_U32, &v, 4);
}

pd_status_t pd_gguf_writer_add_i32(pd_gguf_writer_t *w, const char *key, int32_t v)
{
    return kv_scalar(w, key, T_I32, &v, 4);
}

pd_status_t pd_gguf_writer_add_f32(pd_gguf_writer_t *w, const char *key, float v)
{
    return kv_scalar(w, key, T_F32, &v, 4);
}

pd_status_t pd_gguf_writer_add_bool(pd_gguf_writer_t *w, const char *key, int v)
{
    uint8_t b = v ? 1 : 0;
    return kv_scalar(w, key, T_BOOL, &b, 1);
}

pd_status_t pd_gguf_writer_add_str(pd_gguf_writer_t *w, const char *key, const char *s)
{
    pd_status_t st = kv_begin(w, key, T_STRING);
    if (!st && (st = buf_str(&w->kv, s, strlen(s))))
        fail(w, st);
    return st;
}

static pd_status_t kv_array(pd_gguf_writer_t *w, const char *key, uint32_t elem_type,
                            const void *v, size_t n, size_t elem_size)
{
    size_t bytes;
    pd_status_t st = kv_begin(w, key, T_ARRAY);
    if (st)
        return st;
    if (pd_mul_size(n, elem_size, &bytes))
        return fail(w, PD_ERR_OVERFLOW);
    if ((st = buf_u32(&w->kv, elem_type)) || (st = buf_u64(&w->kv, (uint64_t)n)) ||
        (v && (st = buf_put(&w->kv, v, bytes))))
        return fail(w, st);
    return PD_OK;
}

pd_status_t pd_gguf_writer_add_arr_str(pd_gguf_writer_t *w, const char *key,
                                       const char *const *s, const size_t *len, size_t n)
{
    pd_status_t st = kv_array(w, key, T_STRING, NULL, n, 1);
    for (size_t i = 0; !st && i < n; i++)
        if ((st = buf_str(&w->kv, s[i], len[i])))
            fail(w, st);
    return st;
}

pd_status_t pd_gguf_writer_add_arr_f32(pd_gguf_writer_t *w, const char *key,
                                       const float *v, size_t n)
{
    return kv_array(w, key, T_F32, v, n, 4);
}

pd_status_t pd_gguf_writer_add_arr_i32(pd_gguf_writer_t *w, const char *key,
                                       const int32_t *v, size_t n)
{
    return kv_array(w, key, T_I32, v, n, 4);
}

/* ---- tensors ------------------------------------------------------------------ */

pd_status_t pd_gguf_writer_add_tensor(pd_gguf_writer_t *w, const char *name,
                                      pd_dtype_t dtype, int n_dims, const int64_t *ne)
{
    size_t nbytes;
    pd_status_t st = check_usable(w, 0, "add tensor");
    if (st)
        return st;
    if (!name || !*name || n_dims < 1 || n_dims > PD_TENSOR_MAX_DIMS ||
        !pd_dtype_valid((uint32_t)dtype)) {
        PD_LOG_ERROR("gguf writer: bad tensor declaration %s", name ? name : "(null)");
        return fail(w, PD_ERR_INVALID);
    }
    if ((st = pd_tensor_size(dtype, ne, n_dims, &nbytes))) {
        PD_LOG_ERROR("gguf writer: tensor %s has an invalid shape for %s: %s", name,
                     pd_dtype_name(dtype), pd_status_str(st));
        return fail(w, st);
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        if (!strcmp(w->tensors[i].name, name)) {
            PD_LOG_ERROR("gguf writer: duplicate tensor %s", name);
            return fail(w, PD_ERR_INVALID);
        }
    }
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 64;
        tensor_decl_t *t = realloc(w->tensors, cap * sizeof *t);
        if (!t)
            return fail(w, PD_ERR_NOMEM);
        w->tensors = t;
        w->cap_tensors = cap;
    }
    tensor_decl_t *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return fail(w, PD_ERR_NOMEM);
    t->dtype = dtype;
    t->n_dims = n_dims;
    for (int d = 0; d < n_dims; d++)
        t->ne[d] = ne[d];
    t->nbytes = nbytes;
    w->n_tensors++;
    return PD_OK;
}

/* Serializes the header, KVs and tensor infos (offsets assigned here). */
static pd_status_t build_header(pd_gguf_writer_t *w, bytebuf_t *h)
{
    pd_status_t st;
    uint64_t off = 0;
    if ((st = buf_put(h, "GGUF", 4)) || (st = buf_u32(h, GGUF_VERSION)) ||
        (st = buf_u64(h, (uint64_t)w->n_tensors)) || (st = buf_u64(h, w->n_kv)) ||
        (st = buf_put(h, w->kv.data, w->kv.len)))
        return st;
    for (size_t i = 0; i < w->n_tensors; i++) {
        tensor_decl_t *t = &w->tensors[i];
        t->offset = off;
        if ((st = buf_str(h, t->name, strlen(t->name))) ||
            (st = buf_u32(h, (uint32_t)t->n_dims)))
            return st;
        for (int d = 0; d < t->n_dims; d++)
            if ((st = buf_u64(h, (uint64_t)t->ne[d])))
                return st;
        if ((st = buf_u32(h, (uint32_t)t->dtype)) || (st = buf_u64(h, t->offset)))
            return st;
        off = align_up(off + t->nbytes, w->alignment);
    }
    w->data_start = align_up(h->len, w->alignment);
    w->file_size = w->data_start + off;
    return PD_OK;
}

pd_status_t pd_gguf_writer_begin_data(pd_gguf_writer_t *w)
{
    bytebuf_t h = {0};
    pd_status_t st = check_usable(w, 0, "begin_data");
    if (st)
        return st;
    if ((st = build_header(w, &h))) {
        PD_LOG_ERROR("gguf writer: building the header failed: %s", pd_status_str(st));
        free(h.data);
        return fail(w, st);
    }
    st = write_bytes(w, h.data, h.len);
    if (!st)
        st = write_zeros(w, (size_t)(w->data_start - h.len));
    free(h.data);
    w->began = 1;
    w->cur = 0;
    w->cur_written = 0;
    return st;
}

/* Pads after the tensors whose data is complete and moves past them. */
static pd_status_t advance_tensors(pd_gguf_writer_t *w)
{
    while (w->cur < w->n_tensors && w->cur_written == w->tensors[w->cur].nbytes) {
        const tensor_decl_t *t = &w->tensors[w->cur];
        uint64_t end = t->offset + t->nbytes;
        pd_status_t st = write_zeros(w, (size_t)(align_up(end, w->alignment) - end));
        if (st)
            return st;
        w->cur++;
        w->cur_written = 0;
    }
    return PD_OK;
}

pd_status_t pd_gguf_writer_write(pd_gguf_writer_t *w, const void *data, size_t n)
{
    pd_status_t st = check_usable(w, 1, "write");
    if (st)
        return st;
    if (w->cur >= w->n_tensors || n > w->tensors[w->cur].nbytes - w->cur_written) {
        PD_LOG_ERROR("gguf writer: %zu bytes of data past the end of tensor %s", n,
                     w->cur < w->n_tensors ? w->tensors[w->cur].name : "(none left)");
        return fail(w, PD_ERR_INVALID);
    }
    if ((st = write_bytes(w, data, n)))
        return st;
    w->cur_written += n;
    return advance_tensors(w);
}

pd_status_t pd_gguf_writer_finish(pd_gguf_writer_t *w)
{
    pd_status_t st = check_usable(w, 1, "finish");
    if (st)
        return st;
    if ((st = advance_tensors(w))) /* zero-size tail tensors cannot exist, but be safe */
        return st;
    if (w->cur != w->n_tensors) {
        PD_LOG_ERROR("gguf writer: data of tensor %s is incomplete (%llu of %llu bytes)",
                     w->tensors[w->cur].name, (unsigned long long)w->cur_written,
                     (unsigned long long)w->tensors[w->cur].nbytes);
        return fail(w, PD_ERR_INVALID);
    }
    int rc = fflush(w->f);
    int err = errno;
    if (fclose(w->f) != 0 && rc == 0) {
        rc = -1;
        err = errno;
    }
    w->f = NULL;
    if (rc != 0) {
        PD_LOG_ERROR("write to %s failed: %s", w->partial_path, strerror(err));
        return fail(w, PD_ERR_IO);
    }
    if (rename(w->partial_path, w->path) != 0) {
        PD_LOG_ERROR("rename %s to %s failed: %s", w->partial_path, w->path,
                     strerror(errno));
        return fail(w, PD_ERR_IO);
    }
    w->finished = 1;
    return PD_OK;
}

uint64_t pd_gguf_writer_file_size(const pd_gguf_writer_t *w)
{
    return w->file_size;
}
