/* device.c - picks a backend from a --device string, and stands in for the CUDA
 * backend in builds without one (no nvcc at configure time, or -DPD_CUDA=OFF), so
 * every tool takes --device and a CPU-only build says why it cannot serve "cuda". */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
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
#else
bool pd_kernels_have_cuda(void)
{
    return true;
}
#endif

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
        long n = 0;
        if (device[4] == ':') {
            char *end = NULL;
            errno = 0;
            n = strtol(device + 5, &end, 10);
            if (errno || end == device + 5 || *end || n < 0 || n > 1023) {
                PD_LOG_ERROR("--device %s: expected cuda:N with N a GPU index", device);
                return PD_ERR_INVALID;
            }
        }
        return pd_kernels_cuda_new((int)n, bf16_weights, k_p);
    }
    PD_LOG_ERROR("--device %s: expected cpu, cuda or cuda:N", device);
    return PD_ERR_INVALID;
}
