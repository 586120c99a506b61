/* ops_avx512vnni.c - the AVX512_VNNI int8 kernels for Q8_0 / Q4_0 weights.
 *
 * Design: the activations are quantized to Q8 blocks (per 32, f32 scale, as
 * llama.cpp's q8_0 x q8_0 dot), and each block product is an integer dot product
 * (vpdpbusd), scaled by d_w * d_x into an f32 accumulator. The error against the
 * float reference is that of rounding x to 8 bits: at most amax_b(x) / 254 *
 * sum_b |w| per block b, in practice about 0.1-0.3% of sum |w * x|.
 * Matrix-vector: simd_ops.h's kernels with vpdpbusd (|w| times sign(x, w)).
 * Matrix-matrix: a panel of NR = 32 output rows is repacked per block of 32 inputs as
 * [8 groups of 4 inputs][32 rows][4 bytes] (so one zmm holds 4 inputs of 16 rows),
 * with the rows' f32 scales and -128 * sum(w) per block. x is quantized with 128
 * added (unsigned, as vpdpbusd wants), and the int32 accumulator of each block starts
 * at -128 * sum(w), which cancels the offset exactly. The microkernel holds MR = 4
 * tokens x 32 rows: per block, 8 x 8 vpdpbusd, then per accumulator one convert and
 * two multiply(-add)s into f32.
 * pd_cpu_avx512_vnni_patch() installs these kernels into a copy of the AVX-512 table;
 * dispatch.c calls it only when cpuid reports VNNI.
 * Threading: pure functions; dispatch.c fans them out, panels in per-thread scratch. */
#include "kernels/cpu/simd_avx512.h"
#define PD_SIMD_VNNI 1
#include "kernels/cpu/simd_ops.h"

#define NR          32
#define MR          4
#define BLOCK_BYTES (PD_QK * NR + NR * 4 + NR * 4) /* qs, scales, -128 * sum */

static size_t panel_bytes(int64_t n_in)
{
    return (size_t)(n_in / PD_QK) * BLOCK_BYTES + 64;
}

static size_t mm_scratch(int dt, int64_t n_in, int gemm)
{
    if (!gemm)
        return 0;
    size_t a = pd_cpu_avx512_gemm_scratch(dt, n_in), b = panel_bytes(n_in);
    return a > b ? a : b;
}

/* Packs one block of 16 rows (those with mask bits set; the rest zero): dword g of
 * every row, gathered across rows, is group g of the panel; each row's sum comes from
 * vpdpbusd with ones. */
static inline void pack_block16(const pd_cpu_mm_t *mm, const uint8_t *base, __m512i idx,
                                __mmask16 valid, uint8_t *blk, float *scale,
                                int32_t *ncorr)
{
    const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
    __m512i sum = zero;
    if (mm->dt == PD_CPU_DT_Q8_0) {
        for (int g = 0; g < PD_QK / 4; g++) {
            __m512i v =
                _mm512_mask_i32gather_epi32(zero, valid, idx, base + 2 + 4 * g, 1);
            sum = _mm512_dpbusd_epi32(sum, ones, v);
            _mm512_store_si512(blk + g * NR * 4, v);
        }
    } else {
        const __m512i m = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
        for (int g = 0; g < 4; g++) {
            __m512i v =
                _mm512_mask_i32gather_epi32(zero, valid, idx, base + 2 + 4 * g, 1);
            __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, m), eight);
            __m512i hi =
                _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m), eight);
            lo = _mm512_maskz_mov_epi32(valid, lo);
            hi = _mm512_maskz_mov_epi32(valid, hi);
            sum = _mm512_dpbusd_epi32(sum, ones, lo);
            sum = _mm512_dpbusd_epi32(sum, ones, hi);
            _mm512_store_si512(blk + g * NR * 4, lo);
            _mm512_store_si512(blk + (g + 4) * NR * 4, hi);
        }
    }
    __m512i d = _mm512_mask_i32gather_epi32(zero, valid, idx, base, 1);
    _mm512_storeu_ps(scale, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d)));
    _mm512_storeu_si512(ncorr, _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 7)));
}

/* Rows [o0, o1) of W as the panel layout of the header, 16 rows per gather. */
static void pack_panel(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, uint8_t *panel)
{
    const int64_t nb = mm->n_in / PD_QK;
    const size_t bs =
        mm->dt == PD_CPU_DT_Q8_0 ? sizeof(pd_block_q8_0_t) : sizeof(pd_block_q4_0_t);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)mm->row_bytes));
    for (int half = 0; half < NR / 16; half++) {
        int64_t r0 = o0 + half * 16, n = pd_cpu_min64(16, o1 - r0);
        __mmask16 valid = n <= 0 ? 0 : n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
        const uint8_t *rows = mm->w + (size_t)(n > 0 ? r0 : o0) * mm->row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = panel + (size_t)b * BLOCK_BYTES;
            float *scale = (float *)(blk + PD_QK * NR);
            int32_t *ncorr = (int32_t *)(scale + NR);
            pack_block16(mm, rows + (size_t)b * bs, idx, valid, blk + half * 64,
                         scale + half * 16, ncorr + half * 16);
        }
    }
}

