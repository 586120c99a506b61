/* gguf_writer.h - a streaming GGUF v3 writer (for pdctl mkmodel and tests).
 *
 * Usage: pd_gguf_writer_new(); add metadata and declare every tensor (name, dtype,
 * shape); pd_gguf_writer_begin_data() writes the header, the metadata and the
 * tensor infos with precomputed, aligned offsets; then the data of each tensor is
 * appended in declaration order with pd_gguf_writer_write() (any number of calls
 * per tensor, the writer pads between tensors); pd_gguf_writer_finish() checks that
 * every byte was written and atomically renames the file into place. Only the
 * metadata and tensor infos are held in memory: tensor data streams straight out.
 *
 * The file is written as "<path>.partial" and renamed on success; any failure (a
 * write error such as a full disk, or destroying an unfinished writer) removes the
 * partial file, so no truncated model is ever left under the final name.
 * Errors are logged once where detected; after any error every later call returns
 * the same status (the writer is "failed") and only destroy is useful.
 * Ownership: strings and arrays passed in are copied. Threading: one thread. */
#ifndef PD_GGUF_WRITER_H
#define PD_GGUF_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"

typedef struct pd_gguf_writer pd_gguf_writer_t;

/* Creates "<path>.partial" for writing; alignment is a power of two (GGUF's default
 * is 32; pass 0 for it). general.alignment is written when it is not 32. */
pd_status_t pd_gguf_writer_new(const char *path, uint32_t alignment,
                               pd_gguf_writer_t **w_p);
/* Removes the partial file unless finish() succeeded. Accepts NULL; clears *w_p. */
void pd_gguf_writer_destroy(pd_gguf_writer_t **w_p);

/* Metadata, before begin_data(). Keys must be unique (PD_ERR_INVALID otherwise). */
pd_status_t pd_gguf_writer_add_u32(pd_gguf_writer_t *w, const char *key, uint32_t v);
pd_status_t pd_gguf_writer_add_i32(pd_gguf_writer_t *w, const char *key, int32_t v);
pd_status_t pd_gguf_writer_add_f32(pd_gguf_writer_t *w, const char *key, float v);
pd_status_t pd_gguf_writer_add_bool(pd_gguf_writer_t *w, const char *key, int v);
pd_status_t pd_gguf_writer_add_str(pd_gguf_writer_t *w, const char *key, const char *s);
/* Arrays of n elements. Strings are given with explicit lengths (may hold NULs). */
pd_status_t pd_gguf_writer_add_arr_str(pd_gguf_writer_t *w, const char *key,
                                       const char *const *s, const size_t *len, size_t n);
pd_status_t pd_gguf_writer_add_arr_f32(pd_gguf_writer_t *w, const char *key,
                                       const float *v, size_t n);
pd_status_t pd_gguf_writer_add_arr_i32(pd_gguf_writer_t *w, const char *key,
                                       const int32_t *v, size_t n);

/* Declares a tensor, before begin_data(). ne[0] is innermost; each ne >= 1 and
 * ne[0] a multiple of the dtype's block. Names must be unique. */
pd_status_t pd_gguf_writer_add_tensor(pd_gguf_writer_t *w, const char *name,
                                      pd_dtype_t dtype, int n_dims, const int64_t *ne);

/* Writes the header, metadata, tensor infos and padding to the data section. */
pd_status_t pd_gguf_writer_begin_data(pd_gguf_writer_t *w);
/* Appends n bytes of tensor data, in declaration order; a chunk may not run past
 * the end of the current tensor (PD_ERR_INVALID). */
pd_status_t pd_gguf_writer_write(pd_gguf_writer_t *w, const void *data, size_t n);
/* Flushes, closes and renames the file to its final path. PD_ERR_INVALID if some
 * tensor data is missing. The writer must still be destroyed. */
pd_status_t pd_gguf_writer_finish(pd_gguf_writer_t *w);

/* Total bytes of the finished file (valid after begin_data). */
uint64_t pd_gguf_writer_file_size(const pd_gguf_writer_t *w);

#endif
