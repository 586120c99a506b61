/* cuda_fp16.h (cudasim) - __half and the conversions pdserve's kernels use, in
 * software (round to nearest even, as the CUDA intrinsics). */
#ifndef PD_CUDASIM_CUDA_FP16_H
#define PD_CUDASIM_CUDA_FP16_H

#include <cstdint>
#include <cstring>

struct __half {
    unsigned short __x;
};
typedef __half half;

inline unsigned short pd_sim_f32_to_f16_bits(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: keep it quiet */
        return (unsigned short)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (unsigned short)(sign | 0x7c00u);
    if (ax < 0x38800000u) {   /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) /* below half the smallest subnormal */
            return (unsigned short)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 + 1 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half_ = 1u << (shift - 1);
        if (rem > half_ || (rem == half_ && (r & 1)))
            r++;
        return (unsigned short)(sign | r);
    }
    uint32_t r = ((ax >> 13) - (112u << 10)); /* rebias exponent 127 -> 15 */
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1)))
        r++;
    return (unsigned short)(sign | r);
}
inline float pd_sim_f16_bits_to_f32(unsigned short h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu,
             x;
    if (e == 0x1f)
        x = sign | 0x7f800000u | (m << 13);
    else if (e)
        x = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m)
        x = sign;
    else {
        int k = 0;
        while (!(m & 0x400u)) {
            m <<= 1;
            k++;
        }
        x = sign | ((uint32_t)(113 - k) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline __half __float2half_rn(float f)
{
    return __half{pd_sim_f32_to_f16_bits(f)};
}
inline __half __float2half(float f)
{
    return __float2half_rn(f);
}
inline float __half2float(__half h)
{
    return pd_sim_f16_bits_to_f32(h.__x);
}
inline __half __ushort_as_half(unsigned short u)
{
    return __half{u};
}
inline unsigned short __half_as_ushort(__half h)
{
    return h.__x;
}

#endif
