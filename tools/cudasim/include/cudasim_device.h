/* cudasim_device.h - the device side of cudasim (C++ only; included by cuda_runtime.h):
 * qualifiers, built-in variables, vector types, intrinsics, warp and block barriers,
 * and the launch that tools/cudasim/cu2cc.py writes for `k<<<g, b, smem, s>>>(args)`:
 *     k | ::pd_sim::cfg(g, b, smem, s) | ::pd_sim::args(args)
 * Each CUDA thread of a block runs on its own fiber; a block's threads run one at a
 * time until they reach a barrier (__syncthreads, a warp shuffle, __syncwarp), so
 * `__shared__` variables (static here) are shared by the block, and barriers,
 * shuffles and ballots have their CUDA meaning. Blocks run one after another. */
#ifndef PD_CUDASIM_DEVICE_H
#define PD_CUDASIM_DEVICE_H

#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__   static
#define __constant__ static

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1)
        : x(vx), y(vy), z(vz)
    {
    }
};
struct uint3 {
    unsigned x, y, z;
};

#define PD_SIM_VEC2(T, N, A)                                                             \
    struct __attribute__((aligned(A))) N {                                               \
        T x, y;                                                                          \
    };                                                                                   \
    static inline N make_##N(T a, T b)                                                   \
    {                                                                                    \
        return N{a, b};                                                                  \
    }
#define PD_SIM_VEC4(T, N, A)                                                             \
    struct __attribute__((aligned(A))) N {                                               \
        T x, y, z, w;                                                                    \
    };                                                                                   \
    static inline N make_##N(T a, T b, T c, T d)                                         \
    {                                                                                    \
        return N{a, b, c, d};                                                            \
    }
PD_SIM_VEC2(float, float2, 8)
PD_SIM_VEC4(float, float4, 16)
PD_SIM_VEC2(int, int2, 8)
PD_SIM_VEC4(int, int4, 16)
PD_SIM_VEC2(unsigned, uint2, 8)
PD_SIM_VEC4(unsigned, uint4, 16)
PD_SIM_VEC2(unsigned short, ushort2, 4)
PD_SIM_VEC4(unsigned short, ushort4, 8)
#undef PD_SIM_VEC2
#undef PD_SIM_VEC4

