/* ops_avx512vnni.c - the AVX512_VNNI int8 kernels for Q8_0 / Q4_0 weights.
 *
 * Design: simd_matmul.h's int8 panels with vpdpbusd: x is quantized with 128 added
 * (unsigned, as vpdpbusd wants) and each block's int32 accumulator starts at
 * -128 * sum(w), which cancels the offset exactly, so the block dots (and every
 * result) equal those of the vpmaddubsw kernels of ops_avx512.c. The error against the
 * float reference is that of rounding x to 8 bits: at most amax_b(x) / 254 *
 * sum_b |w| per block b, in practice about 0.1-0.3% of sum |w * x|.
 * pd_cpu_avx512_vnni_patch() installs these kernels into a copy of the AVX-512 table;
 * dispatch.c calls it only when cpuid reports VNNI.
 * Threading: pure functions; dispatch.c fans them out, panels in per-thread scratch. */
#include "kernels/cpu/simd_avx512.h"
#define PD_SIMD_VNNI 1
#include "kernels/cpu/simd_ops.h"
#include "kernels/cpu/simd_matmul.h"

void pd_cpu_avx512_vnni_patch(pd_cpu_isa_t *isa)
{
    isa->name = "avx512";
    isa->mm_scratch = simd_mm_scratch;
    isa->mv[PD_CPU_DT_Q8_0] = simd_mv_q8_0;
    isa->mv[PD_CPU_DT_Q4_0] = simd_mv_q4_0;
    isa->gemm[PD_CPU_DT_Q8_0] = simd_gemm_q8_0;
    isa->gemm[PD_CPU_DT_Q4_0] = simd_gemm_q4_0;
    for (int dt = PD_CPU_DT_Q8_0; dt <= PD_CPU_DT_Q4_0; dt++) {
        isa->mv_x[dt] = PD_CPU_X_Q8; /* simd_matmul.h's mq1 wants x signed */
        isa->gemm_x[dt] = PD_CPU_X_Q8U;
        isa->gemm_min_T[dt] = 8;
    }
}
