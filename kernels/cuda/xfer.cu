/* xfer.cu - kernels/devxfer.h on CUDA: IPC export and mapping of device KV pools,
 * copies on a stream of their own, and the PD-SUM64 checksum kernel.
 * Every entry point sets the GPU first (cudaSetDevice is per thread, and the worker's
 * I/O thread never ran the engine's setup). Errors are logged with CUDA's reason and
 * returned as PD_ERR_IO; nothing here exits. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/devxfer.h"
#include "kernels/sum64.h"

struct pd_devxfer {
    int device;
    cudaStream_t s;
    int32_t *d_blocks; /* the block table for the checksum kernel */
    size_t cap_blocks;
    unsigned long long *d_sum;
};

/* Mappings of other processes' handles, counted: CUDA maps a handle once per
 * process, so two peers naming the same pool (a worker that registered again) share
 * one mapping. */
typedef struct mapping {
    struct mapping *next;
    uint8_t handle[PD_IPC_HANDLE_BYTES];
    void *base;
    int refs, device;
} mapping_t;

static pthread_mutex_t map_mu = PTHREAD_MUTEX_INITIALIZER;
static mapping_t *maps;

struct sum_params;
__global__ void kv_sum64(sum_params p); /* below: loaded at pd_devxfer_new */

/* Logs a failed call and takes its error off the thread's last-error slot (a sticky
 * error stays: every later call reports it), so that it does not come back as the
 * status of a later, unrelated launch. */
static bool failed(cudaError_t err, const char *what)
{
    if (err == cudaSuccess)
        return false;
    PD_LOG_ERROR("cuda transfer: %s: %s", what, cudaGetErrorString(err));
    (void)cudaGetLastError();
    return true;
}

extern "C" pd_status_t pd_devxfer_new(int device, pd_devxfer_t **x_p)
{
    if (!x_p || device < 0)
        return PD_ERR_INVALID;
    *x_p = NULL;
    pd_devxfer_t *x = (pd_devxfer_t *)calloc(1, sizeof *x);
    if (!x)
        return PD_ERR_NOMEM;
    x->device = device;
    /* Everything the first checksum would otherwise do on the fly (allocate its block
     * table, load the kernel's module lazily) happens here, at start-up, not during a
     * transfer that may overlap another thread's graph capture. */
    struct cudaFuncAttributes fa;
    if (failed(cudaSetDevice(device), "cudaSetDevice") ||
        failed(cudaStreamCreateWithFlags(&x->s, cudaStreamNonBlocking), "stream") ||
        failed(cudaMalloc((void **)&x->d_sum, sizeof *x->d_sum), "checksum buffer") ||
        failed(cudaMalloc((void **)&x->d_blocks, 256 * sizeof(int32_t)),
               "checksum block table") ||
        failed(cudaFuncGetAttributes(&fa, kv_sum64), "checksum kernel")) {
        cudaFree(x->d_blocks);
        cudaFree(x->d_sum);
        if (x->s)
            cudaStreamDestroy(x->s);
        free(x);
        return PD_ERR_IO;
    }
    x->cap_blocks = 256;
    *x_p = x;
    return PD_OK;
}

extern "C" void pd_devxfer_destroy(pd_devxfer_t **x_p)
{
    if (!x_p || !*x_p)
        return;
    pd_devxfer_t *x = *x_p;
    cudaSetDevice(x->device);
    cudaStreamSynchronize(x->s);
    cudaFree(x->d_blocks);
    cudaFree(x->d_sum);
    cudaStreamDestroy(x->s);
    free(x);
    *x_p = NULL;
}

extern "C" pd_status_t pd_devxfer_export(pd_devxfer_t *x, void *base,
                                         uint8_t handle[PD_IPC_HANDLE_BYTES])
{
    if (!x || !base || !handle)
        return PD_ERR_INVALID;
    static_assert(sizeof(cudaIpcMemHandle_t) == PD_IPC_HANDLE_BYTES, "IPC handle size");
    cudaIpcMemHandle_t h;
    if (failed(cudaSetDevice(x->device), "cudaSetDevice") ||
        failed(cudaIpcGetMemHandle(&h, base), "cudaIpcGetMemHandle"))
        return PD_ERR_IO;
    memcpy(handle, &h, PD_IPC_HANDLE_BYTES);
    return PD_OK;
}

