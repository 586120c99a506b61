/* backend.cu - the CUDA backend: fills the ops table of kernels/ops.h with the kernels
 * of ops_basic.cu and attention.cu, and cuBLAS for the large products.
 *
 * Every op is enqueued on the backend's one stream and returns at once; to_host,
 * argmax and sync wait. A failed launch or copy is logged once and remembered: the
 * next sync (or to_host) returns PD_ERR_IO, so the engine ends the step with an error
 * instead of carrying on with garbage.
 *
 * Graphs (ops.h): graph_begin puts the stream into capture mode
 * (cudaStreamCaptureModeThreadLocal: only this thread's unsafe calls break it, so a
 * transfer thread allocating meanwhile does not); while capturing, a failed call is
 * kept as the capture's error instead of failing the backend, scratch never grows
 * (that would sync and free memory a recorded kernel names) and graph_end drops the
 * recording and clears the error, so the caller reruns the ops eagerly. The buffers
 * of the backend's own that a recorded op may name (matmul and attention scratch)
 * move only in grow(), which bumps the generation; decode-only attention takes no
 * plan from the host (graph_attn_key's rule keeps the others out). cuBLAS gets a fixed
 * workspace at creation (under capture it must not allocate one per call).
 *
 * Matrix products: F32 weights always go through pdc_matvec, whose row (o, t) is the
 * same arithmetic whatever T is (batch invariant, as the CPU backend: the exact mode
 * the golden tests run). F16/BF16 weights go through pdc_matvec up to 8 rows (decode:
 * one read of the weights for all rows) and cuBLAS above (the activations converted to
 * the weights' dtype, F32 accumulation and output); Q8_0/Q4_0 always through
 * pdc_matvec (built for decode batches; prompts on quantized models are slow here).
 * Threading: one thread drives a backend at a time; every entry point selects the
 * backend's GPU first (cudaSetDevice is per thread). */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/cuda/cuda_internal.h"

/* cuBLAS is opened when the first CUDA backend is made, not linked: its libraries
 * weigh about 200 MiB of resident memory once loaded, which every CPU-only process of
 * a CUDA build would otherwise pay (and a CPU host without them could not start the
 * binaries at all). PD_CUBLAS_SONAME and PD_CUBLAS_PATH come from the build. */
#ifndef PD_CUBLAS_SONAME
#define PD_CUBLAS_SONAME "libcublas.so"
#endif
#ifndef PD_CUBLAS_PATH
#define PD_CUBLAS_PATH PD_CUBLAS_SONAME
#endif
static struct cublas_api {
    decltype(&cublasCreate_v2) create;
    decltype(&cublasDestroy_v2) destroy;
    decltype(&cublasSetStream_v2) set_stream;
    decltype(&cublasSetMathMode) set_math_mode;
    decltype(&cublasSetWorkspace_v2) set_workspace; /* NULL in an old cuBLAS: no graphs */
    /* the C entry point (C++ also sees an overload taking a cudaDataType) */
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                              int, int, const void *, const void *, cudaDataType, int,
                              const void *, cudaDataType, int, const void *, void *,
                              cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    bool ok;
    char why[256];
} blas_api;
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

