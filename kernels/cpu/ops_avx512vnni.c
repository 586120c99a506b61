/* ops_avx512vnni.c - the AVX512_VNNI int8 kernels for Q8_0 / Q4_0 weights.
 *
 * Design: the activations are quantized to Q8 blocks (per 32, f32 scale, as
 * llama.cpp's q8_0 x q8_0 dot), and each block product is an integer dot product
 * (vpdpbusd), scaled by d_w * d_x into an f32 accumulator. Relative error against the
 * float reference is that of rounding x to 8 bits: about 0.5% of sum |w * x| at worst
 * per block, typically 0.1-0.3%. pd_cpu_avx512_vnni_patch() installs these kernels
 * into a copy of the AVX-512 table; dispatch.c calls it only when cpuid reports VNNI.
 * Threading: pure functions; dispatch.c fans them out. */
#include "kernels/cpu/simd_avx512.h"
#define PD_SIMD_VNNI 1
#include "kernels/cpu/simd_ops.h"

void pd_cpu_avx512_vnni_patch(pd_cpu_isa_t *isa)
{
    isa->name = "avx512";
    isa->mv[PD_CPU_DT_Q8_0] = simd_mv_q8_0;
    isa->mv[PD_CPU_DT_Q4_0] = simd_mv_q4_0;
    isa->mv_x[PD_CPU_DT_Q8_0] = PD_CPU_X_Q8;
    isa->mv_x[PD_CPU_DT_Q4_0] = PD_CPU_X_Q8;
}
