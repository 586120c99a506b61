/* ggufbuild.c - the GGUF byte builder declared in ggufbuild.h.
 * Threading: single-threaded. */
#include "support/ggufbuild.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "support/pdcheck.h"

void pd_gb_put(pd_gb_t *b, const void *d, size_t n)
{
    if (n == 0)
        return; /* b->p may still be NULL */
    if (n > b->cap - b->n) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

void pd_gb_u32(pd_gb_t *b, uint32_t v)
{
    pd_gb_put(b, &v, 4);
}

void pd_gb_u64(pd_gb_t *b, uint64_t v)
{
    pd_gb_put(b, &v, 8);
}

void pd_gb_strn(pd_gb_t *b, const char *s, uint64_t len_field, size_t n)
{
    pd_gb_u64(b, len_field);
    pd_gb_put(b, s, n);
}

void pd_gb_str(pd_gb_t *b, const char *s)
{
    pd_gb_strn(b, s, strlen(s), strlen(s));
}

void pd_gb_key(pd_gb_t *b, const char *key, uint32_t type)
{
    pd_gb_str(b, key);
    pd_gb_u32(b, type);
    b->n_kv++;
}

void pd_gb_arr(pd_gb_t *b, const char *key, uint32_t elem_type, uint64_t count)
{
    pd_gb_key(b, key, PD_GGUF_TYPE_ARRAY);
    pd_gb_u32(b, elem_type);
    pd_gb_u64(b, count);
}

void pd_gb_kv_u32(pd_gb_t *b, const char *key, uint32_t v)
{
    pd_gb_key(b, key, PD_GGUF_TYPE_U32);
    pd_gb_u32(b, v);
}

void pd_gb_kv_str(pd_gb_t *b, const char *key, const char *v)
{
    pd_gb_key(b, key, PD_GGUF_TYPE_STRING);
    pd_gb_str(b, v);
}

void pd_gb_pad(pd_gb_t *b, size_t align)
{
    static const uint8_t zeros[256];
    ck_assert_uint_le(align, sizeof zeros);
    pd_gb_put(b, zeros, (align - b->n % align) % align);
}

void pd_gb_header(pd_gb_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    pd_gb_put(b, "GGUF", 4);
    pd_gb_u32(b, version);
    pd_gb_u64(b, n_tensors);
    pd_gb_u64(b, n_kv);
}

void pd_gb_free(pd_gb_t *b)
{
    free(b->p);
    *b = (pd_gb_t){0};
}

pd_gguf_t *pd_gb_open(pd_gb_t *b, const char *what)
{
    char path[4096];
    pd_test_temp_write("gb_", ".gguf", b->p, b->n, path, sizeof path);
    pd_gguf_t *g = NULL;
    pd_status_t st = pd_gguf_open(path, &g);
    unlink(path);
    pd_gb_free(b);
    ck_assert_msg(st == PD_OK, "%s: %s (%s)", what, pd_status_str(st),
                  pd_test_last_error);
    return g;
}
