/* sum64.h - the word mix of PD-SUM64, the device transports' KV checksum, shared by
 * the host reference (common/kvpool.c) and the CUDA kernel (kernels/cuda/xfer.cu) so
 * both compute the same function.
 * PD-SUM64 of a sequence of 32-bit words w_0, w_1, ... is the sum modulo 2^64 of
 * pd_sum64_mix(w_i, i). The mix is a bijection of w_i for each i (the splitmix64
 * finalizer of w_i XOR a multiple of the index), so changing any one word changes the
 * sum, and moving a word to another index changes it too; the terms are independent,
 * so a GPU adds them in any order. */
#ifndef PD_SUM64_H
#define PD_SUM64_H

#include <stdint.h>

#ifdef __CUDACC__
#define PD_SUM64_FN __host__ __device__ static inline
#else
#define PD_SUM64_FN static inline
#endif

PD_SUM64_FN uint64_t pd_sum64_mix(uint32_t w, uint64_t i)
{
    uint64_t z = (uint64_t)w ^ ((i + 1) * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#endif