static void blas_open(void)
{
    void *h = dlopen(PD_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        h = dlopen(PD_CUBLAS_PATH, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(blas_api.why, sizeof blas_api.why, "%s", e ? e : "not found");
        return;
    }
    blas_api.create = (decltype(blas_api.create))dlsym(h, "cublasCreate_v2");
    blas_api.destroy = (decltype(blas_api.destroy))dlsym(h, "cublasDestroy_v2");
    blas_api.set_stream = (decltype(blas_api.set_stream))dlsym(h, "cublasSetStream_v2");
    blas_api.set_math_mode =
        (decltype(blas_api.set_math_mode))dlsym(h, "cublasSetMathMode");
    blas_api.gemm_ex = (decltype(blas_api.gemm_ex))dlsym(h, "cublasGemmEx");
    blas_api.set_workspace =
        (decltype(blas_api.set_workspace))dlsym(h, "cublasSetWorkspace_v2");
    blas_api.ok = blas_api.create && blas_api.destroy && blas_api.set_stream &&
                  blas_api.set_math_mode && blas_api.gemm_ex;
    if (!blas_api.ok)
        snprintf(blas_api.why, sizeof blas_api.why, "%s lacks a cuBLAS v2 entry point",
                 PD_CUBLAS_SONAME);
    /* the handle stays open for the process: backends come and go, the library not */
}

typedef struct cuda_kernels {
    pd_kernels_t k; /* first: the ops table the engine holds */
    int device;
    bool bf16;
    bool failed;
    cudaStream_t s;
    cublasHandle_t blas;
    void *half_x; /* activations converted for cuBLAS */
    size_t half_x_bytes;
    float *attn; /* decode attention partials */
    size_t attn_floats;
    int32_t *meta; /* runs and query lists for attention, argmax output */
    size_t meta_elems;
    int32_t *meta_host; /* the plan being built */
    int32_t *plan_prev; /* the plan on the device now ([plan_elems]) */
    size_t meta_host_elems, plan_elems;
    int32_t *plan_pin; /* pinned copy the plan uploads from ([plan_pin_elems]) */
    size_t plan_pin_elems;
    cudaEvent_t plan_ev; /* recorded after each plan upload */
    bool plan_ev_set;
    int32_t *ids; /* argmax output */
    size_t ids_bytes;
    void *blas_ws; /* cuBLAS's workspace, fixed for the backend's life */
    /* Graphs: recording in progress, the first failure while recording (cap_err, or
     * cap_blas for a cuBLAS status) and what failed. */
    bool capturing, graph_warned;
    cudaError_t cap_err;
    int cap_blas;
    const char *cap_what;
    uint64_t gen; /* bumped when a buffer a recording may name moves (grow) */
    char name[96];
} cuda_kernels_t;

static cuda_kernels_t *ck_of(pd_kernels_t *k)
{
    return (cuda_kernels_t *)k;
}

/* While recording, the first failure belongs to the recording (graph_end drops it and
 * the ops run again eagerly, where a real failure shows as usual). */
static void capture_failed(cuda_kernels_t *c, cudaError_t err, int blas, const char *what)
{
    if (c->cap_err == cudaSuccess && !c->cap_blas) {
        c->cap_err = err;
        c->cap_blas = blas;
        c->cap_what = what;
    }
}

/* Records the first failure; true when err is a failure. */
static bool failed(cuda_kernels_t *c, cudaError_t err, const char *what)
{
    if (err == cudaSuccess)
        return false;
    if (c->capturing) {
        capture_failed(c, err, 0, what);
        return true;
    }
    if (!c->failed)
        PD_LOG_ERROR("cuda: %s failed: %s", what, cudaGetErrorString(err));
    c->failed = true;
    return true;
}

static bool blas_failed(cuda_kernels_t *c, cublasStatus_t st, const char *what)
{
    if (st == CUBLAS_STATUS_SUCCESS)
        return false;
    if (c->capturing) {
        capture_failed(c, cudaSuccess, (int)st, what);
        return true;
    }
    if (!c->failed)
        PD_LOG_ERROR("cublas: %s failed: status %d", what, (int)st);
    c->failed = true;
    return true;
}

static void select_dev(cuda_kernels_t *c)
{
    if (c->capturing) /* graph_begin selected it, on this thread (ThreadLocal capture) */
        return;
    failed(c, cudaSetDevice(c->device), "cudaSetDevice");
}

/* Grows a device scratch buffer to at least want bytes (rare: outside every hot
 * path once the largest shape has been seen). Moving a buffer that a recording may
 * name (recorded: the matmul and decode attention scratch) bumps the generation:
 * graphs recorded before name the old one. The plans and the argmax output never
 * reach a recording (plan_upload and argmax are refused or outside it), so their
 * growth leaves the graphs alone. Never while recording: the sync and the free cannot
 * be recorded, and the caller's first pass of each shape runs eagerly, so a recording
 * that needs more room than that pass left has gone wrong. */
static bool grow(cuda_kernels_t *c, void **p, size_t *have, size_t want, bool recorded,
                 const char *what)
{
    if (*have >= want)
        return true;
    if (c->capturing) {
        capture_failed(c, cudaErrorStreamCaptureUnsupported, 0, what);
        return false;
    }
    if (recorded)
        c->gen++;
    if (*p) {
        failed(c, cudaStreamSynchronize(c->s), "sync before growing scratch");
        cudaFree(*p);
        *p = NULL;
        *have = 0;
    }
    size_t n = want + want / 4;
    if (failed(c, cudaMalloc(p, n), what)) {
        *p = NULL;
        return false;
    }
    *have = n;
    return true;
}

/* ---- memory ---- */

static void *k_alloc(pd_kernels_t *k, size_t bytes)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        PD_LOG_ERROR("cuda: cannot allocate %zu bytes of device memory: %s", bytes,
                     cudaGetErrorString(err));
        return NULL;
    }
    return p;
}

