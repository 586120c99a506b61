/* device.c - picks a backend from a --device string, and stands in for the CUDA
 * backend in builds without one (no nvcc at configure time, or -DPD_CUDA=OFF), so
 * every tool takes --device and a CPU-only build says why it cannot serve "cuda"
 * (and why it has no device KV transport: kernels/devxfer.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kernels/devxfer.h"
#include "kernels/ops.h"

#ifndef PD_HAVE_CUDA
pd_status_t pd_kernels_cuda_new(int device, bool bf16_weights, pd_kernels_t **k_p)
{
    (void)device;
    (void)bf16_weights;
    if (k_p)
        *k_p = NULL;
    PD_LOG_ERROR("this build of pdserve has no CUDA backend (nvcc was not found when it "
                 "was configured, or -DPD_CUDA=OFF): use --device cpu, or rebuild on a "
                 "machine with the CUDA toolkit");
    return PD_ERR_UNSUPPORTED;
}

bool pd_kernels_have_cuda(void)
{
    return false;
}

/* kernels/devxfer.h without CUDA: the device transports need a CUDA build */
static pd_status_t no_devxfer(void)
{
    PD_LOG_ERROR("this build of pdserve has no CUDA backend: the cuda-ipc KV transport "
                 "needs one");
    return PD_ERR_UNSUPPORTED;
}

pd_status_t pd_devxfer_new(int device, pd_devxfer_t **x_p)
{
    (void)device;
    if (x_p)
        *x_p = NULL;
    return no_devxfer();
}

void pd_devxfer_destroy(pd_devxfer_t **x_p)
{
    if (x_p)
        *x_p = NULL;
}

pd_status_t pd_devxfer_export(pd_devxfer_t *x, void *base,
                              uint8_t handle[PD_IPC_HANDLE_BYTES])
{
    (void)x;
    (void)base;
    (void)handle;
    return no_devxfer();
}

pd_status_t pd_devxfer_open(pd_devxfer_t *x, const uint8_t handle[PD_IPC_HANDLE_BYTES],
                            void **remote)
{
    (void)x;
    (void)handle;
    if (remote)
        *remote = NULL;
    return no_devxfer();
}

void pd_devxfer_close(pd_devxfer_t *x, void *remote)
{
    (void)x;
    (void)remote;
}

pd_status_t pd_devxfer_copy(pd_devxfer_t *x, void *dst, const void *src, size_t len)
{
    (void)x;
    (void)dst;
    (void)src;
    (void)len;
    return no_devxfer();
}

pd_status_t pd_devxfer_wait(pd_devxfer_t *x)
{
    (void)x;
    return no_devxfer();
}

pd_status_t pd_devxfer_kv_sum64(pd_devxfer_t *x, const void *k_base, const void *v_base,
                                size_t layer_bytes, int32_t n_layers, int32_t block_size,
                                size_t row_bytes, const int32_t *blocks, int32_t n_tokens,
                                uint64_t *sum)
{
    (void)x;
    (void)k_base;
    (void)v_base;
    (void)layer_bytes;
    (void)n_layers;
    (void)block_size;
    (void)row_bytes;
    (void)blocks;
    (void)n_tokens;
    if (sum)
        *sum = 0;
    return no_devxfer();
}
#else
bool pd_kernels_have_cuda(void)
{
    return true;
}
#endif

int pd_device_index(const char *device)
{
    if (!device || strncmp(device, "cuda", 4) || (device[4] != 0 && device[4] != ':'))
        return -1;
    if (device[4] == 0)
        return 0;
    char *end = NULL;
    errno = 0;
    long n = strtol(device + 5, &end, 10);
    if (errno || end == device + 5 || *end || n < 0 || n > 1023)
        return -1;
    return (int)n;
}

pd_status_t pd_kernels_new_device(const char *device, int n_threads, const char *isa,
                                  bool bf16_weights, pd_kernels_t **k_p)
{
    if (!k_p)
        return PD_ERR_INVALID;
    *k_p = NULL;
    if (!device || !strcmp(device, "cpu")) {
        if (bf16_weights) {
            PD_LOG_ERROR("bf16 weights are a CUDA option (the CPU backend reads the "
                         "model's own dtypes)");
            return PD_ERR_INVALID;
        }
        return pd_kernels_cpu_new(n_threads, isa, k_p);
    }
    if (!strncmp(device, "cuda", 4) && (device[4] == 0 || device[4] == ':')) {
        int n = pd_device_index(device);
        if (n < 0) {
            PD_LOG_ERROR("--device %s: expected cuda:N with N a GPU index", device);
            return PD_ERR_INVALID;
        }
        return pd_kernels_cuda_new(n, bf16_weights, k_p);
    }
    PD_LOG_ERROR("--device %s: expected cpu, cuda or cuda:N", device);
    return PD_ERR_INVALID;
}
