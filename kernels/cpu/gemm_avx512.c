/* gemm_avx512.c - the AVX-512 matrix-matrix kernel for prompt-sized matmuls.
 *
 * Design: y[t][o] = sum_k W[o][k] x[t][k] is computed one panel of NR = 32 output rows
 * at a time. The panel is packed once per task into f32, transposed to [k][32] (weights
 * of any dtype are converted here, so the microkernel only sees f32), and stays in L2
 * while every token of the task's chunk streams past it. The microkernel holds an
 * MR = 6 tokens x 32 rows tile in 12 zmm accumulators; per k it loads two panel
 * vectors and multiplies them by six broadcast x[t][k] (fused broadcast-FMA), so it is
 * bound by FMA throughput, not loads. Each y[t][o] is a single in-order chain of
 * fused multiply-adds over k, whatever the tiling.
 * Threading: pure function of its task; the panel lives in the caller's scratch. */
#include <string.h>

#include "common/tensor.h"
#include "kernels/cpu/cpu_internal.h"
#include "kernels/cpu/simd_avx512.h"

#define NR PD_CPU_AVX512_NR
#define MR 6

size_t pd_cpu_avx512_gemm_scratch(int dt, int64_t n_in)
{
    (void)dt;
    /* panel [n_in][NR], converted rows [16][n_in], a zero row [n_in] */
    return (size_t)n_in * (NR + 17) * sizeof(float) + 256;
}

/* A 16 x 16 f32 transpose: rows r[0..15] in, columns out. */
static inline void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* Row o of W as f32: in place for F32, else converted into buf. */
static const float *row_f32(const pd_cpu_mm_t *mm, int64_t o, float *buf)
{
    const uint8_t *w = mm->w + (size_t)o * mm->row_bytes;
    int64_t K = mm->n_in, k = 0;
    switch (mm->dt) {
    case PD_CPU_DT_F32:
        (void)buf;
        return (const float *)w;
    case PD_CPU_DT_F16:
        for (; k + 16 <= K; k += 16)
            vstore(buf + k, vload_h((const uint16_t *)w + k));
        if (k < K)
            vstoren(buf + k, vloadn_h((const uint16_t *)w + k, K - k), K - k);
        return buf;
    case PD_CPU_DT_BF16:
        for (; k + 16 <= K; k += 16)
            vstore(buf + k, vload_bf((const uint16_t *)w + k));
        if (k < K)
            vstoren(buf + k, vloadn_bf((const uint16_t *)w + k, K - k), K - k);
        return buf;
    default:
        pd_dequantize_row(mm->dtype, w, K, buf);
        return buf;
    }
}

/* panel[k][r] = W[o0 + r][k] for r < NR (zero past o1), k < K. Rows are converted
 * to f32 16 at a time (conv: [16][K]) and transposed in 16 x 16 tiles. */
static void pack_panel(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, float *panel,
                       float *conv, float *zero)
{
    const int64_t K = mm->n_in;
    if (o1 - o0 < NR)
        memset(zero, 0, (size_t)K * sizeof(float));
    for (int half = 0; half < NR / 16; half++) {
        const float *rows[16];
        for (int r = 0; r < 16; r++) {
            int64_t o = o0 + half * 16 + r;
            rows[r] = o < o1 ? row_f32(mm, o, conv + r * K) : zero;
        }
        float *dst = panel + half * 16;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v[16];
            for (int r = 0; r < 16; r++)
                v[r] = _mm512_loadu_ps(rows[r] + k);
            transpose16(v);
            for (int i = 0; i < 16; i++)
                _mm512_store_ps(dst + (k + i) * NR, v[i]);
        }
        for (; k < K; k++)
            for (int r = 0; r < 16; r++)
                dst[k * NR + r] = rows[r][k];
    }
}

/* y[t0..t0+M)[o0..o0+n_valid) from the packed panel. */
static inline __attribute__((always_inline)) void kernel(const float *panel,
                                                         const float *x, int64_t K,
                                                         float *y, int64_t ldy,
                                                         int n_valid, const int M)
{
    __m512 c0[MR], c1[MR];
    const float *xr[MR];
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        c0[i] = _mm512_setzero_ps();
        c1[i] = _mm512_setzero_ps();
        xr[i] = x + i * K;
    }
#pragma GCC unroll 2
    for (int64_t k = 0; k < K; k++) {
        __m512 b0 = _mm512_load_ps(panel + k * NR);
        __m512 b1 = _mm512_load_ps(panel + k * NR + 16);
#pragma GCC unroll 16
        for (int i = 0; i < M; i++) {
            __m512 a = _mm512_set1_ps(xr[i][k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    if (n_valid == NR) {
#pragma GCC unroll 16
        for (int i = 0; i < M; i++) {
            _mm512_storeu_ps(y + i * ldy, c0[i]);
            _mm512_storeu_ps(y + i * ldy + 16, c1[i]);
        }
        return;
    }
    __mmask16 m0 = n_valid >= 16 ? 0xffff : (__mmask16)((1u << n_valid) - 1);
    __mmask16 m1 = n_valid <= 16 ? 0 : (__mmask16)((1u << (n_valid - 16)) - 1);
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, c0[i]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, c1[i]);
    }
}

void pd_cpu_avx512_gemm(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, int64_t t0,
                        int64_t t1, void *scratch)
{
    const int64_t K = mm->n_in;
    float *panel = scratch;               /* [K][NR], 64-byte aligned */
    float *conv = panel + (size_t)K * NR; /* [16][K] */
    float *zero = conv + (size_t)K * 16;  /* [K] */
    pack_panel(mm, o0, o1, panel, conv, zero);
    int n_valid = (int)(o1 - o0);
    int64_t t = t0;
    for (; t + MR <= t1; t += MR)
        kernel(panel, mm->x + t * K, K, mm->y + t * mm->n_out + o0, mm->n_out, n_valid,
               MR);
    const float *x = mm->x + t * K;
    float *y = mm->y + t * mm->n_out + o0;
    /* one case per remainder: a constant mr lets the inlined kernel drop the unused
     * rows of its register tile (a loop over mr would keep them all live) */
    switch (t1 - t) {
    case 1:
        kernel(panel, x, K, y, mm->n_out, n_valid, 1);
        break;
    case 2:
        kernel(panel, x, K, y, mm->n_out, n_valid, 2);
        break;
    case 3:
        kernel(panel, x, K, y, mm->n_out, n_valid, 3);
        break;
    case 4:
        kernel(panel, x, K, y, mm->n_out, n_valid, 4);
        break;
    case 5:
        kernel(panel, x, K, y, mm->n_out, n_valid, 5);
        break;
    default:
        break;
    }
}