static void k_free(pd_kernels_t *k, void *p)
{
    if (!p)
        return;
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    cudaStreamSynchronize(c->s); /* no op in flight may still read it */
    cudaFree(p);
}

static pd_status_t k_to_device(pd_kernels_t *k, void *dst, const void *src, size_t bytes)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (!bytes)
        return PD_OK;
    /* From pageable memory the copy has taken src by the time it returns; from pinned
     * memory it has not, so the caller's buffer is reusable only after a sync: the
     * callers here pass pageable buffers or sync before reuse (kvpool.c). */
    if (failed(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->s),
               "copy to the device"))
        return PD_ERR_IO;
    return PD_OK;
}

static pd_status_t k_to_host(pd_kernels_t *k, void *dst, const void *src, size_t bytes)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (bytes && failed(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->s),
                        "copy to the host"))
        return PD_ERR_IO;
    if (failed(c, cudaStreamSynchronize(c->s), "stream") || c->failed)
        return PD_ERR_IO;
    return PD_OK;
}

static pd_status_t k_dev_copy(pd_kernels_t *k, void *dst, const void *src, size_t bytes)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (bytes && failed(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->s),
                        "device copy"))
        return PD_ERR_IO;
    return PD_OK;
}

static pd_status_t k_pin(pd_kernels_t *k, void *p, size_t bytes)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
    if (err != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: the copies still work, only slower */
        PD_LOG_WARN("cuda: cannot pin %zu bytes of host memory (%s): copies will be "
                    "slower",
                    bytes, cudaGetErrorString(err));
        return PD_ERR_IO;
    }
    return PD_OK;
}

static void k_unpin(pd_kernels_t *k, void *p)
{
    select_dev(ck_of(k));
    if (cudaHostUnregister(p) != cudaSuccess)
        (void)cudaGetLastError();
}

/* F32 matrices become BF16 when asked, converted on the device in slices so the F32
 * copy never needs the whole tensor's room. */
static pd_status_t k_upload_tensor(pd_kernels_t *k, const pd_tensor_t *w,
                                   pd_tensor_t *dev)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    *dev = *w;
    dev->data = NULL;
    int64_t n = 1;
    for (int d = 0; d < w->n_dims; d++)
        n *= w->ne[d];
    bool convert = c->bf16 && w->dtype == PD_DTYPE_F32 && w->n_dims >= 2 && w->ne[1] > 1;
    size_t bytes = convert ? (size_t)n * 2 : w->nbytes;
    void *p = k_alloc(k, bytes);
    if (!p)
        return PD_ERR_NOMEM;
    if (!convert) {
        if (failed(c, cudaMemcpy(p, w->data, w->nbytes, cudaMemcpyHostToDevice),
                   "weight upload")) {
            cudaFree(p);
            return PD_ERR_IO;
        }
    } else {
        int64_t slice = (int64_t)1 << 24; /* 64 MiB of F32 at a time */
        float *tmp = (float *)k_alloc(k, (size_t)(n < slice ? n : slice) * sizeof(float));
        if (!tmp) {
            cudaFree(p);
            return PD_ERR_NOMEM;
        }
        const float *src = (const float *)w->data;
        for (int64_t i = 0; i < n && !c->failed; i += slice) {
            int64_t m = n - i < slice ? n - i : slice;
            if (!failed(c,
                        cudaMemcpy(tmp, src + i, (size_t)m * sizeof(float),
                                   cudaMemcpyHostToDevice),
                        "weight upload"))
                failed(c, pdc_f32_to_half(c->s, PD_DTYPE_BF16, tmp, (uint16_t *)p + i, m),
                       "bf16 conversion");
            failed(c, cudaStreamSynchronize(c->s), "bf16 conversion");
        }
        cudaFree(tmp);
        if (c->failed) {
            cudaFree(p);
            return PD_ERR_IO;
        }
        dev->dtype = PD_DTYPE_BF16;
    }
    dev->data = p;
    dev->nbytes = bytes;
    return PD_OK;
}

static pd_status_t k_sync(pd_kernels_t *k)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, cudaStreamSynchronize(c->s), "stream");
    return c->failed ? PD_ERR_IO : PD_OK;
}

/* ---- ops ---- */