static inline __attribute__((always_inline)) void kernel(const uint8_t *panel,
                                                         const pd_cpu_mm_t *mm, int64_t t,
                                                         float *y, int n_valid,
                                                         const int M)
{
    const int64_t K = mm->n_in, nb = K / PD_QK;
    __m512 f0[MR], f1[MR];
    const uint8_t *xu[MR];
    const float *xd[MR];
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        f0[i] = _mm512_setzero_ps();
        f1[i] = _mm512_setzero_ps();
        xu[i] = (const uint8_t *)mm->xq + (t + i) * K;
        xd[i] = mm->xd + (t + i) * nb;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = panel + (size_t)b * BLOCK_BYTES;
        const float *scale = (const float *)(blk + PD_QK * NR);
        const int32_t *ncorr = (const int32_t *)(scale + NR);
        __m512i c0 = _mm512_loadu_si512(ncorr), c1 = _mm512_loadu_si512(ncorr + 16);
        __m512i i0[MR], i1[MR];
#pragma GCC unroll 16
        for (int i = 0; i < M; i++) {
            i0[i] = c0;
            i1[i] = c1;
        }
#pragma GCC unroll 8
        for (int g = 0; g < PD_QK / 4; g++) {
            __m512i w0 = _mm512_load_si512(blk + g * NR * 4);
            __m512i w1 = _mm512_load_si512(blk + g * NR * 4 + 64);
#pragma GCC unroll 16
            for (int i = 0; i < M; i++) {
                int32_t xv;
                memcpy(&xv, xu[i] + b * PD_QK + g * 4, 4);
                __m512i xb = _mm512_set1_epi32(xv);
                i0[i] = _mm512_dpbusd_epi32(i0[i], xb, w0);
                i1[i] = _mm512_dpbusd_epi32(i1[i], xb, w1);
            }
        }
        __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
#pragma GCC unroll 16
        for (int i = 0; i < M; i++) {
            __m512 dx = _mm512_set1_ps(xd[i][b]);
            f0[i] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[i]), _mm512_mul_ps(s0, dx), f0[i]);
            f1[i] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[i]), _mm512_mul_ps(s1, dx), f1[i]);
        }
    }
    __mmask16 m0 = n_valid >= 16 ? 0xffff : (__mmask16)((1u << n_valid) - 1);
    __mmask16 m1 = n_valid >= NR   ? 0xffff
                   : n_valid <= 16 ? 0
                                   : (__mmask16)((1u << (n_valid - 16)) - 1);
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        _mm512_mask_storeu_ps(y + i * mm->n_out, m0, f0[i]);
        _mm512_mask_storeu_ps(y + i * mm->n_out + 16, m1, f1[i]);
    }
}

static void gemm_q(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, int64_t t0, int64_t t1,
                   void *scratch)
{
    uint8_t *panel = scratch; /* 64-byte aligned */
    pack_panel(mm, o0, o1, panel);
    int n_valid = (int)(o1 - o0);
    int64_t t = t0;
    for (; t + MR <= t1; t += MR)
        kernel(panel, mm, t, mm->y + t * mm->n_out + o0, n_valid, MR);
    float *y = mm->y + t * mm->n_out + o0;
    switch (t1 - t) {
    case 1:
        kernel(panel, mm, t, y, n_valid, 1);
        break;
    case 2:
        kernel(panel, mm, t, y, n_valid, 2);
        break;
    case 3:
        kernel(panel, mm, t, y, n_valid, 3);
        break;
    default:
        break;
    }
}

void pd_cpu_avx512_vnni_patch(pd_cpu_isa_t *isa)
{
    isa->name = "avx512";
    isa->mm_scratch = mm_scratch;
    for (int dt = PD_CPU_DT_Q8_0; dt <= PD_CPU_DT_Q4_0; dt++) {
        isa->mv[dt] = dt == PD_CPU_DT_Q8_0 ? simd_mv_q8_0 : simd_mv_q4_0;
        isa->mv_x[dt] = PD_CPU_X_Q8;
        isa->gemm[dt] = gemm_q;
        isa->gemm_x[dt] = PD_CPU_X_Q8U;
        isa->gemm_min_T[dt] = 8;
    }
}
