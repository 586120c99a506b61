/* test_cudasim.cu - cudasim itself (tools/cudasim): that it runs CUDA code with CUDA's
 * meaning, and refuses what a GPU would refuse, so that the GPU tests passing on it
 * mean something. Built and run only with -DPD_CUDA_SIM=ON (CTest, label cudasim),
 * through the same cu2cc.py rewrite as kernels/cuda.
 *   - built-in indices over a 3-D grid of 3-D blocks; dynamic shared memory;
 *   - a block reduction through shared memory with barriers is exact; the same
 *     reduction without its barrier is wrong (a thread never sees later writes);
 *   - every warp operation against its definition (xor, idx, up, down with widths,
 *     ballot, any, all);
 *   - a barrier that not every thread reaches, and a shuffle whose lanes are not all
 *     there, fail the launch with a sticky error (in child processes);
 *   - launch limits, the dynamic shared memory opt-in, pageable host pointers;
 *   - cp.async data only after the wait;
 *   - stream capture: a graph replays with the buffers' current contents; a
 *     synchronous copy during capture fails and invalidates it;
 *   - cublasGemmEx against a direct product (transposes, leading dimensions, BF16);
 *   - fresh device memory is NaN bytes, and reading past an allocation's end faults
 *     (in a child process). */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <vector>

static int n_checks, n_fail;

static void check(bool ok, const char *what)
{
    n_checks++;
    if (!ok) {
        n_fail++;
        printf("FAIL %s\n", what);
    } else {
        printf("ok   %s\n", what);
    }
}

template <class T> static T *dev(size_t n)
{
    void *p = nullptr;
    if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess)
        return nullptr;
    return (T *)p;
}

/* ---- kernels ---- */

__global__ void index_kernel(int *out)
{
    int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int nt = blockDim.x * blockDim.y * blockDim.z;
    out[b * nt + t] = b * 1000 + t;
}

template <bool SYNC> __global__ void block_sum(const int *in, int *out)
{
    __shared__ int part[256];
    int t = threadIdx.x;
    part[t] = in[blockIdx.x * 256 + t];
    if (SYNC)
        __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (t < s)
            part[t] += part[t + s];
        if (SYNC)
            __syncthreads();
    }
    if (t == 0)
        out[blockIdx.x] = part[0];
}

__global__ void dyn_smem_kernel(int *out, int n)
{
    extern __shared__ int buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        buf[i] = i * 3;
    __syncthreads();
    int s = 0;
    for (int i = 0; i < n; i++)
        s += buf[i];
    out[threadIdx.x] = s;
}