static void k_matmul(pd_kernels_t *k, const pd_tensor_t *w, const float *x, int64_t T,
                     float *y)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    int64_t n_in = w->ne[0], n_out = w->ne[1];
    bool half = w->dtype == PD_DTYPE_F16 || w->dtype == PD_DTYPE_BF16;
    if (!half || T <= 8) {
        failed(c, pdc_matvec(c->s, w->dtype, w->data, n_in, n_out, x, T, y), "matvec");
        return;
    }
    size_t need = (size_t)T * (size_t)n_in * 2;
    if (!grow(c, &c->half_x, &c->half_x_bytes, need, true, "activation scratch"))
        return;
    if (failed(c, pdc_f32_to_half(c->s, w->dtype, x, c->half_x, T * n_in), "convert x"))
        return;
    cudaDataType_t dt = w->dtype == PD_DTYPE_F16 ? CUDA_R_16F : CUDA_R_16BF;
    const float one = 1.0f, zero = 0.0f;
    /* row-major y[T][n_out] = x[T][n_in] W^T is, column-major, Y (n_out x T) =
     * W' (n_in x n_out)^T X' (n_in x T) */
    blas_failed(c,
                blas_api.gemm_ex(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)T,
                                 (int)n_in, &one, w->data, dt, (int)n_in, c->half_x, dt,
                                 (int)n_in, &zero, y, CUDA_R_32F, (int)n_out,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "gemm");
}

/* Matvec sizes (decode): one launch over every matrix's rows (pdc_matvec_multi gives
 * each the bits pdc_matvec would), so the Q/K/V projections and the gate/up pair are
 * two launches a layer instead of five, and the small K/V rows share the grid with Q
 * instead of leaving most SMs idle. GEMM sizes: one cuBLAS call each, as k_matmul. */
static void k_matmul_multi(pd_kernels_t *k, const pd_tensor_t *const *ws,
                           float *const *ys, int n, const float *x, int64_t T)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (n < 1)
        return;
    bool half = ws[0]->dtype == PD_DTYPE_F16 || ws[0]->dtype == PD_DTYPE_BF16;
    if (n > PDC_MV_MULTI_MAX || (half && T > 8)) {
        for (int m = 0; m < n; m++)
            k_matmul(k, ws[m], x, T, ys[m]);
        return;
    }
    const void *w[PDC_MV_MULTI_MAX];
    int64_t n_out[PDC_MV_MULTI_MAX];
    for (int m = 0; m < n; m++) {
        w[m] = ws[m]->data;
        n_out[m] = ws[m]->ne[1];
    }
    failed(c, pdc_matvec_multi(c->s, ws[0]->dtype, w, n_out, ys, n, ws[0]->ne[0], x, T),
           "matvec");
}

static void k_get_rows(pd_kernels_t *k, const pd_tensor_t *w, const int32_t *ids,
                       int64_t n, float *out)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_get_rows(c->s, w->dtype, w->data, w->ne[0], ids, n, out), "get_rows");
}

static void k_rmsnorm(pd_kernels_t *k, float *out, const float *x, const float *weight,
                      int64_t T, int64_t n, float eps)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_rmsnorm(c->s, out, x, weight, T, n, eps), "rmsnorm");
}

static void k_rope(pd_kernels_t *k, float *x, const int32_t *pos, int64_t T, int n_heads,
                   int head_dim, float theta)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_rope(c->s, x, pos, T, n_heads, head_dim, theta), "rope");
}

static void k_softmax(pd_kernels_t *k, float *x, int64_t T, int64_t n)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_softmax(c->s, x, T, n), "softmax");
}

static void k_silu_mul(pd_kernels_t *k, float *gate, const float *up, int64_t n)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_silu_mul(c->s, gate, up, n), "silu_mul");
}

static void k_add(pd_kernels_t *k, float *y, const float *x, int64_t n)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_add(c->s, y, x, n), "add");
}

static void k_kv_write(pd_kernels_t *k, void *cache, pd_dtype_t kv_dtype,
                       int64_t row_elems, const int32_t *slots, int64_t T,
                       const float *src)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    failed(c, pdc_kv_write(c->s, cache, kv_dtype, row_elems, slots, T, src), "kv_write");
}

/* Prompt runs of at least this many consecutive positions go to the tiled prefill
 * kernel; every other query to the split-context decode kernel. */
#define PREFILL_RUN_MIN 16

/* The attention plan of a batch of T queries (host copies of pos and seq): its prompt
 * runs into runs[3 * r..] (t0, n, 0) and its other queries into q_idx[], each unless
 * NULL (then only counted); max_ctx: the longest context of the listed queries. */
typedef struct attn_plan {
    int64_t n_q, n_runs, max_run, max_ctx;
} attn_plan_t;