extern "C" pd_status_t
pd_devxfer_open(pd_devxfer_t *x, const uint8_t handle[PD_IPC_HANDLE_BYTES], void **remote)
{
    if (!x || !handle || !remote)
        return PD_ERR_INVALID;
    *remote = NULL;
    pthread_mutex_lock(&map_mu);
    for (mapping_t *m = maps; m; m = m->next)
        if (m->device == x->device && !memcmp(m->handle, handle, PD_IPC_HANDLE_BYTES)) {
            m->refs++;
            *remote = m->base;
            pthread_mutex_unlock(&map_mu);
            return PD_OK;
        }
    mapping_t *m = (mapping_t *)calloc(1, sizeof *m);
    if (!m) {
        pthread_mutex_unlock(&map_mu);
        return PD_ERR_NOMEM;
    }
    cudaIpcMemHandle_t h;
    memcpy(&h, handle, PD_IPC_HANDLE_BYTES);
    if (failed(cudaSetDevice(x->device), "cudaSetDevice") ||
        failed(
            cudaIpcOpenMemHandle(&m->base, h, cudaIpcMemLazyEnablePeerAccess),
            "cudaIpcOpenMemHandle (the prefill worker must be on this node, alive, and "
            "another process)")) {
        cudaGetLastError(); /* not sticky: clear it so the engine does not see it */
        free(m);
        pthread_mutex_unlock(&map_mu);
        return PD_ERR_IO;
    }
    memcpy(m->handle, handle, PD_IPC_HANDLE_BYTES);
    m->refs = 1;
    m->device = x->device;
    m->next = maps;
    maps = m;
    *remote = m->base;
    pthread_mutex_unlock(&map_mu);
    return PD_OK;
}

extern "C" void pd_devxfer_close(pd_devxfer_t *x, void *remote)
{
    if (!x || !remote)
        return;
    pthread_mutex_lock(&map_mu);
    for (mapping_t **p = &maps; *p; p = &(*p)->next) {
        mapping_t *m = *p;
        if (m->base != remote || m->device != x->device)
            continue;
        if (--m->refs == 0) {
            cudaSetDevice(x->device);
            cudaStreamSynchronize(x->s); /* no copy of ours still reads it */
            failed(cudaIpcCloseMemHandle(m->base), "cudaIpcCloseMemHandle");
            *p = m->next;
            free(m);
        }
        break;
    }
    pthread_mutex_unlock(&map_mu);
}

extern "C" pd_status_t pd_devxfer_copy(pd_devxfer_t *x, void *dst, const void *src,
                                       size_t len)
{
    if (!x || !dst || !src || !len)
        return PD_ERR_INVALID;
    if (failed(cudaSetDevice(x->device), "cudaSetDevice") ||
        failed(cudaMemcpyAsync(dst, src, len, cudaMemcpyDefault, x->s), "copy"))
        return PD_ERR_IO;
    return PD_OK;
}

extern "C" pd_status_t pd_devxfer_wait(pd_devxfer_t *x)
{
    if (!x)
        return PD_ERR_INVALID;
    if (failed(cudaSetDevice(x->device), "cudaSetDevice") ||
        failed(cudaStreamSynchronize(x->s), "stream"))
        return PD_ERR_IO;
    return PD_OK;
}

/* ---- PD-SUM64 ---- */

#define SUM_THREADS 256

struct sum_params {
    const uint8_t *base[2]; /* K, V layer 0 */
    const int32_t *blocks;
    size_t layer_bytes, row_bytes;
    int32_t block_size, n_tokens;
    unsigned long long *out;
};

/* One CUDA block per (sequence block, layer, K or V): the rows of that block are
 * contiguous, word j of position p of layer l (K: kv 0, V: kv 1) has index
 * ((l * 2 + kv) * n_tokens + p) * row_words + j. Each thread sums its words' mixes,
 * the block folds the partial sums and adds one total to *out (order does not matter:
 * addition modulo 2^64). */
