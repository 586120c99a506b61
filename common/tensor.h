/* tensor.h - weight dtypes, their GGUF block layouts, and a tensor view.
 *
 * A pd_tensor_t is a small value type: a view of bytes owned by someone else
 * (usually an mmap'd model file). ne[0] is the innermost (contiguous) dimension,
 * as in GGUF: a weight matrix has ne[0] = input size and ne[1] = output size and is
 * stored row-major [out][in]. Quantized dtypes pack ne[0] in blocks of 32.
 * Threading: pure functions, callable from any thread. */
#ifndef PD_TENSOR_H
#define PD_TENSOR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" { /* also included by the CUDA backend (C++) */
#endif

/* Values are GGML's type ids so they can be read straight from GGUF. */
typedef enum pd_dtype {
    PD_DTYPE_F32 = 0,
    PD_DTYPE_F16 = 1,
    PD_DTYPE_Q4_0 = 2,
    PD_DTYPE_Q8_0 = 8,
    PD_DTYPE_BF16 = 30,
} pd_dtype_t;

#define PD_QK 32 /* elements per Q8_0 / Q4_0 block */

/* GGUF block layouts (packed, little endian). */
typedef struct pd_block_q8_0 {
    uint16_t d;       /* fp16 scale */
    int8_t qs[PD_QK]; /* value = qs[j] * d */
} pd_block_q8_0_t;    /* 34 bytes */

typedef struct pd_block_q4_0 {
    uint16_t d;            /* fp16 scale */
    uint8_t qs[PD_QK / 2]; /* element j in the low nibble of qs[j], j+16 in the high; */
                           /* value = (nibble - 8) * d */
} pd_block_q4_0_t;         /* 18 bytes */

#define PD_TENSOR_MAX_DIMS 4

typedef struct pd_tensor {
    pd_dtype_t dtype;
    int n_dims;
    int64_t ne[PD_TENSOR_MAX_DIMS]; /* ne[0] innermost; unused dims are 1 */
    const void *data;               /* not owned */
    size_t nbytes;
} pd_tensor_t;

/* True for the dtypes this project reads. */
int pd_dtype_valid(uint32_t dtype);
const char *pd_dtype_name(pd_dtype_t dtype);
/* Elements per block (1 for float types) and bytes per block. */
int64_t pd_dtype_block_elems(pd_dtype_t dtype);
size_t pd_dtype_block_bytes(pd_dtype_t dtype);
/* Bytes of one row of n elements; PD_ERR_FORMAT if n is not a multiple of the block,
 * PD_ERR_OVERFLOW on overflow. *bytes_p set only on success. */
pd_status_t pd_dtype_row_bytes(pd_dtype_t dtype, int64_t n, size_t *bytes_p);
/* Bytes of a whole tensor of shape ne[0..n_dims-1], every ne >= 1, overflow-checked. */
pd_status_t pd_tensor_size(pd_dtype_t dtype, const int64_t *ne, int n_dims,
                           size_t *bytes_p);
/* Bytes of one row (ne[0] elements) of t. */
size_t pd_tensor_row_bytes(const pd_tensor_t *t);

/* Overflow-checked size arithmetic: return 0 and set *r on success, -1 on overflow. */
static inline int pd_mul_size(size_t a, size_t b, size_t *r)
{
    return __builtin_mul_overflow(a, b, r) ? -1 : 0;
}
static inline int pd_add_size(size_t a, size_t b, size_t *r)
{
    return __builtin_add_overflow(a, b, r) ? -1 : 0;
}

/* Half-precision conversions (IEEE binary16 and bfloat16), exact where the format
 * allows; f32 -> half rounds to nearest even. */
static inline float pd_fp32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t pd_fp32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
float pd_fp16_to_f32(uint16_t h);
uint16_t pd_f32_to_fp16(float f);
static inline float pd_bf16_to_f32(uint16_t h)
{
    return pd_fp32_from_bits((uint32_t)h << 16);
}
static inline uint16_t pd_f32_to_bf16(float f)
{
    uint32_t u = pd_fp32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Quantize n floats (n % 32 == 0) into blocks, as GGML does. */
void pd_quantize_q8_0(const float *x, int64_t n, pd_block_q8_0_t *out);
void pd_quantize_q4_0(const float *x, int64_t n, pd_block_q4_0_t *out);
/* Dequantize/convert one row of n elements of any dtype to f32. */
void pd_dequantize_row(pd_dtype_t dtype, const void *row, int64_t n, float *out);

#ifdef __cplusplus
}
#endif

#endif