static attn_plan_t attn_scan(int64_t T, const int32_t *pos, const int32_t *seq,
                             int32_t *q_idx, int32_t *runs)
{
    attn_plan_t p = {0, 0, 0, 0};
    for (int64_t t = 0; t < T;) {
        int64_t e = t + 1;
        while (e < T && seq[e] == seq[t] && (int64_t)pos[e] == (int64_t)pos[e - 1] + 1)
            e++;
        if (e - t >= PREFILL_RUN_MIN) {
            if (runs) {
                runs[3 * p.n_runs] = (int32_t)t;
                runs[3 * p.n_runs + 1] = (int32_t)(e - t);
                runs[3 * p.n_runs + 2] = 0;
            }
            p.n_runs++;
            p.max_run = e - t > p.max_run ? e - t : p.max_run;
        } else {
            for (int64_t i = t; i < e; i++) {
                if (q_idx)
                    q_idx[p.n_q] = (int32_t)i;
                p.n_q++;
                if ((int64_t)pos[i] + 1 > p.max_ctx)
                    p.max_ctx = (int64_t)pos[i] + 1;
            }
        }
        t = e;
    }
    return p;
}

/* Host room for a plan of elems int32 (the one being built, and a copy of the one on
 * the device). */
static bool plan_host_room(cuda_kernels_t *c, size_t elems)
{
    if (c->meta_host_elems >= elems)
        return true;
    size_t n = elems + elems / 4;
    int32_t *p = (int32_t *)realloc(c->meta_host, n * sizeof *p);
    int32_t *q = p ? (int32_t *)realloc(c->plan_prev, n * sizeof *q) : NULL;
    if (p)
        c->meta_host = p;
    if (q)
        c->plan_prev = q;
    if (!p || !q) {
        failed(c, cudaErrorMemoryAllocation, "attention plan (host memory)");
        return false;
    }
    c->meta_host_elems = n;
    c->plan_elems = 0; /* nothing cached */
    return true;
}

/* Puts the plan in meta_host[0..elems) on the device (c->meta), unless it is there
 * already: every layer of a forward pass has the same plan, so it goes up once per
 * pass, asynchronously from a pinned copy that is rewritten only once the previous
 * upload from it has finished (its event; long done by then). Never while recording:
 * a recorded copy would replay this pass's plan (graph_attn_key keeps such passes
 * out). */
static bool plan_upload(cuda_kernels_t *c, size_t elems)
{
    if (c->capturing) {
        capture_failed(c, cudaErrorStreamCaptureUnsupported, 0, "attention plan upload");
        return false;
    }
    size_t have = c->meta_elems * sizeof(int32_t);
    int32_t *before = c->meta;
    if (!grow(c, (void **)&c->meta, &have, elems * sizeof(int32_t), false,
              "attention plans")) {
        c->meta_elems = 0;
        c->plan_elems = 0;
        return false;
    }
    if (c->meta != before)
        c->plan_elems = 0; /* a new buffer holds no plan */
    c->meta_elems = have / sizeof(int32_t);
    if (c->plan_elems == elems &&
        !memcmp(c->plan_prev, c->meta_host, elems * sizeof(int32_t)))
        return true;
    c->plan_elems = 0;
    if (c->plan_ev_set && failed(c, cudaEventSynchronize(c->plan_ev), "plan event"))
        return false;
    if (c->plan_pin_elems < elems) {
        cudaFreeHost(c->plan_pin);
        c->plan_pin = NULL;
        c->plan_pin_elems = 0;
        if (failed(c, cudaMallocHost((void **)&c->plan_pin, 2 * elems * sizeof(int32_t)),
                   "pinned plan buffer"))
            return false;
        c->plan_pin_elems = 2 * elems;
    }
    memcpy(c->plan_pin, c->meta_host, elems * sizeof(int32_t));
    if (failed(c,
               cudaMemcpyAsync(c->meta, c->plan_pin, elems * sizeof(int32_t),
                               cudaMemcpyHostToDevice, c->s),
               "attention plan upload") ||
        failed(c, cudaEventRecord(c->plan_ev, c->s), "plan event"))
        return false;
    c->plan_ev_set = true;
    memcpy(c->plan_prev, c->meta_host, elems * sizeof(int32_t));
    c->plan_elems = elems;
    return true;
}

