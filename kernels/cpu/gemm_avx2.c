/* gemm_avx2.c - the AVX2+FMA matrix-matrix kernel for prompt-sized matmuls.
 *
 * Design: as gemm_avx512.c with 8-lane vectors: a panel of NR = 16 output rows is
 * converted to f32 and packed [k][16] once per task, then an MR = 6 tokens x 16 rows
 * tile (12 ymm accumulators) sweeps it with broadcast-FMAs. Each y[t][o] is one
 * in-order chain of fused multiply-adds over k.
 * Threading: pure function of its task; the panel lives in the caller's scratch. */
#include <string.h>

#include "common/tensor.h"
#include "kernels/cpu/cpu_internal.h"
#include "kernels/cpu/simd_avx2.h"

#define NR PD_CPU_AVX2_NR
#define MR 6

size_t pd_cpu_avx2_gemm_scratch(int dt, int64_t n_in)
{
    (void)dt;
    /* panel [n_in][NR] + one converted row [n_in] */
    return (size_t)n_in * (NR + 1) * sizeof(float) + 128;
}

static const float *row_f32(const pd_cpu_mm_t *mm, int64_t o, float *buf)
{
    const uint8_t *w = mm->w + (size_t)o * mm->row_bytes;
    int64_t K = mm->n_in, k = 0;
    switch (mm->dt) {
    case PD_CPU_DT_F32:
        return (const float *)w;
    case PD_CPU_DT_F16:
        for (; k + 8 <= K; k += 8)
            vstore(buf + k, vload_h((const uint16_t *)w + k));
        break;
    case PD_CPU_DT_BF16:
        for (; k + 8 <= K; k += 8)
            vstore(buf + k, vload_bf((const uint16_t *)w + k));
        break;
    default:
        pd_dequantize_row(mm->dtype, w, K, buf);
        return buf;
    }
    if (k < K)
        pd_dequantize_row(mm->dtype, w + (mm->dtype == PD_DTYPE_F32 ? 4 : 2) * k, K - k,
                          buf + k);
    return buf;
}

static void pack_panel(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, float *panel,
                       float *buf)
{
    const int64_t K = mm->n_in;
    for (int r = 0; r < NR; r++) {
        int64_t o = o0 + r;
        if (o >= o1) {
            for (int64_t k = 0; k < K; k++)
                panel[k * NR + r] = 0.0f;
            continue;
        }
        const float *src = row_f32(mm, o, buf);
        for (int64_t k = 0; k < K; k++)
            panel[k * NR + r] = src[k];
    }
}

static inline __attribute__((always_inline)) void kernel(const float *panel,
                                                         const float *x, int64_t K,
                                                         float *y, int64_t ldy,
                                                         int n_valid, const int M)
{
    __m256 c0[MR], c1[MR];
    const float *xr[MR];
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        c0[i] = _mm256_setzero_ps();
        c1[i] = _mm256_setzero_ps();
        xr[i] = x + i * K;
    }
    for (int64_t k = 0; k < K; k++) {
        __m256 b0 = _mm256_load_ps(panel + k * NR);
        __m256 b1 = _mm256_load_ps(panel + k * NR + 8);
#pragma GCC unroll 16
        for (int i = 0; i < M; i++) {
            __m256 a = _mm256_broadcast_ss(xr[i] + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < M; i++) {
        if (n_valid == NR) {
            _mm256_storeu_ps(y + i * ldy, c0[i]);
            _mm256_storeu_ps(y + i * ldy + 8, c1[i]);
        } else {
            float tmp[NR];
            _mm256_storeu_ps(tmp, c0[i]);
            _mm256_storeu_ps(tmp + 8, c1[i]);
            memcpy(y + i * ldy, tmp, (size_t)n_valid * sizeof(float));
        }
    }
}

void pd_cpu_avx2_gemm(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, int64_t t0,
                      int64_t t1, void *scratch)
{
    const int64_t K = mm->n_in;
    float *panel = scratch;              /* [K][NR], 64-byte aligned */
    float *buf = panel + (size_t)K * NR; /* [K] */
    pack_panel(mm, o0, o1, panel, buf);
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
