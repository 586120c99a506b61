/* cuda_internal.h - the CUDA kernels behind kernels/cuda/backend.cu (the ops table).
 *
 * Every function here enqueues work on stream s and returns at once (no
 * synchronisation, no allocation: scratch is passed in). All pointers are device
 * memory unless a name ends in _host. Activations are F32 row-major as in
 * kernels/ops.h; weights keep their GGUF dtype (F32, F16, BF16, Q8_0, Q4_0 blocks as
 * in common/tensor.h). Functions return cudaSuccess or the launch error
 * (cudaGetLastError()).
 * Files: ops_basic.cu (element-wise, norms, RoPE, embeddings, KV rows, matvec,
 * sampling), attention.cu (paged attention), backend.cu (the ops table, cuBLAS). */
#ifndef PD_CUDA_INTERNAL_H
#define PD_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/tensor.h"
#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- ops_basic.cu ---- */

/* out[i][:] = row ids[i] of w ([rows][ne0] of dtype) as f32. */
cudaError_t pdc_get_rows(cudaStream_t s, pd_dtype_t dtype, const void *w, int64_t ne0,
                         const int32_t *ids, int64_t n, float *out);
/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight; rows of n; out may alias x. */
cudaError_t pdc_rmsnorm(cudaStream_t s, float *out, const float *x, const float *weight,
                        int64_t T, int64_t n, float eps);
/* Interleaved RoPE in place, as ops.h: freq = 1.0f / powf(theta, (float)(2i) /
 * (float)head_dim), angle = pos * freq, computed in float. */
cudaError_t pdc_rope(cudaStream_t s, float *x, const int32_t *pos, int64_t T, int n_heads,
                     int head_dim, float theta);
cudaError_t pdc_softmax(cudaStream_t s, float *x, int64_t T, int64_t n);
cudaError_t pdc_silu_mul(cudaStream_t s, float *gate, const float *up, int64_t n);
cudaError_t pdc_add(cudaStream_t s, float *y, const float *x, int64_t n);
/* cache row slots[t] = src[t] (row_elems floats) converted to kv_dtype (F32 or F16);
 * negative slots skipped. */
cudaError_t pdc_kv_write(cudaStream_t s, void *cache, pd_dtype_t kv_dtype,
                         int64_t row_elems, const int32_t *slots, int64_t T,
                         const float *src);
/* y[t][o] = sum_i W[o][i] x[t][i]: W [n_out][n_in] of dtype (F32, F16, BF16, Q8_0,
 * Q4_0), x [T][n_in] f32, y [T][n_out] f32, F32 accumulation. Built for small T
 * (decode: T <= 8 reads each weight row once for all T rows); correct for any T. A
 * negative n_in or n_out, or a width the dtype's blocks cannot tile, is
 * cudaErrorInvalidValue; an empty product does nothing. */
cudaError_t pdc_matvec(cudaStream_t s, pd_dtype_t dtype, const void *w, int64_t n_in,
                       int64_t n_out, const float *x, int64_t T, float *y);
/* ys[m] = x W_m^T for m < n (1 <= n <= PDC_MV_MULTI_MAX): n matrices of one dtype and
 * n_in, ws[m] with n_outs[m] rows, in one launch whose grid spreads the rows of all of
 * them (the Q/K/V projections, the FFN gate/up pair). ys[m] holds the same bits
 * pdc_matvec(ws[m], n_outs[m]) would write: a row is computed by the same code in the
 * same order, whichever launch it is in. */
#define PDC_MV_MULTI_MAX 4
cudaError_t pdc_matvec_multi(cudaStream_t s, pd_dtype_t dtype, const void *const *ws,
                             const int64_t *n_outs, float *const *ys, int n, int64_t n_in,
                             const float *x, int64_t T);
/* Conversions of n elements (dst_dtype / src_dtype F16 or BF16), round to nearest
 * even, as pd_f32_to_fp16 / pd_f32_to_bf16 do. */
cudaError_t pdc_f32_to_half(cudaStream_t s, pd_dtype_t dst_dtype, const float *src,
                            void *dst, int64_t n);
cudaError_t pdc_half_to_f32(cudaStream_t s, pd_dtype_t src_dtype, const void *src,
                            float *dst, int64_t n);
/* out[r] = the index of the largest of logits[r][0..vocab) (the lowest index among
 * equal maxima, as the CPU sampler's greedy path). */
cudaError_t pdc_argmax(cudaStream_t s, const float *logits, int64_t rows, int64_t vocab,
                       int32_t *out);