static void k_attention(pd_kernels_t *k, const pd_attn_args_t *a)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (!a->pos_host || !a->seq_host) {
        /* through failed(): while recording, the recording fails (a graph without
         * this pass's attention must never be built), otherwise the backend does */
        failed(c, cudaErrorInvalidValue, "attention (no host copies of pos and seq)");
        return;
    }
    int64_t T = a->T;
    if (T <= 0)
        return;
    /* meta_host: [0, T) decode query list, then [T, 4T) runs (t0, n, 0) */
    if (!plan_host_room(c, (size_t)T * 4))
        return;
    int32_t *q_idx = c->meta_host, *runs = c->meta_host + T;
    memset(c->meta_host, 0, (size_t)T * 4 * sizeof(int32_t));
    attn_plan_t p = attn_scan(T, a->pos_host, a->seq_host, q_idx, runs);
    /* Without prompt runs every query decodes, in batch order, and the kernels need no
     * list (q_idx NULL: the same indices, the same bits): a decode pass then copies
     * nothing from the host, and only its shapes and the split count reach the
     * launches (graph_attn_key). */
    const int32_t *d_q_idx = NULL;
    if (p.n_runs) {
        if (!plan_upload(c, (size_t)T * 4))
            return;
        failed(c, pdc_attn_prefill(c->s, a, c->meta + T, p.n_runs, p.max_run),
               "prefill attention");
        d_q_idx = c->meta;
    }
    if (p.n_q) {
        size_t need =
            (size_t)pdc_attn_decode_scratch(a, p.n_q, p.max_ctx) * sizeof(float);
        size_t have = c->attn_floats * sizeof(float);
        bool ok = grow(c, (void **)&c->attn, &have, need, true, "attention scratch");
        c->attn_floats = have / sizeof(float); /* 0 when a failed grow freed it */
        if (!ok)
            return;
        failed(c, pdc_attn_decode(c->s, a, d_q_idx, p.n_q, p.max_ctx, c->attn),
               "decode attention");
    }
}

static pd_status_t k_argmax(pd_kernels_t *k, const float *logits, int64_t rows,
                            int64_t vocab, int32_t *ids_host)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (rows <= 0)
        return PD_OK;
    if (!grow(c, (void **)&c->ids, &c->ids_bytes, (size_t)rows * sizeof(int32_t), false,
              "argmax output"))
        return PD_ERR_NOMEM;
    if (failed(c, pdc_argmax(c->s, logits, rows, vocab, c->ids), "argmax"))
        return PD_ERR_IO;
    return k_to_host(k, ids_host, c->ids, (size_t)rows * sizeof(int32_t));
}

/* ---- graphs ---- */

/* The split count of the decode kernel (attention.cu's decode_splits) is all that a
 * decode-only batch's host data gives its launches; prompt runs carry a plan. */
static uint64_t k_graph_attn_key(pd_kernels_t *k, int64_t T, const int32_t *pos_host,
                                 const int32_t *seq_host)
{
    (void)k;
    if (T < 1 || !pos_host || !seq_host)
        return 0;
    attn_plan_t p = attn_scan(T, pos_host, seq_host, NULL, NULL);
    if (p.n_runs || p.n_q != T || p.max_ctx < 1)
        return 0;
    return (uint64_t)((p.max_ctx + PDC_ATTN_SPLIT - 1) / PDC_ATTN_SPLIT);
}

static uint64_t k_graph_generation(pd_kernels_t *k)
{
    return ck_of(k)->gen;
}

/* A failed recording or launch: the pass runs eagerly, so one warning is enough. */
static void graph_warn(cuda_kernels_t *c, const char *what, const char *why)
{
    if (!c->graph_warned)
        PD_LOG_WARN("cuda graph: %s failed (%s); such passes run op by op", what, why);
    else
        PD_LOG_DEBUG("cuda graph: %s failed (%s)", what, why);
    c->graph_warned = true;
}

static pd_status_t k_graph_begin(pd_kernels_t *k)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (c->capturing || c->failed)
        return PD_ERR_INVALID; /* a failed backend runs eagerly and reports it there */
    /* An error left by an earlier call would show up inside the recording: leave it to
     * the eager ops, whose first launch reports it as usual. */
    cudaError_t err = cudaPeekAtLastError();
    if (err != cudaSuccess)
        return PD_ERR_IO;
    err = cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        graph_warn(c, "cudaStreamBeginCapture", cudaGetErrorString(err));
        return PD_ERR_IO;
    }
    c->capturing = true;
    c->cap_err = cudaSuccess;
    c->cap_blas = 0;
    c->cap_what = NULL;
    return PD_OK;
}

