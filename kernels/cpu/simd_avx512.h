/* simd_avx512.h - the AVX-512 vector mappings used by simd_ops.h (16 f32 lanes).
 *
 * Included only by files compiled with the AVX-512 flags (see kernels/CMakeLists.txt).
 * The kernel bodies in simd_ops.h are written against these names alone, the way
 * ggml's simd-mappings.h keeps instruction-set detail out of kernel code.
 * Threading: pure inline functions. */
#ifndef PD_SIMD_AVX512_H
#define PD_SIMD_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#define VW 16
typedef __m512 vf;

#define PD_SIMD_INLINE static inline __attribute__((always_inline))

PD_SIMD_INLINE __mmask16 tail_mask(int64_t n)
{
    return (__mmask16)((1u << n) - 1u);
}
PD_SIMD_INLINE vf vzero(void)
{
    return _mm512_setzero_ps();
}
PD_SIMD_INLINE vf vset1(float x)
{
    return _mm512_set1_ps(x);
}
PD_SIMD_INLINE vf vload(const float *p)
{
    return _mm512_loadu_ps(p);
}
PD_SIMD_INLINE void vstore(float *p, vf v)
{
    _mm512_storeu_ps(p, v);
}
/* n < VW lanes; the rest read as zero / left untouched. */
PD_SIMD_INLINE vf vloadn(const float *p, int64_t n)
{
    return _mm512_maskz_loadu_ps(tail_mask(n), p);
}
PD_SIMD_INLINE void vstoren(float *p, vf v, int64_t n)
{
    _mm512_mask_storeu_ps(p, tail_mask(n), v);
}
PD_SIMD_INLINE vf vload_h(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
PD_SIMD_INLINE vf vloadn_h(const uint16_t *p, int64_t n)
{
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p));
}
PD_SIMD_INLINE void vstore_h(uint16_t *p, vf v)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
PD_SIMD_INLINE void vstoren_h(uint16_t *p, vf v, int64_t n)
{
    _mm256_mask_storeu_epi16(p, tail_mask(n),
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
PD_SIMD_INLINE vf vload_bf(const uint16_t *p)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
PD_SIMD_INLINE vf vloadn_bf(const uint16_t *p, int64_t n)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vmin _mm512_min_ps
#define vfma _mm512_fmadd_ps /* a * b + c, one rounding */
PD_SIMD_INLINE vf vabs(vf v)
{
    return _mm512_abs_ps(v);
}
PD_SIMD_INLINE float vhsum(vf v)
{
    return _mm512_reduce_add_ps(v);
}
PD_SIMD_INLINE float vhmax(vf v)
{
    return _mm512_reduce_max_ps(v);
}
/* The four horizontal sums of a, b, c, d, in lanes 0..3. */
PD_SIMD_INLINE __m128 vhsum4(vf a, vf b, vf c, vf d)
{
    vf x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    vf y = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    vf z = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xee));
    z = _mm512_add_ps(z, _mm512_shuffle_f32x4(z, z, 0x4e));
    z = _mm512_add_ps(z, _mm512_shuffle_f32x4(z, z, 0xb1));
    return _mm512_castps512_ps128(z);
}
/* Lane 0 of vhsum4(v, ...): the same addition tree for one vector (pairs 2 apart,
 * then 1 apart within 128-bit lanes, then the lanes 2 apart, then 1 apart), so a sum
 * does not depend on which of the two reduced it. */
PD_SIMD_INLINE float vhsum1(vf v)
{
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
    return _mm512_cvtss_f32(v);
}
/* (v0, v1, v2, v3, ...) -> (v1, v0, v3, v2, ...) */
PD_SIMD_INLINE vf vswap_pairs(vf v)
{
    return _mm512_permute_ps(v, 0xb1);
}
/* expf to about 2 ulp (Cephes polynomial); scalef handles the 2^n range. */
PD_SIMD_INLINE vf vexp(vf x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
    vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    vf p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
/* 32 floats -> 32 int8 of round(x * id) (nearest even), plus 128 when add128. */
PD_SIMD_INLINE void vquant32(const float *x, float id, int8_t *out, int add128)
{
    vf s = _mm512_set1_ps(id);
    __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), s));
    __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16), s));
    __m256i q = _mm256_set_m128i(_mm512_cvtsepi32_epi8(b), _mm512_cvtsepi32_epi8(a));
    if (add128)
        q = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    _mm256_storeu_si256((__m256i *)out, q);
}
PD_SIMD_INLINE float vamax32(const float *x)
{
    return vhmax(vmax(vabs(vload(x)), vabs(vload(x + 16))));
}

#endif