namespace pd_sim
{

/* The running CUDA thread (a fiber of the running block). */
struct Thread {
    uint3 tid;
    uint3 bid;
    dim3 bdim;
    dim3 gdim;
};
extern Thread *cur;

void syncthreads();
enum {
    WARP_SYNC,
    WARP_XOR,
    WARP_IDX,
    WARP_UP,
    WARP_DOWN,
    WARP_BALLOT,
    WARP_ANY,
    WARP_ALL
};
/* A warp-synchronous operation: every lane named in mask must reach it (else the
 * launch fails as a deadlock); returns this lane's result. */
unsigned long long warp_op(int op, unsigned mask, unsigned long long v, int param,
                           int width);
void *dyn_smem();
void cp_async16(void *smem, const void *gmem);
void cp_async_wait_all();

struct Cfg {
    dim3 g, b;
    size_t smem;
    cudaStream_t s;
    const char *file; /* the launch site, for messages */
    int line;
};
inline Cfg cfg_at(const char *file, int line, dim3 g, dim3 b, size_t smem = 0,
                  cudaStream_t s = 0)
{
    return Cfg{g, b, smem, s, file, line};
}
template <class... A> struct Args {
    std::tuple<std::decay_t<A>...> t;
};
template <class... A> Args<A...> args(A &&...a)
{
    return Args<A...>{std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}
/* Runs (or, on a capturing stream, records) body for every thread of c's grid; the
 * pointers in ptrs (nptrs of them) are the kernel's pointer arguments, checked to be
 * memory a kernel may reach. Returns the launch error, also left for
 * cudaGetLastError. */
cudaError_t launch(const void *fn, const Cfg &c, std::function<void()> body,
                   const void *const *ptrs, int nptrs);

template <class... P> struct Pending {
    void (*f)(P...);
    Cfg c;
};
template <class... P> inline Pending<P...> operator|(void (*f)(P...), Cfg c)
{
    return Pending<P...>{f, c};
}
template <class T> inline void note_ptr(const T &v, const void **ptrs, int &n)
{
    if constexpr (std::is_pointer_v<T>)
        ptrs[n++] = (const void *)v;
}
template <class... P, class... A, size_t... I>
inline void run(Pending<P...> p, Args<A...> &a, std::index_sequence<I...>)
{
    static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
    std::tuple<P...> t(static_cast<P>(std::get<I>(a.t))...);
    const void *ptrs[sizeof...(P) + 1] = {nullptr};
    int n = 0;
    (note_ptr(std::get<I>(t), ptrs, n), ...);
    void (*f)(P...) = p.f;
    launch((const void *)f, p.c, [f, t]() { std::apply(f, t); }, ptrs, n);
}
template <class... P, class... A> inline void operator|(Pending<P...> p, Args<A...> a)
{
    run(p, a, std::index_sequence_for<P...>{});
}

template <class T> inline unsigned long long to_bits(T v)
{
    static_assert(sizeof(T) <= 8, "warp operand of at most 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof v);
    return b;
}
template <class T> inline T from_bits(unsigned long long b)
{
    T v;
    std::memcpy(&v, &b, sizeof v);
    return v;
}

cudaError_t func_set_attribute(const void *fn, int attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes *a, const void *fn);

} // namespace pd_sim

#define threadIdx (::pd_sim::cur->tid)
#define blockIdx  (::pd_sim::cur->bid)
#define blockDim  (::pd_sim::cur->bdim)
#define gridDim   (::pd_sim::cur->gdim)

constexpr int warpSize = 32;

template <class F>
inline cudaError_t cudaFuncSetAttribute(F *fn, cudaFuncAttribute a, int v)
{
    return ::pd_sim::func_set_attribute((const void *)fn, (int)a, v);
}
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, F *fn)
{
    return ::pd_sim::func_get_attributes(a, (const void *)fn);
}

inline void __syncthreads()
{
    ::pd_sim::syncthreads();
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    ::pd_sim::warp_op(::pd_sim::WARP_SYNC, mask, 0, 0, 32);
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    return ::pd_sim::from_bits<T>(
        ::pd_sim::warp_op(::pd_sim::WARP_IDX, mask, ::pd_sim::to_bits(v), src, width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32)
{
    return ::pd_sim::from_bits<T>(
        ::pd_sim::warp_op(::pd_sim::WARP_XOR, mask, ::pd_sim::to_bits(v), lm, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32)
{
    return ::pd_sim::from_bits<T>(
        ::pd_sim::warp_op(::pd_sim::WARP_UP, mask, ::pd_sim::to_bits(v), (int)d, width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32)
{
    return ::pd_sim::from_bits<T>(::pd_sim::warp_op(::pd_sim::WARP_DOWN, mask,
                                                    ::pd_sim::to_bits(v), (int)d, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred)
{
    return (unsigned)::pd_sim::warp_op(::pd_sim::WARP_BALLOT, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred)
{
    return (int)::pd_sim::warp_op(::pd_sim::WARP_ANY, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred)
{
    return (int)::pd_sim::warp_op(::pd_sim::WARP_ALL, mask, pred != 0, 0, 32);
}

template <class T> inline T __ldg(const T *p)
{
    return *p;
}
inline float __uint_as_float(unsigned u)
{
    return ::pd_sim::from_bits<float>(u);
}
inline unsigned __float_as_uint(float f)
{
    return (unsigned)::pd_sim::to_bits(f);
}
inline float __int_as_float(int i)
{
    return ::pd_sim::from_bits<float>((unsigned)i);
}
inline int __float_as_int(float f)
{
    return (int)(unsigned)::pd_sim::to_bits(f);
}
inline int __popc(unsigned v)
{
    return __builtin_popcount(v);
}
inline int __popcll(unsigned long long v)
{
    return __builtin_popcountll(v);
}
inline int __clz(int v)
{
    return v ? __builtin_clz((unsigned)v) : 32;
}
inline int __ffs(int v)
{
    return __builtin_ffs(v);
}
/* PTX prmt: byte i of the result is byte (s >> 4i) & 7 of the 8 bytes y:x. */
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    unsigned long long b = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++)
        r |= (unsigned)((b >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
/* Round-to-nearest operations: the sim's C++ is built without FMA contraction. */
inline float __fmul_rn(float a, float b)
{
    return a * b;
}
inline float __fadd_rn(float a, float b)
{
    return a + b;
}
inline float __fsub_rn(float a, float b)
{
    return a - b;
}
inline float __fdiv_rn(float a, float b)
{
    return a / b;
}
inline float __frcp_rn(float a)
{
    return 1.0f / a;
}
inline float __fsqrt_rn(float a)
{
    return std::sqrt(a);
}
inline float __fmaf_rn(float a, float b, float c)
{
    return std::fma(a, b, c);
}
inline float __expf(float a)
{
    return std::exp(a);
}
inline float __logf(float a)
{
    return std::log(a);
}
inline float __saturatef(float a)
{
    return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a;
}
inline float rsqrtf(float a)
{
    return 1.0f / std::sqrt(a);
}
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    unsigned long long o = *p;
    *p = o + v;
    return o;
}
inline unsigned atomicAdd(unsigned *p, unsigned v)
{
    unsigned o = *p;
    *p = o + v;
    return o;
}
inline int atomicAdd(int *p, int v)
{
    int o = *p;
    *p = o + v;
    return o;
}
inline float atomicAdd(float *p, float v)
{
    float o = *p;
    *p = o + v;
    return o;
}
inline int min(int a, int b)
{
    return a < b ? a : b;
}
inline int max(int a, int b)
{
    return a > b ? a : b;
}
inline unsigned min(unsigned a, unsigned b)
{
    return a < b ? a : b;
}
inline unsigned max(unsigned a, unsigned b)
{
    return a > b ? a : b;
}
inline long long min(long long a, long long b)
{
    return a < b ? a : b;
}
inline long long max(long long a, long long b)
{
    return a > b ? a : b;
}
inline float min(float a, float b)
{
    return std::fmin(a, b);
}
inline float max(float a, float b)
{
    return std::fmax(a, b);
}

#endif
