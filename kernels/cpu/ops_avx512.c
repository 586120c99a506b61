/* ops_avx512.c - the AVX-512 (F, BW, VL, DQ) kernels: simd_ops.h over 16-lane
 * vectors, and the f32-panel GEMM of gemm_avx512.c for prompt-sized matmuls.
 *
 * Design: see simd_ops.h. Without VNNI the Q8_0/Q4_0 matrix-vector kernels use
 * vpmaddubsw/vpmaddwd; ops_avx512vnni.c overrides them (and the int8 GEMM) when cpuid
 * reports AVX512_VNNI.
 * Threading: pure functions; dispatch.c fans them out. */
#include "kernels/cpu/simd_avx512.h"
#include "kernels/cpu/simd_ops.h"

static size_t mm_scratch(int dt, int64_t n_in, int gemm)
{
    return gemm ? pd_cpu_avx512_gemm_scratch(dt, n_in) : 0;
}

const pd_cpu_isa_t pd_cpu_isa_avx512 = {
    .name = "avx512",
    .vw = VW,
    .mv = {simd_mv_f32, simd_mv_f16, simd_mv_bf16, simd_mv_q8_0, simd_mv_q4_0},
    .mv_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_Q8, PD_CPU_X_Q8},
    .gemm = {pd_cpu_avx512_gemm, pd_cpu_avx512_gemm, pd_cpu_avx512_gemm,
             pd_cpu_avx512_gemm, pd_cpu_avx512_gemm},
    .gemm_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32},
    .gemm_min_T = {8, 8, 8, 8, 8},
    .gemm_nr = PD_CPU_AVX512_NR,
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