/* one row of 64 threads = two warps; op results written per lane */
__global__ void warp_kernel(int *out)
{
    int l = threadIdx.x & 31, base = threadIdx.x * 9;
    int v = threadIdx.x * 10 + 1;
    out[base + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[base + 1] = __shfl_sync(0xffffffffu, v, 7);
    out[base + 2] = __shfl_sync(0xffffffffu, v, l + 3, 8);
    out[base + 3] = __shfl_up_sync(0xffffffffu, v, 2, 16);
    out[base + 4] = __shfl_down_sync(0xffffffffu, v, 3);
    out[base + 5] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
    out[base + 6] = __any_sync(0xffffffffu, l == 31 && threadIdx.x < 32);
    out[base + 7] = __all_sync(0xffffffffu, l < 40);
    float f = (float)l;
    out[base + 8] = (int)__shfl_xor_sync(0xffffffffu, f, 16);
}

__global__ void partial_barrier(int *out)
{
    if (threadIdx.x < 16)
        __syncthreads(); /* the other 16 threads wait elsewhere: a deadlock */
    else
        __syncwarp();
    out[threadIdx.x] = 1;
}

__global__ void short_shuffle(int *out)
{
    if (threadIdx.x >= 20)
        return; /* lanes 20..31 have exited, the mask names them */
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

__global__ void add_one(float *x, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[i] += 1.0f;
}

__global__ void read_past(const float *x, int n, float *out)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += x[i];
    out[0] = s;
}

#include "kernels/cuda/cp_async.cuh"

__global__ void cp_async_kernel(const float4 *src, float *out)
{
    __shared__ float4 st[4];
    cp_async16(&st[threadIdx.x], &src[threadIdx.x]);
    out[threadIdx.x] = st[threadIdx.x].x; /* before the wait: not there yet */
    cp_async_wait_all();
    __syncthreads();
    out[4 + threadIdx.x] = st[(threadIdx.x + 1) & 3].x;
}

/* ---- checks ---- */

/* Runs f in a child process; returns its exit status (or 128 + signal). */
template <class F> static int in_child(F f)
{
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        int rc = f();
        fflush(stdout);
        _exit(rc);
    }
    int st = 0;
    waitpid(p, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void check_indices()
{
    dim3 g(3, 2, 2), b(4, 3, 2);
    int n = 12 * 24;
    int *d = dev<int>(n);
    index_kernel<<<g, b>>>(d);
    std::vector<int> h(n);
    cudaMemcpy(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int i = 0; i < n; i++)
        ok = ok && h[i] == (i / 24) * 1000 + i % 24;
    check(ok, "threadIdx/blockIdx/blockDim/gridDim over a 3-D grid of 3-D blocks");
    cudaFree(d);
}

static void check_block_sum()
{
    const int nb = 3;
    std::vector<int> h(nb * 256);
    for (int i = 0; i < nb * 256; i++)
        h[i] = (i * 7919) % 1000 - 500;
    int *in = dev<int>(nb * 256), *out = dev<int>(nb);
    cudaMemcpy(in, h.data(), h.size() * sizeof(int), cudaMemcpyHostToDevice);
    int want[nb] = {0, 0, 0}, got[nb];
    for (int i = 0; i < nb * 256; i++)
        want[i / 256] += h[i];
    block_sum<true><<<nb, 256>>>(in, out);
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    check(!memcmp(got, want, sizeof got),
          "a shared-memory reduction with barriers is exact");
    block_sum<false><<<nb, 256>>>(in, out);
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    check(cudaGetLastError() == cudaSuccess && memcmp(got, want, sizeof got) != 0,
          "the same reduction without its barriers is wrong (threads run to their next "
          "barrier one at a time)");
    cudaFree(in);
    cudaFree(out);
}

static void check_dyn_smem()
{
    int *out = dev<int>(64);
    int n = 20000; /* 80000 bytes: above the 48 KiB default */
    dyn_smem_kernel<<<1, 64, n * sizeof(int)>>>(out, n);
    check(cudaGetLastError() == cudaErrorInvalidValue,
          "80 KB of dynamic shared memory without the opt-in is refused");
    check(cudaFuncSetAttribute(dyn_smem_kernel,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               300000) == cudaErrorInvalidValue,
          "an opt-in above the sm_90 limit is refused");
    cudaGetLastError();
    check(cudaFuncSetAttribute(dyn_smem_kernel,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               n * sizeof(int)) == cudaSuccess,
          "the opt-in to 80 KB");
    dyn_smem_kernel<<<1, 64, n * sizeof(int)>>>(out, n);
    int h[64];
    cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
    long long want = 3LL * n * (n - 1) / 2;
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int i = 0; i < 64; i++)
        ok = ok && h[i] == (int)want;
    check(ok, "dynamic shared memory, shared by the block, after the opt-in");
    cudaFree(out);
}

static void check_warp_ops()
{
    int *d = dev<int>(64 * 9);
    warp_kernel<<<1, 64>>>(d);
    std::vector<int> h(64 * 9);
    cudaMemcpy(h.data(), d, h.size() * sizeof(int), cudaMemcpyDeviceToHost);
    bool ok[9] = {true, true, true, true, true, true, true, true, true};
    for (int t = 0; t < 64; t++) {
        int l = t & 31, w = t & ~31, *r = &h[t * 9];
        auto v = [&](int lane) { return (w + lane) * 10 + 1; };
        ok[0] = ok[0] && r[0] == v(l ^ 5);
        ok[1] = ok[1] && r[1] == v(7);
        ok[2] = ok[2] && r[2] == v((l & ~7) + ((l + 3) & 7));
        ok[3] = ok[3] && r[3] == ((l & 15) >= 2 ? v(l - 2) : v(l));
        ok[4] = ok[4] && r[4] == (l + 3 < 32 ? v(l + 3) : v(l));
        unsigned bal = 0;
        for (int k = 0; k < 32; k++)
            bal |= (k % 3 == 0 ? 1u : 0u) << k;
        ok[5] = ok[5] && (unsigned)r[5] == bal;
        ok[6] = ok[6] && r[6] == (w == 0);
        ok[7] = ok[7] && r[7] == 1;
        ok[8] = ok[8] && r[8] == (l ^ 16);
    }
    const char *names[9] = {
        "__shfl_xor_sync",         "__shfl_sync",      "__shfl_sync width 8",
        "__shfl_up_sync width 16", "__shfl_down_sync", "__ballot_sync",
        "__any_sync (per warp)",   "__all_sync",       "__shfl_xor_sync of a float"};
    for (int i = 0; i < 9; i++)
        check(ok[i], names[i]);
    cudaFree(d);
}

static void check_deadlocks()
{
    int rc = in_child([] {
        int *d = dev<int>(32);
        partial_barrier<<<1, 32>>>(d);
        if (cudaDeviceSynchronize() != cudaErrorLaunchFailure)
            return 2;
        /* sticky, as after a trap on a GPU */
        return cudaMemcpy(d, d, 4, cudaMemcpyDeviceToDevice) == cudaErrorLaunchFailure
                   ? 0
                   : 3;
    });
    check(rc == 0,
          "a barrier not every thread reaches fails the launch, and stays failed");
    rc = in_child([] {
        int *d = dev<int>(32);
        short_shuffle<<<1, 32>>>(d);
        return cudaDeviceSynchronize() == cudaErrorLaunchFailure ? 0 : 2;
    });
    check(rc == 0, "a shuffle naming lanes that have exited fails the launch");
}

static void check_launch_limits()
{
    float *x = dev<float>(16);
    add_one<<<1, 1025>>>(x, 16);
    check(cudaGetLastError() == cudaErrorInvalidConfiguration,
          "1025 threads are refused");
    add_one<<<dim3(1, 70000), 32>>>(x, 16);
    check(cudaGetLastError() == cudaErrorInvalidConfiguration,
          "a grid y of 70000 is refused");
    std::vector<float> host(16, 0.0f);
    add_one<<<1, 16>>>(host.data(), 16);
    check(cudaGetLastError() == cudaErrorInvalidValue && host[0] == 0.0f,
          "a kernel given pageable host memory is refused");
    float *pinned = nullptr;
    cudaMallocHost((void **)&pinned, 16 * sizeof(float));
    for (int i = 0; i < 16; i++)
        pinned[i] = (float)i;
    add_one<<<1, 16>>>(pinned, 16);
    cudaDeviceSynchronize();
    check(cudaGetLastError() == cudaSuccess && pinned[15] == 16.0f,
          "a kernel may use pinned host memory");
    cudaFreeHost(pinned);
    float f;
    check(cudaMemcpy(&f, host.data(), 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
          "a device-to-host copy from host memory is refused");
    cudaGetLastError();
    cudaFree(x);
}

static void check_cp_async()
{
    float4 h[4];
    for (int i = 0; i < 4; i++)
        h[i] = make_float4((float)i + 1, 0, 0, 0);
    float4 *src = dev<float4>(4);
    float *out = dev<float>(8);
    cudaMemcpy(src, h, sizeof h, cudaMemcpyHostToDevice);
    cp_async_kernel<<<1, 4>>>(src, out);
    float o[8];
    cudaMemcpy(o, out, sizeof o, cudaMemcpyDeviceToHost);
    bool before = true, after = true;
    for (int i = 0; i < 4; i++) {
        before = before && std::isnan(o[i]);
        after = after && o[4 + i] == (float)(((i + 1) & 3) + 1);
    }
    check(before, "cp.async data is not there before the wait");
    check(after, "cp.async data is there after the wait and a barrier");
    cudaFree(src);
    cudaFree(out);
}

static void check_graphs()
{
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    float *x = dev<float>(8);
    float zero[8] = {0};
    cudaMemcpy(x, zero, sizeof zero, cudaMemcpyHostToDevice);
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    add_one<<<1, 8, 0, s>>>(x, 8);
    add_one<<<1, 8, 0, s>>>(x, 8);
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    bool ok = cudaStreamEndCapture(s, &g) == cudaSuccess && g &&
              cudaGraphInstantiate(&ge, g, 0) == cudaSuccess;
    float h[8];
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    check(ok && h[0] == 0.0f, "captured work does not run at capture");
    float five[8] = {5, 5, 5, 5, 5, 5, 5, 5};
    cudaMemcpy(x, five, sizeof five, cudaMemcpyHostToDevice);
    cudaGraphLaunch(ge, s);
    cudaGraphLaunch(ge, s);
    cudaStreamSynchronize(s);
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    check(h[0] == 9.0f && h[7] == 9.0f,
          "a graph replays on the buffer's current contents");
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);

    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    add_one<<<1, 8, 0, s>>>(x, 8);
    check(cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost) ==
              cudaErrorStreamCaptureUnsupported,
          "a synchronous copy while capturing is refused");
    g = nullptr;
    check(cudaStreamEndCapture(s, &g) == cudaErrorStreamCaptureInvalidated && !g,
          "and the capture is invalidated");
    cudaGetLastError();
    cudaStreamDestroy(s);
    cudaFree(x);
}

