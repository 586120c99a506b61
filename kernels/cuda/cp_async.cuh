/* cp_async.cuh - asynchronous global -> shared copies (sm_80+), shared by the matvec's
 * staging of x (ops_basic.cu) and the decode attention's V stage (attention.cu).
 * A copy keeps no register busy while it is in flight; it is complete after
 * cp_async_wait_all() in the issuing thread, and visible to the block's other threads
 * after a barrier. Device code only. */
#ifndef PD_CUDA_CP_ASYNC_CUH
#define PD_CUDA_CP_ASYNC_CUH

#ifdef PD_CUDA_SIM
/* cudasim (tools/cudasim): the copy lands at the wait, not before. */
static inline void cp_async16(void *smem, const void *gmem)
{
    ::pd_sim::cp_async16(smem, gmem);
}
static inline void cp_async_wait_all()
{
    ::pd_sim::cp_async_wait_all();
}
#else
/* 16 bytes from gmem to smem, both 16-byte aligned. */
static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem)
{
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem)
                 : "memory");
}

/* Waits for every cp.async this thread has issued. */
static __device__ __forceinline__ void cp_async_wait_all()
{
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}
#endif

#endif
