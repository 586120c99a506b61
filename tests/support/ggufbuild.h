/* ggufbuild.h - GGUF files byte by byte, for the suites that feed the reader,
 * the model loader and the tokenizer files made to measure (and made wrong on
 * purpose: every length and count is written as given, never checked).
 *
 * Design: a growing little-endian byte buffer. pd_gb_key() and the helpers built on
 * it count the keys they begin in n_kv, so a caller can build the key/value
 * section first and write the header with the count afterwards; pd_gb_header()
 * writes whatever counts it is told. Running out of memory fails the test.
 * Threading: single-threaded; a buffer belongs to one test. */
#ifndef PD_TEST_GGUFBUILD_H
#define PD_TEST_GGUFBUILD_H

#include <stddef.h>
#include <stdint.h>

#include "common/gguf.h"

typedef struct pd_gb {
    uint8_t *p; /* [n] bytes built so far (cap allocated), malloc'ed; {0} is empty */
    size_t n, cap;
    uint64_t n_kv; /* keys begun with pd_gb_key / pd_gb_kv_* / pd_gb_arr */
} pd_gb_t;

void pd_gb_put(pd_gb_t *b, const void *d, size_t n);
void pd_gb_u32(pd_gb_t *b, uint32_t v);
void pd_gb_u64(pd_gb_t *b, uint64_t v);
/* A GGUF string: the length field len_field (which may lie), then n bytes of s. */
void pd_gb_strn(pd_gb_t *b, const char *s, uint64_t len_field, size_t n);
void pd_gb_str(pd_gb_t *b, const char *s);
/* A key and its value type; the value follows. Counts one key. */
void pd_gb_key(pd_gb_t *b, const char *key, uint32_t type);
/* A key of type ARRAY with its element type and count; the elements follow. */
void pd_gb_arr(pd_gb_t *b, const char *key, uint32_t elem_type, uint64_t count);
/* A whole U32 or STRING key/value. */
void pd_gb_kv_u32(pd_gb_t *b, const char *key, uint32_t v);
void pd_gb_kv_str(pd_gb_t *b, const char *key, const char *v);
/* Zero bytes up to the next multiple of align (at most 256) of the size so far. */
void pd_gb_pad(pd_gb_t *b, size_t align);
/* "GGUF", version, tensor count, key/value count. */
void pd_gb_header(pd_gb_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv);
/* Frees the bytes and leaves b empty. */
void pd_gb_free(pd_gb_t *b);

/* Writes b to a temp file, opens it with pd_gguf_open(), removes the file and frees
 * b. Anything but PD_OK fails the test, naming what and the last logged error. */
pd_gguf_t *pd_gb_open(pd_gb_t *b, const char *what);

#endif