static void check_gemm()
{
    /* C (m x n) = A^T (m x k, A stored k x m col-major, lda k) * B (k x n, ldb k+2) */
    const int m = 5, n = 3, k = 7, lda = 7, ldb = 9, ldc = 6;
    std::vector<unsigned short> a(lda * m);
    std::vector<float> b(ldb * n), c(ldc * n, -1.0f), af(lda * m);
    for (int i = 0; i < lda * m; i++) {
        float v = (float)((i * 37) % 11 - 5) / 4.0f; /* exact in BF16 */
        a[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        af[i] = v;
    }
    for (int i = 0; i < ldb * n; i++)
        b[i] = (float)((i * 13) % 7 - 3);
    void *A = dev<unsigned short>(a.size()), *B = dev<float>(b.size()),
         *C = dev<float>(c.size());
    cudaMemcpy(A, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(B, b.data(), b.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(C, c.data(), c.size() * 4, cudaMemcpyHostToDevice);
    cublasHandle_t h;
    cublasCreate(&h);
    float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = cublasGemmEx(
        h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A, CUDA_R_16BF, lda, B, CUDA_R_32F,
        ldb, &zero, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cudaMemcpy(c.data(), C, c.size() * 4, cudaMemcpyDeviceToHost);
    bool ok = st == CUBLAS_STATUS_SUCCESS;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < ldc; i++) {
            float want = -1.0f; /* rows past m are left alone */
            if (i < m) {
                want = 0.0f;
                for (int l = 0; l < k; l++)
                    want += af[i * lda + l] * b[j * ldb + l];
            }
            ok = ok && c[j * ldc + i] == want;
        }
    check(
        ok,
        "cublasGemmEx (A^T B, BF16 x F32, leading dimensions) against a direct product");
    cublasDestroy(h);
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
}

static void check_memory()
{
    float *x = dev<float>(10);
    float h[10];
    cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
    bool nan = true;
    for (float v : h)
        nan = nan && std::isnan(v);
    check(nan, "fresh device memory reads as NaN");
    cudaFree(x);
    int rc = in_child([] {
        float *y = dev<float>(64), *o = dev<float>(1);
        read_past<<<1, 1>>>(y, 64 + 1024, o); /* 4 KiB past the end */
        cudaDeviceSynchronize();
        return 0;
    });
    check(rc == 128 + SIGSEGV, "reading past the end of an allocation faults");
}

int main()
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        printf("FAIL no cudasim device (PD_CUDASIM_DEVICES?)\n");
        return 1;
    }
    check_indices();
    check_block_sum();
    check_dyn_smem();
    check_warp_ops();
    check_deadlocks();
    check_launch_limits();
    check_cp_async();
    check_graphs();
    check_gemm();
    check_memory();
    printf("test_cudasim: %d checks, %d failures\n", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
