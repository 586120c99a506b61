/* gguf.h - a bounds-checked GGUF v2/v3 reader over mmap.
 *
 * The file is untrusted: pd_gguf_open() validates every count, length, type, shape
 * and offset against the mapped size before anything else reads it, and returns
 * PD_ERR_FORMAT (logging what was wrong and where) for anything malformed; no later
 * accessor can read outside the mapping. Metadata strings and arrays are returned as
 * pointers into the mapping: strings are NOT NUL-terminated (use the length), and
 * numeric arrays may be unaligned (read them with memcpy).
 * Ownership: the pd_gguf_t owns the mapping; every pointer and pd_tensor_t it hands
 * out is valid until pd_gguf_destroy(). Threading: open/destroy from one thread;
 * the read-only accessors may be called from any thread after open. */
#ifndef PD_GGUF_H
#define PD_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"

typedef struct pd_gguf pd_gguf_t;

typedef enum pd_gguf_type {
    PD_GGUF_TYPE_U8 = 0,
    PD_GGUF_TYPE_I8 = 1,
    PD_GGUF_TYPE_U16 = 2,
    PD_GGUF_TYPE_I16 = 3,
    PD_GGUF_TYPE_U32 = 4,
    PD_GGUF_TYPE_I32 = 5,
    PD_GGUF_TYPE_F32 = 6,
    PD_GGUF_TYPE_BOOL = 7,
    PD_GGUF_TYPE_STRING = 8,
    PD_GGUF_TYPE_ARRAY = 9,
    PD_GGUF_TYPE_U64 = 10,
    PD_GGUF_TYPE_I64 = 11,
    PD_GGUF_TYPE_F64 = 12,
} pd_gguf_type_t;

/* Maps and validates path. On failure nothing is left mapped or allocated. */
pd_status_t pd_gguf_open(const char *path, pd_gguf_t **gguf_p);
/* The same with mapfile.h's PD_MAP_* flags (populate, or copy to huge pages). */
pd_status_t pd_gguf_open_flags(const char *path, unsigned map_flags, pd_gguf_t **gguf_p);
void pd_gguf_destroy(pd_gguf_t **gguf_p);

uint32_t pd_gguf_version(const pd_gguf_t *g);
/* The whole mapping, e.g. for a digest. */
const void *pd_gguf_data(const pd_gguf_t *g, size_t *size_p);

/* Metadata lookups. PD_ERR_NOT_FOUND if the key is missing, PD_ERR_FORMAT if it has
 * an incompatible type or its value does not fit. Outputs set only on success. */
pd_status_t pd_gguf_get_u32(const pd_gguf_t *g, const char *key, uint32_t *v_p);
pd_status_t pd_gguf_get_f32(const pd_gguf_t *g, const char *key, float *v_p);
pd_status_t pd_gguf_get_bool(const pd_gguf_t *g, const char *key, int *v_p);
pd_status_t pd_gguf_get_str(const pd_gguf_t *g, const char *key, const char **s_p,
                            size_t *len_p);
/* A numeric array: element type, count and a (possibly unaligned) pointer to the
 * packed little-endian elements. For string arrays use pd_gguf_get_arr_str(). */
pd_status_t pd_gguf_get_arr(const pd_gguf_t *g, const char *key, pd_gguf_type_t *type_p,
                            uint64_t *n_p, const void **data_p);
/* Element count of an array of any element type. */
pd_status_t pd_gguf_get_arr_len(const pd_gguf_t *g, const char *key, uint64_t *n_p);
/* Item i of a string array, O(1) (indexed at open). */
pd_status_t pd_gguf_get_arr_str(const pd_gguf_t *g, const char *key, uint64_t i,
                                const char **s_p, size_t *len_p);

/* Tensors. The returned view points into the mapping and its nbytes are checked
 * to lie inside the file. */
int64_t pd_gguf_n_tensors(const pd_gguf_t *g);
pd_status_t pd_gguf_tensor_at(const pd_gguf_t *g, int64_t i, const char **name_p,
                              pd_tensor_t *t_p);
pd_status_t pd_gguf_find_tensor(const pd_gguf_t *g, const char *name, pd_tensor_t *t_p);

#endif
