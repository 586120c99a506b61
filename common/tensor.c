/* tensor.c - dtype tables, checked sizes, fp16 conversion and GGML-compatible
 * Q8_0/Q4_0 (de)quantization. Pure functions; any thread. */
#include "common/tensor.h"

#include <math.h>

int pd_dtype_valid(uint32_t dtype)
{
    return dtype == PD_DTYPE_F32 || dtype == PD_DTYPE_F16 || dtype == PD_DTYPE_Q4_0 ||
           dtype == PD_DTYPE_Q8_0 || dtype == PD_DTYPE_BF16;
}

const char *pd_dtype_name(pd_dtype_t dtype)
{
    switch (dtype) {
    case PD_DTYPE_F32:
        return "f32";
    case PD_DTYPE_F16:
        return "f16";
    case PD_DTYPE_Q4_0:
        return "q4_0";
    case PD_DTYPE_Q8_0:
        return "q8_0";
    case PD_DTYPE_BF16:
        return "bf16";
    }
    return "unknown";
}

int64_t pd_dtype_block_elems(pd_dtype_t dtype)
{
    return (dtype == PD_DTYPE_Q4_0 || dtype == PD_DTYPE_Q8_0) ? PD_QK : 1;
}

size_t pd_dtype_block_bytes(pd_dtype_t dtype)
{
    switch (dtype) {
    case PD_DTYPE_F32:
        return 4;
    case PD_DTYPE_F16:
        return 2;
    case PD_DTYPE_BF16:
        return 2;
    case PD_DTYPE_Q8_0:
        return sizeof(pd_block_q8_0_t);
    case PD_DTYPE_Q4_0:
        return sizeof(pd_block_q4_0_t);
    }
    return 0;
}

pd_status_t pd_dtype_row_bytes(pd_dtype_t dtype, int64_t n, size_t *bytes_p)
{
    int64_t be = pd_dtype_block_elems(dtype);
    size_t bb = pd_dtype_block_bytes(dtype), r;
    if (bb == 0 || n < 0 || n % be != 0)
        return PD_ERR_FORMAT;
    if (pd_mul_size((size_t)(n / be), bb, &r))
        return PD_ERR_OVERFLOW;
    *bytes_p = r;
    return PD_OK;
}

pd_status_t pd_tensor_size(pd_dtype_t dtype, const int64_t *ne, int n_dims,
                           size_t *bytes_p)
{
    if (n_dims < 1 || n_dims > PD_TENSOR_MAX_DIMS)
        return PD_ERR_FORMAT;
    for (int i = 0; i < n_dims; i++)
        if (ne[i] < 1)
            return PD_ERR_FORMAT;
    size_t total;
    pd_status_t st = pd_dtype_row_bytes(dtype, ne[0], &total);
    if (st != PD_OK)
        return st;
    for (int i = 1; i < n_dims; i++)
        if (pd_mul_size(total, (size_t)ne[i], &total))
            return PD_ERR_OVERFLOW;
    if (total > (size_t)INT64_MAX)
        return PD_ERR_OVERFLOW;
    *bytes_p = total;
    return PD_OK;
}

size_t pd_tensor_row_bytes(const pd_tensor_t *t)
{
    size_t r = 0;
    (void)pd_dtype_row_bytes(t->dtype, t->ne[0], &r);
    return r;
}

float pd_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: value = man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) /* inf or NaN */
        return pd_fp32_from_bits(sign | 0x7f800000u | (man << 13));
    return pd_fp32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t pd_f32_to_fp16(float f)
{
    uint32_t u = pd_fp32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) /* NaN */
        return sign | 0x7e00u;
    if (au >= 0x477ff000u) /* rounds to >= 65520: inf */
        return sign | 0x7c00u;
    if (au < 0x38800000u) { /* below the smallest normal: subnormal or zero */
        float a = pd_fp32_from_bits(au);
        /* a * 2^24 rounded to nearest even gives the subnormal mantissa */
        float m = nearbyintf(a * 16777216.0f);
        return sign | (uint16_t)m;
    }
    /* normal: round the 13 dropped mantissa bits to nearest even */
    uint32_t r = au + 0xfffu + ((au >> 13) & 1u);
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

void pd_quantize_q8_0(const float *x, int64_t n, pd_block_q8_0_t *out)
{
    for (int64_t b = 0; b < n / PD_QK; b++) {
        const float *xb = x + b * PD_QK;
        float amax = 0.0f;
        for (int j = 0; j < PD_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = pd_f32_to_fp16(d);
        for (int j = 0; j < PD_QK; j++)
            out[b].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

void pd_quantize_q4_0(const float *x, int64_t n, pd_block_q4_0_t *out)
{
    for (int64_t b = 0; b < n / PD_QK; b++) {
        const float *xb = x + b * PD_QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < PD_QK; j++) {
            if (fabsf(xb[j]) > amax) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        float d = max / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = pd_f32_to_fp16(d);
        for (int j = 0; j < PD_QK / 2; j++) {
            int lo = (int)(xb[j] * id + 8.5f);
            int hi = (int)(xb[j + PD_QK / 2] * id + 8.5f);
            lo = lo > 15 ? 15 : lo;
            hi = hi > 15 ? 15 : hi;
            out[b].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

void pd_dequantize_row(pd_dtype_t dtype, const void *row, int64_t n, float *out)
{
    switch (dtype) {
    case PD_DTYPE_F32:
        memcpy(out, row, (size_t)n * 4);
        return;
    case PD_DTYPE_F16: {
        const uint8_t *p = row;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = pd_fp16_to_f32(h);
        }
        return;
    }
    case PD_DTYPE_BF16: {
        const uint8_t *p = row;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = pd_bf16_to_f32(h);
        }
        return;
    }
    case PD_DTYPE_Q8_0: {
        const pd_block_q8_0_t *b = row;
        for (int64_t i = 0; i < n / PD_QK; i++) {
            float d = pd_fp16_to_f32(b[i].d);
            for (int j = 0; j < PD_QK; j++)
                out[i * PD_QK + j] = (float)b[i].qs[j] * d;
        }
        return;
    }
    case PD_DTYPE_Q4_0: {
        const pd_block_q4_0_t *b = row;
        for (int64_t i = 0; i < n / PD_QK; i++) {
            float d = pd_fp16_to_f32(b[i].d);
            for (int j = 0; j < PD_QK / 2; j++) {
                out[i * PD_QK + j] = (float)((b[i].qs[j] & 0x0f) - 8) * d;
                out[i * PD_QK + j + PD_QK / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
            }
        }
        return;
    }
    }
}