static pd_status_t k_graph_end(pd_kernels_t *k, void **graph_p)
{
    cuda_kernels_t *c = ck_of(k);
    *graph_p = NULL;
    if (!c->capturing)
        return PD_ERR_INVALID;
    c->capturing = false;
    /* Ends the capture whatever happened inside it (an invalidated capture ends with a
     * NULL graph); only then is the stream usable again. */
    cudaGraph_t g = NULL;
    cudaError_t err = cudaStreamEndCapture(c->s, &g);
    const char *what = "cudaStreamEndCapture";
    char why[96];
    snprintf(why, sizeof why, "%s", cudaGetErrorString(err));
    /* The stream must have left capture mode, or nothing can run on it any more. */
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(c->s, &cs) != cudaSuccess ||
        cs != cudaStreamCaptureStatusNone) {
        if (!c->failed)
            PD_LOG_ERROR("cuda graph: the stream is still capturing after "
                         "cudaStreamEndCapture (%s)",
                         why);
        c->failed = true;
        if (err == cudaSuccess)
            err = cudaErrorStreamCaptureInvalidated;
    }
    if (c->cap_err != cudaSuccess || c->cap_blas) {
        what = c->cap_what ? c->cap_what : "an op";
        if (c->cap_blas)
            snprintf(why, sizeof why, "cuBLAS status %d", c->cap_blas);
        else
            snprintf(why, sizeof why, "%s", cudaGetErrorString(c->cap_err));
        err = c->cap_err != cudaSuccess ? c->cap_err : cudaErrorUnknown;
    } else if (err == cudaSuccess && !g) {
        err = cudaErrorStreamCaptureInvalidated;
        snprintf(why, sizeof why, "no graph");
    }
    cudaGraphExec_t x = NULL;
    if (err == cudaSuccess) {
        err = cudaGraphInstantiate(&x, g, 0);
        if (err != cudaSuccess) {
            x = NULL;
            what = "cudaGraphInstantiate";
            snprintf(why, sizeof why, "%s", cudaGetErrorString(err));
        }
    }
    if (g)
        cudaGraphDestroy(g); /* the executable graph keeps what it needs */
    if (err != cudaSuccess) {
        /* Capture errors are not sticky: clear the one a failed call left, so that the
         * eager rerun does not report it as its own. */
        (void)cudaGetLastError();
        graph_warn(c, what, why);
        return PD_ERR_IO;
    }
    *graph_p = (void *)x;
    return PD_OK;
}

static pd_status_t k_graph_launch(pd_kernels_t *k, void *graph)
{
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    if (!graph || c->capturing)
        return PD_ERR_INVALID;
    cudaError_t err = cudaGraphLaunch((cudaGraphExec_t)graph, c->s);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        graph_warn(c, "cudaGraphLaunch", cudaGetErrorString(err));
        return PD_ERR_IO;
    }
    return PD_OK;
}

static void k_graph_destroy(pd_kernels_t *k, void *graph)
{
    if (!graph)
        return;
    cuda_kernels_t *c = ck_of(k);
    select_dev(c);
    cudaStreamSynchronize(c->s); /* no launch of it may still be in flight */
    cudaGraphExecDestroy((cudaGraphExec_t)graph);
}

static void k_destroy(pd_kernels_t *k)
{
    cuda_kernels_t *c = ck_of(k);
    cudaSetDevice(c->device);
    if (c->capturing) { /* not through the llm; never leave the stream capturing */
        cudaGraph_t g = NULL;
        if (cudaStreamEndCapture(c->s, &g) == cudaSuccess && g)
            cudaGraphDestroy(g);
        (void)cudaGetLastError();
        c->capturing = false;
    }
    cudaStreamSynchronize(c->s);
    cudaFree(c->half_x);
    cudaFree(c->attn);
    cudaFree(c->meta);
    cudaFree(c->ids);
    cudaFreeHost(c->plan_pin);
    if (c->plan_ev)
        cudaEventDestroy(c->plan_ev);
    free(c->meta_host);
    free(c->plan_prev);
    if (c->blas)
        blas_api.destroy(c->blas);
    cudaFree(c->blas_ws); /* after the handle that uses it */
    if (c->s)
        cudaStreamDestroy(c->s);
    free(c);
}

/* cuBLAS's workspace, fixed for the backend's life and set after its stream
 * (cublasSetStream resets it): without one, a recorded GEMM would name a workspace
 * cuBLAS allocated for that capture. The size cuBLAS's documentation recommends: 32
 * MiB from Hopper on, 4 MiB before. False (logged): no graphs, nothing else changes. */
