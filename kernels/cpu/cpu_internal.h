/* cpu_internal.h - private to kernels/cpu: the CPU backend object, the per-ISA kernel
 * table that dispatch.c drives, and the argument blocks its tasks share.
 *
 * Design: dispatch.c owns threading, scratch memory and argument checks; an ISA
 * (scalar reference, AVX2, AVX-512) supplies only kernels over a range of rows,
 * tokens or (token, head) pairs. Every kernel is a pure function of its inputs, so
 * results do not depend on how the work was split over threads.
 * Threading: kernels run on pool threads, each with its own scratch. */
#ifndef PD_KERNELS_CPU_INTERNAL_H
#define PD_KERNELS_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/threadpool.h"
#include "kernels/ops.h"

#define PD_CPU_ALIGN 64

/* Dense dtype index for the per-dtype kernel arrays. */
enum {
    PD_CPU_DT_F32,
    PD_CPU_DT_F16,
    PD_CPU_DT_BF16,
    PD_CPU_DT_Q8_0,
    PD_CPU_DT_Q4_0,
    PD_CPU_DT_COUNT
};

/* Ways a matmul kernel wants the activations. */
enum {
    PD_CPU_X_F32 = 0, /* x as given */
    PD_CPU_X_Q8 = 1,  /* int8 blocks of 32, signed, with f32 scales (xq, xd) */
    PD_CPU_X_Q8U = 2, /* the same with 128 added: unsigned bytes (VNNI u8 x s8) */
};

/* One matmul call, shared read-only by its tasks. */
typedef struct pd_cpu_mm {
    int dt; /* PD_CPU_DT_* */
    pd_dtype_t dtype;
    const uint8_t *w; /* [n_out] rows of row_bytes */
    size_t row_bytes;
    int64_t n_in, n_out, T;
    const float *x;   /* [T][n_in] */
    float *y;         /* [T][n_out] */
    const int8_t *xq; /* [T][n_in] quantized x (PD_CPU_X_Q8*), else NULL */
    const float *xd;  /* [T][n_in / 32] scales of xq */
} pd_cpu_mm_t;

/* y[t][o] for o in [o0, o1) and every t < mm->T. scratch: per-thread, at least
 * mv_scratch bytes (below), 64-byte aligned. */
typedef void (*pd_cpu_mv_fn)(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1,
                             void *scratch);
/* y[t][o] for o in [o0, o1) (at most gemm_nr rows, o0 a multiple of gemm_nr) and
 * t in [t0, t1). */
typedef void (*pd_cpu_gemm_fn)(const pd_cpu_mm_t *mm, int64_t o0, int64_t o1, int64_t t0,
                               int64_t t1, void *scratch);

typedef struct pd_cpu_isa {
    const char *name;
    int vw; /* f32 lanes of the vector kernels (attn_chunk wants head_dim % vw == 0) */
    pd_cpu_mv_fn mv[PD_CPU_DT_COUNT];
    uint8_t mv_x[PD_CPU_DT_COUNT];        /* PD_CPU_X_* */
    pd_cpu_gemm_fn gemm[PD_CPU_DT_COUNT]; /* NULL: the mv kernel serves every T */
    uint8_t gemm_x[PD_CPU_DT_COUNT];
    int64_t gemm_min_T[PD_CPU_DT_COUNT]; /* T from which gemm beats mv */
    int gemm_nr;                         /* output rows per gemm panel */
    /* Per-thread scratch bytes for a matmul with n_in inputs. */
    size_t (*mm_scratch)(int dt, int64_t n_in, int gemm);

    /* x[n] (n % 32 == 0) -> qs[n] and d[n / 32]; add128 for PD_CPU_X_Q8U. */
    void (*quantize_x)(const float *x, int64_t n, int8_t *qs, float *d, int add128);

    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t n, float eps);
    void (*softmax)(float *x, int64_t n);
    void (*silu_mul)(float *gate, const float *up, int64_t n);
    void (*add)(float *y, const float *x, int64_t n);
    /* One token: x [n_heads][head_dim]; cs [head_dim] cosines (each twice) then
     * [head_dim] sines (negated at even index), as built by dispatch.c. */
    void (*rope)(float *x, int n_heads, int head_dim, const float *cs, int32_t pos,
                 float theta);
    /* out[:] = f16(src[:]) for F16 KV. */
    void (*f32_to_f16)(const float *src, uint16_t *dst, int64_t n);
    /* Query t, positions [p0, p1) (p1 - p0 <= PD_ATTN_CHUNK, within one chunk) of
     * every head, as a partial softmax: part [n_heads][head_dim + 2] = (sum_p
     * e^(s_p - m) v_p, m = max_p s_p, l = sum_p e^(s_p - m)); scores: n_heads *
     * PD_ATTN_CHUNK floats. Returns 0 (nothing done) for a head_dim it does not handle;
     * dispatch.c then uses pd_cpu_attn_chunk_any. */
    int (*attn_chunk)(const pd_attn_args_t *a, int64_t t, int64_t p0, int64_t p1,
                      float *part, float *scores);
} pd_cpu_isa_t;

extern const pd_cpu_isa_t pd_cpu_isa_scalar;
/* attn_chunk for any head_dim, in plain C (scalar.c): the scalar ISA's, and every
 * ISA's fallback for head sizes its vector kernel does not take. */
int pd_cpu_attn_chunk_any(const pd_attn_args_t *a, int64_t t, int64_t p0, int64_t p1,
                          float *part, float *scores);
#if defined(PD_KERNELS_X86)
extern const pd_cpu_isa_t pd_cpu_isa_avx2;
extern const pd_cpu_isa_t pd_cpu_isa_avx512;
/* Switches a copy of pd_cpu_isa_avx512 to the AVX512_VNNI int8 kernels (call only
 * when cpuid reports VNNI). */
void pd_cpu_avx512_vnni_patch(pd_cpu_isa_t *isa);

#endif

/* Helpers shared by the ISA files. */
static inline int64_t pd_cpu_min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* The block table of query t's sequence. */
static inline const int32_t *pd_cpu_attn_table(const pd_attn_args_t *a, int64_t t)
{
    return a->block_tables + (int64_t)a->seq[t] * a->bt_stride;
}

#endif
