/* cuda_bf16.h (cudasim) - __nv_bfloat16 and the conversions pdserve's kernels use, in
 * software (round to nearest even). */
#ifndef PD_CUDASIM_CUDA_BF16_H
#define PD_CUDASIM_CUDA_BF16_H

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short __x;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return __nv_bfloat16{(unsigned short)((x >> 16) | 0x40u)};
    x += 0x7fffu + ((x >> 16) & 1);
    return __nv_bfloat16{(unsigned short)(x >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f)
{
    return __float2bfloat16_rn(f);
}
inline float __bfloat162float(__nv_bfloat16 b)
{
    uint32_t x = (uint32_t)b.__x << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b)
{
    return b.__x;
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u)
{
    return __nv_bfloat16{u};
}

#endif