static bool blas_workspace(cuda_kernels_t *c, const cudaDeviceProp *prop)
{
    if (!blas_api.set_workspace) {
        PD_LOG_INFO("cuda: this cuBLAS has no cublasSetWorkspace: no CUDA graphs");
        return false;
    }
    size_t bytes = (size_t)(prop->major >= 9 ? 32 : 4) << 20;
    cudaError_t err = cudaMalloc(&c->blas_ws, bytes);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        c->blas_ws = NULL;
        PD_LOG_WARN("cuda: no memory for cuBLAS's workspace (%s): no CUDA graphs",
                    cudaGetErrorString(err));
        return false;
    }
    cublasStatus_t st = blas_api.set_workspace(c->blas, c->blas_ws, bytes);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cudaFree(c->blas_ws);
        c->blas_ws = NULL;
        PD_LOG_WARN("cuda: cublasSetWorkspace failed (status %d): no CUDA graphs",
                    (int)st);
        return false;
    }
    return true;
}

extern "C" pd_status_t pd_kernels_cuda_new(int device, bool bf16_weights,
                                           pd_kernels_t **k_p)
{
    if (!k_p)
        return PD_ERR_INVALID;
    *k_p = NULL;
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0) {
        PD_LOG_ERROR("--device cuda: no usable NVIDIA GPU on this machine (%s); use "
                     "--device cpu",
                     err != cudaSuccess ? cudaGetErrorString(err) : "no devices");
        (void)cudaGetLastError();
        return PD_ERR_UNSUPPORTED;
    }
    if (device < 0 || device >= n) {
        PD_LOG_ERROR("--device cuda:%d: this machine has %d GPU%s (cuda:0..cuda:%d)",
                     device, n, n == 1 ? "" : "s", n - 1);
        return PD_ERR_UNSUPPORTED;
    }
    pthread_once(&blas_once, blas_open);
    if (!blas_api.ok) {
        PD_LOG_ERROR("--device cuda: cannot load cuBLAS (%s): %s", PD_CUBLAS_SONAME,
                     blas_api.why);
        return PD_ERR_UNSUPPORTED;
    }
    cuda_kernels_t *c = (cuda_kernels_t *)calloc(1, sizeof *c);
    if (!c)
        return PD_ERR_NOMEM;
    c->device = device;
    c->bf16 = bf16_weights;
    cudaDeviceProp prop;
    if (failed(c, cudaSetDevice(device), "cudaSetDevice") ||
        failed(c, cudaGetDeviceProperties(&prop, device), "device properties") ||
        failed(c, cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking), "stream") ||
        failed(c, cudaEventCreateWithFlags(&c->plan_ev, cudaEventDisableTiming),
               "event") ||
        blas_failed(c, blas_api.create(&c->blas), "cublasCreate") ||
        blas_failed(c, blas_api.set_stream(c->blas, c->s), "cublasSetStream")) {
        k_destroy(&c->k);
        return PD_ERR_UNSUPPORTED;
    }
    /* F32 products never go to cuBLAS (see the file comment); the half ones accumulate
     * in F32 (CUBLAS_COMPUTE_32F) whatever the math mode. */
    blas_api.set_math_mode(c->blas, CUBLAS_DEFAULT_MATH);
    bool graphs = blas_workspace(c, &prop);
    snprintf(c->name, sizeof c->name, "cuda");
    pd_kernels_t *k = &c->k;
    k->name = c->name;
    k->n_threads = 1;
    k->matmul = k_matmul;
    k->matmul_multi = k_matmul_multi;
    k->get_rows = k_get_rows;
    k->rmsnorm = k_rmsnorm;
    k->rope = k_rope;
    k->softmax = k_softmax;
    k->silu_mul = k_silu_mul;
    k->add = k_add;
    k->kv_write = k_kv_write;
    k->attention = k_attention;
    k->device = true;
    k->alloc = k_alloc;
    k->free = k_free;
    k->to_device = k_to_device;
    k->to_host = k_to_host;
    k->dev_copy = k_dev_copy;
    k->pin = k_pin;
    k->unpin = k_unpin;
    k->upload_tensor = k_upload_tensor;
    k->argmax = k_argmax;
    k->sync = k_sync;
    if (graphs) {
        k->graph_attn_key = k_graph_attn_key;
        k->graph_generation = k_graph_generation;
        k->graph_begin = k_graph_begin;
        k->graph_end = k_graph_end;
        k->graph_launch = k_graph_launch;
        k->graph_destroy = k_graph_destroy;
    }
    k->destroy = k_destroy;
    PD_LOG_INFO("kernels: cuda backend, GPU %d: %s (sm_%d%d, %d SMs, %.1f GiB)%s", device,
                prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                (double)prop.totalGlobalMem / (1 << 30),
                bf16_weights ? ", F32 weights as BF16" : "");
    *k_p = k;
    return PD_OK;
}