/* Top-p sampling per row r: probabilities softmax(logits[r] / temperature[r]); the
 * nucleus is every token whose probability is >= the largest threshold th such that
 * the tokens with probability >= th hold at least top_p[r] of the mass (top_p >= 1:
 * every token); out[r] = the first token (by index) at which the running sum of
 * nucleus probabilities, in index order, exceeds u[r] * (nucleus mass), u in [0, 1).
 * temperature[r] <= 0 means greedy (argmax). */
cudaError_t pdc_sample_top_p(cudaStream_t s, const float *logits, int64_t rows,
                             int64_t vocab, const float *temperature, const float *top_p,
                             const float *u, int32_t *out);
/* KV rows for transfers: dst[i] = row slots[i] of cache (gather) / row slots[i] of
 * cache = src[i] (scatter); rows of row_bytes (a multiple of 4). */
cudaError_t pdc_kv_gather(cudaStream_t s, const void *cache, int64_t row_bytes,
                          const int32_t *slots, int64_t n, void *dst);
cudaError_t pdc_kv_scatter(cudaStream_t s, void *cache, int64_t row_bytes,
                           const int32_t *slots, int64_t n, const void *src);

/* ---- attention.cu ---- */

/* Positions per split of the decode kernel: a query's context is cut into splits of
 * this many positions, each reduced to a partial (max, sum, weighted values) and folded
 * in split order, independently of the batch (so a query's output does not depend on
 * what shares its batch). */
#define PDC_ATTN_SPLIT 256

/* Scratch floats pdc_attn_decode needs for n_q queries whose longest context is
 * max_ctx positions. */
int64_t pdc_attn_decode_scratch(const pd_attn_args_t *a, int64_t n_q, int64_t max_ctx);
/* Paged attention (kernels/ops.h semantics; a's pointers are device memory) for the
 * queries q_idx[0..n_q) (device; indices into the batch, NULL: all T), each over its
 * own context 0..pos[t], split along the context (flash-decoding): one pass of
 * partials into scratch, one pass folding them. max_ctx bounds pos[t] + 1 for the
 * listed queries. KV dtype F32 or F16; head_dim a multiple of 8, at most 256. */
cudaError_t pdc_attn_decode(cudaStream_t s, const pd_attn_args_t *a, const int32_t *q_idx,
                            int64_t n_q, int64_t max_ctx, float *scratch);
/* The decode kernel's variants, compared side by side by tests/gpu and
 * bench/bench_cuda.c; pdc_attn_decode runs PDC_ATTN_DEC_DEFAULT.
 * PDC_ATTN_DEC_REGS: each lane loads its K rows, then its V rows, into registers a round
 *   at a time (the kernel measured in docs/benchmarks.md).
 * PDC_ATTN_DEC_VSTAGE: the same, except that every V row of the block's split is copied
 *   into shared memory with cp.async as the block starts, so the V reads are in flight
 *   during the K pass and the V pass reads shared memory. Same arithmetic in the same
 *   order: the same bits as REGS. Shapes whose V stage does not fit (more than 64 KiB)
 *   run REGS. */
#define PDC_ATTN_DEC_REGS    0
#define PDC_ATTN_DEC_VSTAGE  1
#define PDC_ATTN_DEC_DEFAULT PDC_ATTN_DEC_REGS
cudaError_t pdc_attn_decode_variant(cudaStream_t s, const pd_attn_args_t *a,
                                    const int32_t *q_idx, int64_t n_q, int64_t max_ctx,
                                    float *scratch, int variant);
/* 1 when PDC_ATTN_DEC_VSTAGE with a's shape (kv dtype, head_dim, group) runs the VSTAGE
 * kernel on the current device, 0 when it falls back to REGS (the stage does not fit,
 * or the device refused the shared-memory opt-in, which this call makes if it was not
 * made yet), -1 for arguments pdc_attn_decode_variant would refuse. Tests and
 * benchmarks use it to know which kernel they compared. */
int pdc_attn_decode_vstage_runs(const pd_attn_args_t *a);
/* Paged attention for runs of consecutive queries of one sequence (prompt chunks):
 * runs[3 * r + 0] = first batch row t0, runs[3 * r + 1] = length n (rows t0..t0+n-1 of
 * sequence seq[t0] at positions pos[t0]..pos[t0]+n-1), runs[3 * r + 2] unused. Tiled,
 * causal, online softmax (flash-attention style): a tile of queries shares each K/V
 * tile it loads. max_run bounds n. */
cudaError_t pdc_attn_prefill(cudaStream_t s, const pd_attn_args_t *a, const int32_t *runs,
                             int64_t n_runs, int64_t max_run);

#ifdef __cplusplus
}
#endif

#endif
