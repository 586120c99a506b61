/* ops_avx2.c - the AVX2+FMA+F16C kernels: simd_ops.h over 8-lane vectors, and the
 * f32-panel GEMM of gemm_avx2.c for prompt-sized matmuls.
 *
 * Design: see simd_ops.h; this file only instantiates it and fills the table.
 * Threading: pure functions; dispatch.c fans them out. */
#include "kernels/cpu/simd_avx2.h"
#include "kernels/cpu/simd_ops.h"

static size_t mm_scratch(int dt, int64_t n_in, int gemm)
{
    return gemm ? pd_cpu_avx2_gemm_scratch(dt, n_in) : 0;
}

const pd_cpu_isa_t pd_cpu_isa_avx2 = {
    .name = "avx2",
    .vw = VW,
    .mv = {simd_mv_f32, simd_mv_f16, simd_mv_bf16, simd_mv_q8_0, simd_mv_q4_0},
    .mv_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_Q8, PD_CPU_X_Q8},
    .gemm = {pd_cpu_avx2_gemm, pd_cpu_avx2_gemm, pd_cpu_avx2_gemm, pd_cpu_avx2_gemm,
             pd_cpu_avx2_gemm},
    .gemm_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32},
    .gemm_min_T = {8, 8, 8, 8, 8},
    .gemm_nr = PD_CPU_AVX2_NR,
    .mm_scratch = mm_scratch,
    .quantize_x = simd_quantize_x,
    .rmsnorm = simd_rmsnorm,
    .softmax = simd_softmax,
    .silu_mul = simd_silu_mul,
    .add = simd_add,
    .rope = simd_rope,
    .f32_to_f16 = simd_f32_to_f16,
    .attn_block = simd_attn_block,
    .attn_chunk = simd_attn_chunk,
};