__global__ void __launch_bounds__(SUM_THREADS) kv_sum64(sum_params p)
{
    __shared__ unsigned long long part[SUM_THREADS / 32];
    const int64_t b = blockIdx.x, l = blockIdx.y, kv = blockIdx.z;
    const int64_t row_words = (int64_t)(p.row_bytes / 4);
    const int64_t p0 = b * p.block_size;
    int64_t rows = p.n_tokens - p0;
    if (rows > p.block_size)
        rows = p.block_size;
    const uint32_t *src =
        (const uint32_t *)(p.base[kv] + (size_t)l * p.layer_bytes +
                           (size_t)p.blocks[b] * (size_t)p.block_size * p.row_bytes);
    const uint64_t first = (uint64_t)(((l * 2 + kv) * p.n_tokens + p0) * row_words);
    const int64_t n = rows * row_words;
    unsigned long long acc = 0;
    for (int64_t i = threadIdx.x; i < n; i += SUM_THREADS)
        acc += pd_sum64_mix(src[i], first + (uint64_t)i);
    for (int off = 16; off > 0; off >>= 1)
        acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long t = 0;
        for (int w = 0; w < SUM_THREADS / 32; w++)
            t += part[w];
        atomicAdd(p.out, t);
    }
}

extern "C" pd_status_t pd_devxfer_kv_sum64(pd_devxfer_t *x, const void *k_base,
                                           const void *v_base, size_t layer_bytes,
                                           int32_t n_layers, int32_t block_size,
                                           size_t row_bytes, const int32_t *blocks,
                                           int32_t n_tokens, uint64_t *sum)
{
    if (!x || !k_base || !v_base || !sum || n_layers < 1 || n_layers > 65535 ||
        block_size < 1 || row_bytes == 0 || row_bytes % 4 || n_tokens < 0 ||
        (n_tokens > 0 && !blocks))
        return PD_ERR_INVALID;
    *sum = 0;
    if (n_tokens == 0)
        return PD_OK;
    size_t nb = ((size_t)n_tokens + (size_t)block_size - 1) / (size_t)block_size;
    if (failed(cudaSetDevice(x->device), "cudaSetDevice"))
        return PD_ERR_IO;
    if (nb > x->cap_blocks) {
        if (failed(cudaStreamSynchronize(x->s), "stream"))
            return PD_ERR_IO;
        cudaFree(x->d_blocks);
        x->d_blocks = NULL;
        x->cap_blocks = 0;
        size_t cap = nb < 256 ? 256 : nb + nb / 2;
        if (failed(cudaMalloc((void **)&x->d_blocks, cap * sizeof(int32_t)),
                   "checksum block table"))
            return PD_ERR_IO;
        x->cap_blocks = cap;
    }
    sum_params p;
    p.base[0] = (const uint8_t *)k_base;
    p.base[1] = (const uint8_t *)v_base;
    p.blocks = x->d_blocks;
    p.layer_bytes = layer_bytes;
    p.row_bytes = row_bytes;
    p.block_size = block_size;
    p.n_tokens = n_tokens;
    p.out = x->d_sum;
    unsigned long long h = 0;
    if (failed(cudaMemcpyAsync(x->d_blocks, blocks, nb * sizeof(int32_t),
                               cudaMemcpyHostToDevice, x->s),
               "checksum block table") ||
        failed(cudaMemsetAsync(x->d_sum, 0, sizeof *x->d_sum, x->s), "checksum"))
        return PD_ERR_IO;
    dim3 grid((unsigned)nb, (unsigned)n_layers, 2);
    (void)cudaGetLastError(); /* what the launch reports is its own error alone */
    kv_sum64<<<grid, SUM_THREADS, 0, x->s>>>(p);
    if (failed(cudaGetLastError(), "checksum kernel") ||
        failed(cudaMemcpyAsync(&h, x->d_sum, sizeof h, cudaMemcpyDeviceToHost, x->s),
               "checksum") ||
        failed(cudaStreamSynchronize(x->s), "checksum"))
        return PD_ERR_IO;
    *sum = (uint64_t)h;
    return PD_OK;
}
