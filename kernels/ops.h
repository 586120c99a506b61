/* ops.h - the ops table: every numeric operation the engine needs, behind one
 * struct of function pointers that each backend fills in (cpu now, cuda later).
 *
 * The engine never #ifdefs a backend: it calls k->matmul(k, ...) and so on. All
 * activations are F32, row-major, with the shapes given beside each op. Pointers
 * are backend memory (host memory for the CPU backend). An op either completes
 * before it returns (CPU) or is ordered on the backend's stream (CUDA).
 * Threading: one pd_kernels_t is driven by one thread at a time (the engine
 * thread); the CPU backend fans each op out over its own persistent thread pool. */
#ifndef PD_KERNELS_OPS_H
#define PD_KERNELS_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"

#ifdef __cplusplus
extern "C" { /* also included by the CUDA backend (C++) */
#endif

typedef struct pd_kernels pd_kernels_t;

/* Positions per attention chunk: every query's softmax runs over the position chunks
 * [c * PD_ATTN_CHUNK, (c + 1) * PD_ATTN_CHUNK) of its sequence, each reduced to a
 * partial (max, sum, weighted values) and folded in chunk order. The split is fixed,
 * never chosen from the batch or the thread count, so a query's output is the same
 * bits alone, in a prompt chunk or beside 63 other sequences (batch invariance). */
#define PD_ATTN_CHUNK 64

/* Attention of a varlen batch of T query tokens from any number of sequences over
 * the paged KV cache. The cache of one layer is an array of blocks; block b holds
 * [block_size][n_kv_heads][head_dim] elements of kv_dtype for K (k_cache) and the
 * same for V (v_cache). Query t belongs to sequence seq[t], whose block table is row
 * seq[t] of block_tables ([n_seqs][bt_stride]): its logical position p lives in
 * physical block block_tables[seq[t] * bt_stride + p / block_size], row
 * p % block_size. Query t sits at position pos[t] and attends causally to positions
 * 0..pos[t] of its sequence (all already written to the cache). Query head h reads KV
 * head h / (n_heads / n_kv_heads) (grouped-query). The cache is read in place: no
 * gather into a contiguous copy. */
typedef struct pd_attn_args {
    const float *q; /* [T][n_heads][head_dim] */
    float *out;     /* [T][n_heads][head_dim] */
    int64_t T;
    const int32_t *pos;  /* [T] */
    const int32_t *seq;  /* [T] row of block_tables */
    const void *k_cache; /* layer base, blocks as above */
    const void *v_cache;
    pd_dtype_t kv_dtype;         /* F32 (F16 optional per backend) */
    const int32_t *block_tables; /* [n_seqs][bt_stride] */
    int64_t n_seqs, bt_stride;
    int64_t block_size;
    int n_heads, n_kv_heads, head_dim;
    float scale; /* usually 1/sqrt(head_dim) */
    /* Host copies of pos and seq (the caller's), so a device backend can plan its
     * launches (longest context, runs of prompt positions) without reading device
     * memory back; NULL: not given (the CPU backend reads pos and seq themselves). */
    const int32_t *pos_host, *seq_host;
} pd_attn_args_t;

struct pd_kernels {
    const char *name; /* "scalar", "avx2", "avx512", "cuda" */
    int n_threads;

    /* y[t][o] = sum_i W[o][i] * x[t][i] for t < T; W: [ne1 = n_out][ne0 = n_in] of any
     * pd_dtype_t. x: [T][n_in], y: [T][n_out] (y must not alias x). T = 1 is the
     * matrix-vector path; larger T the matrix-matrix path. Batch invariance: row y[t]
     * is a function of W and x[t] alone, the same bits for every T, every place of the
     * row in the batch and every thread count, so batching never changes a result. */
    void (*matmul)(pd_kernels_t *k, const pd_tensor_t *w, const float *x, int64_t T,
                   float *y);
    /* ys[m] = x W_m^T for m < n (1 <= n <= 4), as n matmul calls would compute them,
     * bit for bit, but as one fan-out that prepares x once: the Q/K/V projections and
     * the FFN gate/up pairs. Every W_m has the same dtype and ne0. */
    void (*matmul_multi)(pd_kernels_t *k, const pd_tensor_t *const *ws, float *const *ys,
                         int n, const float *x, int64_t T);
    /* out[i][:] = row ids[i] of w converted to f32; w: [rows][ne0]. */
    void (*get_rows)(pd_kernels_t *k, const pd_tensor_t *w, const int32_t *ids, int64_t n,
                     float *out);
    /* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, rows of n; out may alias x. */
    void (*rmsnorm)(pd_kernels_t *k, float *out, const float *x, const float *weight,
                    int64_t T, int64_t n, float eps);
    /* In place, interleaved pairs (x[2i], x[2i+1]) of each head rotated by
     * pos[t] * theta^(-2i/head_dim), computed in float as llama2.c does:
     * freq = 1.0f / powf(theta, (float)(2i) / (float)head_dim). x:
     * [T][n_heads][head_dim]. */
    void (*rope)(pd_kernels_t *k, float *x, const int32_t *pos, int64_t T, int n_heads,
                 int head_dim, float theta);
    /* In place softmax of each of T rows of n. */
    void (*softmax)(pd_kernels_t *k, float *x, int64_t T, int64_t n);
    /* gate[i] = silu(gate[i]) * up[i], i < n. */
    void (*silu_mul)(pd_kernels_t *k, float *gate, const float *up, int64_t n);
    /* y[i] += x[i], i < n (the residual). */
    void (*add)(pd_kernels_t *k, float *y, const float *x, int64_t n);
    /* Writes src[t] (one row of row_elems = n_kv_heads*head_dim floats) to cache row
     * slots[t] (physical block * block_size + offset in the block: the slot mapping),
     * converting to kv_dtype; a negative slot skips the row. */
    void (*kv_write)(pd_kernels_t *k, void *cache, pd_dtype_t kv_dtype, int64_t row_elems,
                     const int32_t *slots, int64_t T, const float *src);
    /* out[t] depends only on q[t], pos[t] and its sequence's cache (PD_ATTN_CHUNK). */
    void (*attention)(pd_kernels_t *k, const pd_attn_args_t *a);

    /* ---- Memory (device backends). device false (the CPU backend): every pointer is
     * host memory and the members below (graphs included) are NULL. device true
     * (CUDA): activations,
     * weights and the KV cache live in device memory, reached through these. */
    bool device;
    /* Device memory (aligned to 256 bytes) or NULL; free accepts NULL. */
    void *(*alloc)(pd_kernels_t *k, size_t bytes);
    void (*free)(pd_kernels_t *k, void *p);
    /* Copies ordered after every op enqueued before them. to_device returns once src
     * may be reused; to_host returns once dst holds the bytes (it waits for the ops
     * before it). dev_copy copies between any two of device memory and pinned host
     * memory (pin), asynchronously (sync waits for it). */
    pd_status_t (*to_device)(pd_kernels_t *k, void *dst, const void *src, size_t bytes);
    pd_status_t (*to_host)(pd_kernels_t *k, void *dst, const void *src, size_t bytes);
    pd_status_t (*dev_copy)(pd_kernels_t *k, void *dst, const void *src, size_t bytes);
    /* Page-locks host memory so copies to and from it run at full speed (and
     * asynchronously); unpin undoes it. Either may be NULL. */
    pd_status_t (*pin)(pd_kernels_t *k, void *p, size_t bytes);
    void (*unpin)(pd_kernels_t *k, void *p);
    /* *dev = *w with its data copied to device memory (and F32 matrices converted to
     * BF16 when the backend was created with bf16 weights); release with free(dev->
     * data). */
    pd_status_t (*upload_tensor)(pd_kernels_t *k, const pd_tensor_t *w, pd_tensor_t *dev);
    /* ids_host[r] = the index of the largest of logits[r][0..vocab) (device logits),
     * lowest index among equals: greedy sampling without copying the logits back. */
    pd_status_t (*argmax)(pd_kernels_t *k, const float *logits, int64_t rows,
                          int64_t vocab, int32_t *ids_host);
    /* Waits until every op enqueued so far has finished; PD_ERR_IO (logged) when one
     * failed on the device. */
    pd_status_t (*sync)(pd_kernels_t *k);

    /* ---- Graphs (device backends that can record a sequence of ops and launch it
     * again as one unit: CUDA graphs). NULL on the CPU backend, and all NULL on a
     * device backend that cannot record; the caller then runs every op itself. A
     * recorded sequence replays the same kernels with the same arguments, so a launch
     * gives the same bits as the ops it recorded would have; whatever differs from one
     * launch to the next must be in device memory the kernels read, written by a copy
     * enqueued before the launch. */
    /* A value that, with the args' pointers and sizes, fixes what attention enqueues
     * for a batch of T queries at positions pos_host[0..T) of rows seq_host[0..T) (host
     * memory, as pd_attn_args_t.pos_host/seq_host): two batches with the same nonzero
     * value get the same launches with the same arguments (the CUDA backend: the
     * number of decode splits of the longest context). 0: the launches would carry a
     * plan computed on the host for this very batch (prompt runs), which a replay
     * would not refresh; such a pass must not be recorded. */
    uint64_t (*graph_attn_key)(pd_kernels_t *k, int64_t T, const int32_t *pos_host,
                               const int32_t *seq_host);
    /* Changes whenever the backend frees or moves a buffer of its own that a recorded
     * op may pass to its kernels (scratch, workspaces): a graph recorded under another
     * value may name freed memory and must never be launched. */
    uint64_t (*graph_generation)(pd_kernels_t *k);
    /* Starts recording on the calling thread: the ops enqueued from now until
     * graph_end are recorded, not run. Between the two only the compute ops above may
     * be called (no copies, argmax, to_host, sync, alloc or free), and an op that would
     * have to grow the backend's scratch fails the recording instead. PD_OK:
     * recording; otherwise nothing started (logged, unless an earlier failure of the
     * backend, which the next ops report, is the reason) and the ops run as usual. */
    pd_status_t (*graph_begin)(pd_kernels_t *k);
    /* Ends recording. PD_OK: *graph_p is an executable graph of the recorded ops, none
     * of which has run yet. Otherwise *graph_p = NULL, the recording is dropped (none
     * of its ops ran, and its failure is not remembered as a failure of the backend:
     * the next ops run normally), the reason is logged (WARN the first time, DEBUG
     * after), and the caller runs the same ops again one by one. */
    pd_status_t (*graph_end)(pd_kernels_t *k, void **graph_p);
    /* Enqueues graph, ordered as an op after everything enqueued before it. An error
     * (logged as graph_end's) enqueues nothing and is not remembered: the caller may
     * run the ops one by one instead. */
    pd_status_t (*graph_launch)(pd_kernels_t *k, void *graph);
    /* Releases a graph once the launches enqueued with it are done; accepts NULL. */
    void (*graph_destroy)(pd_kernels_t *k, void *graph);

    /* ---- Host threads. Runs fn(arg, task, thread) for every task in [0, n_tasks),
     * on up to n_threads host threads (the calling thread among them, thread <
     * n_threads), and returns once every task is done: host work between ops (the
     * engine's draws of sampled tokens). The CPU backend lends its kernel pool; NULL
     * on a backend with no host threads of its own (CUDA), whose caller brings its
     * own. Never called while the backend's own ops run. */
    void (*host_run)(pd_kernels_t *k, int64_t n_tasks,
                     void (*fn)(void *arg, int64_t task, int thread), void *arg);

    /* Releases everything; called through pd_kernels_destroy(). */
    void (*destroy)(pd_kernels_t *k);
};

/* The CPU backend with n_threads workers (n_threads <= 0: one per online CPU).
 * isa: NULL or "auto" picks the best the CPU supports (avx512 > avx2 > scalar);
 * "scalar", "avx2" or "avx512" force one (PD_ERR_UNSUPPORTED if the CPU lacks it). */
pd_status_t pd_kernels_cpu_new(int n_threads, const char *isa, pd_kernels_t **k_p);
/* Accepts NULL; clears *k_p. */
void pd_kernels_destroy(pd_kernels_t **k_p);

/* The CUDA backend on GPU `device` (kernels/cuda/backend.cu). bf16_weights: F32
 * matrices are converted to BF16 as they are uploaded (halving their memory and
 * traffic), the embedding table among them (it doubles as the output matrix of tied
 * models); norms stay F32. PD_ERR_UNSUPPORTED (with a logged reason)
 * when this build has no CUDA backend, no GPU is present or `device` does not
 * exist. */
pd_status_t pd_kernels_cuda_new(int device, bool bf16_weights, pd_kernels_t **k_p);

/* A backend from a --device string: "cpu" (n_threads, isa as pd_kernels_cpu_new),
 * "cuda" (GPU 0) or "cuda:N". PD_ERR_INVALID for another string, PD_ERR_UNSUPPORTED
 * as pd_kernels_cuda_new; the reason is logged either way. */
pd_status_t pd_kernels_new_device(const char *device, int n_threads, const char *isa,
                                  bool bf16_weights, pd_kernels_t **k_p);
/* True when this build has the CUDA backend. */
bool pd_kernels_have_cuda(void);

#ifdef __cplusplus
}
#endif

#endif
