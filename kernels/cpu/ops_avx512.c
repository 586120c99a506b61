/* ops_avx512.c - the AVX-512 (F, BW, VL, DQ) kernels: simd_ops.h and simd_matmul.h
 * over 16-lane vectors.
 *
 * Design: see those headers. Without VNNI the Q8_0/Q4_0 kernels use
 * vpmaddubsw/vpmaddwd on |w| and sign(x, w); ops_avx512vnni.c overrides them when
 * cpuid reports AVX512_VNNI (the same results: every block's integer dot is exact).
 * Threading: pure functions; dispatch.c fans them out. */
#include "kernels/cpu/simd_avx512.h"
#include "kernels/cpu/simd_ops.h"
#include "kernels/cpu/simd_matmul.h"

const pd_cpu_isa_t pd_cpu_isa_avx512 = {
    .name = "avx512",
    .vw = VW,
    .mv = {simd_mv_f32, simd_mv_f16, simd_mv_bf16, simd_mv_q8_0, simd_mv_q4_0},
    .mv_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_Q8, PD_CPU_X_Q8},
    .gemm = {simd_gemm_f32, simd_gemm_f16, simd_gemm_bf16, simd_gemm_q8_0,
             simd_gemm_q4_0},
    .gemm_x = {PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_F32, PD_CPU_X_Q8, PD_CPU_X_Q8},
    .gemm_min_T = {8, 32, 32, 8, 8}, /* F16/BF16: mv to T = 31 (no conversion pass) */
    .gemm_nr = MQ_NR,
    .mm_scratch = simd_mm_scratch,
    .quantize_x = simd_quantize_x,
    .rmsnorm = simd_rmsnorm,
    .softmax = simd_softmax,
    .silu_mul = simd_silu_mul,
    .add = simd_add,
    .rope = simd_rope,
    .f32_to_f16 = simd_f32_to_f16,
    .attn_chunk = simd_attn_chunk,
};
