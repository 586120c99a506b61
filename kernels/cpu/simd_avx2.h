/* simd_avx2.h - the AVX2+FMA+F16C vector mappings used by simd_ops.h (8 f32 lanes).
 *
 * Included only by files compiled with the AVX2 flags (see kernels/CMakeLists.txt);
 * the same names as simd_avx512.h so the kernel bodies stay ISA-neutral.
 * Threading: pure inline functions. */
#ifndef PD_SIMD_AVX2_H
#define PD_SIMD_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define VW 8
typedef __m256 vf;

#define PD_SIMD_INLINE static inline __attribute__((always_inline))

static const int32_t pd_avx2_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                               0,  0,  0,  0,  0,  0,  0,  0};

PD_SIMD_INLINE __m256i tail_mask(int64_t n)
{
    return _mm256_loadu_si256((const __m256i *)(pd_avx2_mask_table + 8 - n));
}
PD_SIMD_INLINE vf vzero(void)
{
    return _mm256_setzero_ps();
}
PD_SIMD_INLINE vf vset1(float x)
{
    return _mm256_set1_ps(x);
}
PD_SIMD_INLINE vf vload(const float *p)
{
    return _mm256_loadu_ps(p);
}
PD_SIMD_INLINE void vstore(float *p, vf v)
{
    _mm256_storeu_ps(p, v);
}
PD_SIMD_INLINE vf vloadn(const float *p, int64_t n)
{
    return _mm256_maskload_ps(p, tail_mask(n));
}
PD_SIMD_INLINE void vstoren(float *p, vf v, int64_t n)
{
    _mm256_maskstore_ps(p, tail_mask(n), v);
}
PD_SIMD_INLINE vf vload_h(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
PD_SIMD_INLINE vf vloadn_h(const uint16_t *p, int64_t n)
{
    uint16_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)n * 2);
    return vload_h(tmp);
}
PD_SIMD_INLINE void vstore_h(uint16_t *p, vf v)
{
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
PD_SIMD_INLINE void vstoren_h(uint16_t *p, vf v, int64_t n)
{
    uint16_t tmp[8];
    vstore_h(tmp, v);
    memcpy(p, tmp, (size_t)n * 2);
}
PD_SIMD_INLINE vf vload_bf(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
PD_SIMD_INLINE vf vloadn_bf(const uint16_t *p, int64_t n)
{
    uint16_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)n * 2);
    return vload_bf(tmp);
}
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vmin _mm256_min_ps
#define vfma _mm256_fmadd_ps /* a * b + c, one rounding */
PD_SIMD_INLINE vf vabs(vf v)
{
    return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}
PD_SIMD_INLINE float vhsum(vf v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
PD_SIMD_INLINE float vhmax(vf v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* The four horizontal sums of a, b, c, d, in lanes 0..3. */
PD_SIMD_INLINE __m128 vhsum4(vf a, vf b, vf c, vf d)
{
    vf x = _mm256_hadd_ps(a, b); /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    vf y = _mm256_hadd_ps(c, d);
    vf z = _mm256_hadd_ps(x, y); /* a0-3 b0-3 c0-3 d0-3 | a4-7 ... */
    return _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
}
/* Lane 0 of vhsum4(v, ...): the same addition tree for one vector (adjacent pairs,
 * then pairs of pairs, then the two 128-bit halves), so a sum does not depend on
 * which of the two reduced it. */
PD_SIMD_INLINE float vhsum1(vf v)
{
    v = _mm256_add_ps(v, _mm256_permute_ps(v, 0xb1));
    v = _mm256_add_ps(v, _mm256_permute_ps(v, 0x4e));
    __m128 s = _mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    return _mm_cvtss_f32(s);
}
PD_SIMD_INLINE vf vswap_pairs(vf v)
{
    return _mm256_permute_ps(v, 0xb1);
}
/* expf to about 2 ulp (Cephes polynomial) for x in [-87.3, 88.3]; clamped outside,
 * which softmax and silu do not notice. */
PD_SIMD_INLINE vf vexp(vf x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    vf p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
PD_SIMD_INLINE void vquant32(const float *x, float id, int8_t *out, int add128)
{
    vf s = _mm256_set1_ps(id);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), s));
    __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), s));
    /* packs work within 128-bit lanes: undo the interleave with one permute */
    __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (add128)
        q = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    _mm256_storeu_si256((__m256i *)out, q);
}
PD_SIMD_INLINE float vamax32(const float *x)
{
    vf m = vmax(vmax(vabs(vload(x)), vabs(vload(x + 8))),
                vmax(vabs(vload(x + 16)), vabs(vload(x + 24))));
    return vhmax(m);
}

#endif
