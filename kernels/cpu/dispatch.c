/* dispatch.c - the CPU backend: picks an ISA at run time and drives its kernels over
 * the thread pool (pd_kernels_cpu_new, the ops table of ops.h).
 *
 * Design: the ISA (scalar reference, AVX2+FMA+F16C, AVX-512 with or without VNNI) is
 * chosen once, from cpuid via __builtin_cpu_supports (which also checks that the OS
 * saves the vector state; F16C is read from CPUID itself, for clang 14). Each op
 * checks its arguments, grows the scratch it needs (never shrinking it, so
 * steady-state generation allocates nothing), then fans out:
 *   matmul     small T: output rows in chunks of 16-row multiples (mv kernels stream
 *              each weight row once for all T tokens); large T: tasks of one panel of
 *              gemm_nr output rows x a chunk of tokens (gemm kernels pack the panel
 *              to f32 or int8 once and reuse it across the chunk). Activations are
 *              quantized to Q8 blocks first when the kernel wants that.
 *   attention  per query, chunks of PD_ATTN_CHUNK positions reduced to partial
 *              softmax states and folded in order; one task per query for many
 *              queries, one per (query, chunk) for few (flash-decoding).
 *   the rest   rows or element chunks when big enough, else inline.
 * Tiny ops run on the calling thread: waking the pool costs more than they do.
 * Threading: one thread drives a pd_kernels_t (ops.h); the pool runs the tasks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(PD_KERNELS_X86)
#include <cpuid.h>
#endif

#include "common/log.h"
#include "kernels/cpu/cpu_internal.h"

/* Below this many multiply-adds an op runs on the calling thread alone. */
#define INLINE_WORK (1 << 15)
/* Row chunks per thread for the matrix-vector path (load balance vs streaming). */
#define MV_CHUNKS_PER_THREAD 4
/* Tokens per gemm task: bounds the activations streamed past one packed panel. */
#define GEMM_T_CHUNK 512
/* Elementwise ops split into chunks of this many elements. */
#define ELEM_CHUNK 16384
/* Scratch grows in steps of this many bytes (attention scores grow with positions). */
#define SCRATCH_STEP (64 * 1024)
#define MAX_HEAD_DIM 512

typedef struct pd_cpu_kernels {
    pd_kernels_t base;       /* first: the ops table handed out */
    const pd_cpu_isa_t *isa; /* &isa_table */
    pd_cpu_isa_t isa_table;
    pd_threadpool_t *pool;
    int n_threads;

    void **thread_scratch; /* [n_threads] per-thread buffers */
    size_t thread_scratch_size;
    void *shared; /* quantized activations */
    size_t shared_size;

    /* RoPE: frequencies for (theta, head_dim) and the cos/sin rows of the last pos[]. */
    float rope_theta;
    int rope_head_dim;
    float *rope_freq;  /* [head_dim / 2] */
    int32_t *rope_pos; /* [rope_cap] */
    float *rope_cs;    /* [rope_cap][2 * head_dim] */
    int64_t rope_cap, rope_n;
} pd_cpu_kernels_t;

static void *alloc_aligned(size_t size)
{
    size_t rounded = (size + PD_CPU_ALIGN - 1) / PD_CPU_ALIGN * PD_CPU_ALIGN;
    void *p = aligned_alloc(PD_CPU_ALIGN, rounded ? rounded : PD_CPU_ALIGN);
    if (!p) {
        /* Ops cannot return a status; scratch is small next to the model. */
        PD_LOG_ERROR("cpu kernels: out of memory for %zu bytes of scratch", size);
        PD_ASSERT(p != NULL);
    }
    return p;
}

static size_t round_step(size_t bytes)
{
    return (bytes + SCRATCH_STEP - 1) / SCRATCH_STEP * SCRATCH_STEP;
}

static void ensure_thread_scratch(pd_cpu_kernels_t *ck, size_t bytes)
{
    if (bytes <= ck->thread_scratch_size)
        return;
    bytes = round_step(bytes);
    for (int i = 0; i < ck->n_threads; i++) {
        free(ck->thread_scratch[i]);
        ck->thread_scratch[i] = alloc_aligned(bytes);
    }
    ck->thread_scratch_size = bytes;
}

static void *ensure_shared(pd_cpu_kernels_t *ck, size_t bytes)
{
    if (bytes > ck->shared_size) {
        bytes = round_step(bytes);
        free(ck->shared);
        ck->shared = alloc_aligned(bytes);
        ck->shared_size = bytes;
    }
    return ck->shared;
}

static void run(pd_cpu_kernels_t *ck, int64_t n_tasks, double work, pd_task_fn fn,
                void *arg)
{
    if (work < INLINE_WORK || ck->n_threads == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    pd_threadpool_run(ck->pool, n_tasks, fn, arg);
}

/* ops.h host_run: the kernel pool, lent between ops */
static void cpu_host_run(pd_kernels_t *k, int64_t n_tasks, pd_task_fn fn, void *arg)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (ck->n_threads == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    pd_threadpool_run(ck->pool, n_tasks, fn, arg);
}

static int dt_index(pd_dtype_t d)
{
    switch (d) {
    case PD_DTYPE_F32:
        return PD_CPU_DT_F32;
    case PD_DTYPE_F16:
        return PD_CPU_DT_F16;
    case PD_DTYPE_BF16:
        return PD_CPU_DT_BF16;
    case PD_DTYPE_Q8_0:
        return PD_CPU_DT_Q8_0;
    case PD_DTYPE_Q4_0:
        return PD_CPU_DT_Q4_0;
    }
    return -1;
}

/* ---- matmul ---------------------------------------------------------------------- */

typedef struct mm_job {
    pd_cpu_kernels_t *ck;
    pd_cpu_mm_t mm;
    pd_cpu_mv_fn mv;
    pd_cpu_gemm_fn gemm;
    int64_t rows_per_task; /* mv */
    int64_t n_panels, nr;  /* gemm */
    int8_t *xq;            /* quantization target */
    float *xd;
    int add128;
} mm_job_t;

static void quantize_task(void *arg, int64_t t, int thread)
{
    (void)thread;
    mm_job_t *j = arg;
    int64_t n = j->mm.n_in;
    j->ck->isa->quantize_x(j->mm.x + t * n, n, j->xq + t * n, j->xd + t * (n / PD_QK),
                           j->add128);
}

static void mv_task(void *arg, int64_t task, int thread)
{
    mm_job_t *j = arg;
    int64_t o0 = task * j->rows_per_task;
    int64_t o1 = pd_cpu_min64(o0 + j->rows_per_task, j->mm.n_out);
    j->mv(&j->mm, o0, o1, j->ck->thread_scratch[thread]);
}

static void gemm_task(void *arg, int64_t task, int thread)
{
    mm_job_t *j = arg;
    int64_t tc = task / j->n_panels, p = task % j->n_panels;
    int64_t o0 = p * j->nr, o1 = pd_cpu_min64(o0 + j->nr, j->mm.n_out);
    int64_t t0 = tc * GEMM_T_CHUNK, t1 = pd_cpu_min64(t0 + GEMM_T_CHUNK, j->mm.T);
    j->gemm(&j->mm, o0, o1, t0, t1, j->ck->thread_scratch[thread]);
}

static int mm_check(const pd_tensor_t *w, const float *x, float *y, int64_t T)
{
    if (!w || !w->data || !x || !y || T < 0 || dt_index(w->dtype) < 0 || w->ne[0] < 1 ||
        w->ne[1] < 1 || w->ne[0] % pd_dtype_block_elems(w->dtype) != 0)
        return -1;
    size_t need;
    if (pd_dtype_row_bytes(w->dtype, w->ne[0], &need) ||
        pd_mul_size(need, (size_t)w->ne[1], &need) || need > w->nbytes)
        return -1;
    return 0;
}

/* Fills j for y = x W^T and returns its task count; x quantization is set up by the
 * caller (shared by every matrix of a multi-matmul). */
static int64_t mm_plan(pd_cpu_kernels_t *ck, const pd_tensor_t *w, const float *x,
                       int64_t T, float *y, mm_job_t *j)
{
    const pd_cpu_isa_t *isa = ck->isa;
    int dt = dt_index(w->dtype);
    *j = (mm_job_t){.ck = ck};
    j->mm = (pd_cpu_mm_t){.dt = dt,
                          .dtype = w->dtype,
                          .w = w->data,
                          .row_bytes = pd_tensor_row_bytes(w),
                          .n_in = w->ne[0],
                          .n_out = w->ne[1],
                          .T = T,
                          .x = x,
                          .y = y};
    if (isa->gemm[dt] && T >= isa->gemm_min_T[dt]) {
        j->gemm = isa->gemm[dt];
        j->nr = isa->gemm_nr;
        j->n_panels = (j->mm.n_out + j->nr - 1) / j->nr;
        return (T + GEMM_T_CHUNK - 1) / GEMM_T_CHUNK * j->n_panels;
    }
    j->mv = isa->mv[dt];
    int64_t chunks = (int64_t)ck->n_threads * MV_CHUNKS_PER_THREAD;
    int64_t rows = (j->mm.n_out + chunks - 1) / chunks;
    j->rows_per_task = (rows + 15) / 16 * 16;
    return (j->mm.n_out + j->rows_per_task - 1) / j->rows_per_task;
}

#define MM_MAX 4 /* matrices in one multi-matmul */

/* Several matrices over the same x as one fan-out: task i belongs to the job whose
 * [first[m], first[m + 1]) holds it. */
typedef struct mm_multi {
    mm_job_t jobs[MM_MAX];
    int64_t first[MM_MAX + 1];
    int n;
} mm_multi_t;

static void multi_task(void *arg, int64_t task, int thread)
{
    mm_multi_t *mj = arg;
    int m = 0;
    while (task >= mj->first[m + 1])
        m++;
    mm_job_t *j = &mj->jobs[m];
    int64_t local = task - mj->first[m];
    if (j->gemm)
        gemm_task(j, local, thread);
    else
        mv_task(j, local, thread);
}

static void cpu_matmul_multi(pd_kernels_t *k, const pd_tensor_t *const *ws,
                             float *const *ys, int n, const float *x, int64_t T)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (n < 1 || n > MM_MAX) {
        PD_LOG_ERROR("matmul_multi: %d matrices (1..%d)", n, MM_MAX);
        return;
    }
    for (int m = 0; m < n; m++) {
        const pd_tensor_t *w = ws[m];
        if (mm_check(w, x, ys[m], T) != 0 ||
            (m > 0 && (w->dtype != ws[0]->dtype || w->ne[0] != ws[0]->ne[0]))) {
            PD_LOG_ERROR("matmul: bad arguments (dtype %d, shape %lld x %lld, T %lld)",
                         w ? (int)w->dtype : -1, w ? (long long)w->ne[1] : 0LL,
                         w ? (long long)w->ne[0] : 0LL, (long long)T);
            return;
        }
    }
    if (T == 0)
        return;
    const pd_cpu_isa_t *isa = ck->isa;
    mm_multi_t mj = {.n = n};
    double work = 0;
    for (int m = 0; m < n; m++) {
        mj.first[m + 1] = mj.first[m] + mm_plan(ck, ws[m], x, T, ys[m], &mj.jobs[m]);
        work += (double)T * (double)ws[m]->ne[0] * (double)ws[m]->ne[1];
    }
    /* same dtype and n_in: every job takes the same path and x format */
    mm_job_t *j0 = &mj.jobs[0];
    int use_gemm = j0->gemm != NULL, dt = j0->mm.dt;
    int xmode = use_gemm ? isa->gemm_x[dt] : isa->mv_x[dt];
    ensure_thread_scratch(ck, isa->mm_scratch(dt, j0->mm.n_in, use_gemm));
    if (xmode != PD_CPU_X_F32) { /* quantize x once for all the matrices */
        size_t nq = (size_t)T * (size_t)j0->mm.n_in;
        uint8_t *buf = ensure_shared(ck, nq + nq / PD_QK * sizeof(float) + PD_CPU_ALIGN);
        j0->xq = (int8_t *)buf;
        j0->xd = (float *)(buf + (nq + PD_CPU_ALIGN - 1) / PD_CPU_ALIGN * PD_CPU_ALIGN);
        j0->add128 = xmode == PD_CPU_X_Q8U;
        run(ck, T, (double)nq * 8, quantize_task, j0);
        for (int m = 0; m < n; m++) {
            mj.jobs[m].mm.xq = j0->xq;
            mj.jobs[m].mm.xd = j0->xd;
        }
    }
    run(ck, mj.first[n], work, multi_task, &mj);
}

static void cpu_matmul(pd_kernels_t *k, const pd_tensor_t *w, const float *x, int64_t T,
                       float *y)
{
    cpu_matmul_multi(k, &w, &y, 1, x, T);
}

/* ---- get_rows, kv_write ---------------------------------------------------------- */

static void cpu_get_rows(pd_kernels_t *k, const pd_tensor_t *w, const int32_t *ids,
                         int64_t n, float *out)
{
    (void)k;
    if (mm_check(w, out, out, n) != 0 || (n > 0 && !ids)) {
        PD_LOG_ERROR("get_rows: bad arguments");
        return;
    }
    int64_t ne0 = w->ne[0];
    size_t rb = pd_tensor_row_bytes(w);
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= w->ne[1]) {
            PD_LOG_ERROR("get_rows: id %d out of range [0, %lld)", (int)ids[i],
                         (long long)w->ne[1]);
            memset(out + i * ne0, 0, (size_t)ne0 * sizeof(float));
            continue;
        }
        pd_dequantize_row(w->dtype, (const uint8_t *)w->data + (size_t)ids[i] * rb, ne0,
                          out + i * ne0);
    }
}

static void cpu_kv_write(pd_kernels_t *k, void *cache, pd_dtype_t kv_dtype,
                         int64_t row_elems, const int32_t *slots, int64_t T,
                         const float *src)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (!cache || !slots || !src || row_elems < 1 ||
        (kv_dtype != PD_DTYPE_F32 && kv_dtype != PD_DTYPE_F16)) {
        PD_LOG_ERROR("kv_write: bad arguments (kv dtype %d)", (int)kv_dtype);
        return;
    }
    size_t es = kv_dtype == PD_DTYPE_F16 ? 2 : 4;
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0)
            continue;
        void *dst = (uint8_t *)cache + (size_t)slots[t] * (size_t)row_elems * es;
        if (kv_dtype == PD_DTYPE_F32)
            memcpy(dst, src + t * row_elems, (size_t)row_elems * 4);
        else
            ck->isa->f32_to_f16(src + t * row_elems, dst, row_elems);
    }
}

/* ---- row-wise ops ---------------------------------------------------------------- */

typedef struct row_job {
    pd_cpu_kernels_t *ck;
    float *out;
    const float *x, *w;
    int64_t n;
    float eps;
    const int32_t *pos;
    int n_heads, head_dim;
    float theta;
} row_job_t;

static void rmsnorm_task(void *arg, int64_t t, int thread)
{
    (void)thread;
    row_job_t *j = arg;
    j->ck->isa->rmsnorm(j->out + t * j->n, j->x + t * j->n, j->w, j->n, j->eps);
}

static void cpu_rmsnorm(pd_kernels_t *k, float *out, const float *x, const float *weight,
                        int64_t T, int64_t n, float eps)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (!out || !x || !weight || n < 1 || T < 0) {
        PD_LOG_ERROR("rmsnorm: bad arguments");
        return;
    }
    row_job_t j = {.ck = ck, .out = out, .x = x, .w = weight, .n = n, .eps = eps};
    run(ck, T, (double)T * (double)n, rmsnorm_task, &j);
}

static void softmax_task(void *arg, int64_t t, int thread)
{
    (void)thread;
    row_job_t *j = arg;
    j->ck->isa->softmax(j->out + t * j->n, j->n);
}

static void cpu_softmax(pd_kernels_t *k, float *x, int64_t T, int64_t n)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (!x || n < 1 || T < 0) {
        PD_LOG_ERROR("softmax: bad arguments");
        return;
    }
    row_job_t j = {.ck = ck, .out = x, .n = n};
    run(ck, T, (double)T * (double)n * 8, softmax_task, &j);
}

/* silu_mul and add: out[i] = f(out[i], x[i]) in chunks of ELEM_CHUNK. */
typedef struct elem_job {
    void (*fn)(float *out, const float *x, int64_t n);
    float *out;
    const float *x;
    int64_t n;
} elem_job_t;

static void elem_task(void *arg, int64_t c, int thread)
{
    (void)thread;
    elem_job_t *j = arg;
    int64_t i0 = c * ELEM_CHUNK, n = pd_cpu_min64(ELEM_CHUNK, j->n - i0);
    j->fn(j->out + i0, j->x + i0, n);
}

static void run_elem(pd_cpu_kernels_t *ck, const char *op, elem_job_t *j,
                     double work_per_elem)
{
    if (!j->out || !j->x || j->n < 0) {
        PD_LOG_ERROR("%s: bad arguments", op);
        return;
    }
    run(ck, (j->n + ELEM_CHUNK - 1) / ELEM_CHUNK, (double)j->n * work_per_elem, elem_task,
        j);
}

static void cpu_silu_mul(pd_kernels_t *k, float *gate, const float *up, int64_t n)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    elem_job_t j = {.fn = ck->isa->silu_mul, .out = gate, .x = up, .n = n};
    run_elem(ck, "silu_mul", &j, 8);
}

static void cpu_add(pd_kernels_t *k, float *y, const float *x, int64_t n)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    elem_job_t j = {.fn = ck->isa->add, .out = y, .x = x, .n = n};
    run_elem(ck, "add", &j, 0.25);
}

/* ---- rope ------------------------------------------------------------------------ */

/* Rebuilds the cos/sin rows for pos[0..T) unless they are those of the last call (the
 * engine ropes q and k of every layer at the same positions). */
static void rope_table(pd_cpu_kernels_t *ck, const int32_t *pos, int64_t T, int hd,
                       float theta)
{
    if (ck->rope_head_dim != hd || ck->rope_theta != theta) {
        free(ck->rope_freq);
        ck->rope_freq = alloc_aligned((size_t)hd / 2 * sizeof(float));
        for (int i = 0; i < hd; i += 2)
            ck->rope_freq[i / 2] = 1.0f / powf(theta, (float)i / (float)hd);
        ck->rope_head_dim = hd;
        ck->rope_theta = theta;
        ck->rope_n = 0;
        ck->rope_cap = 0; /* row width changed: reallocate below */
    }
    if (T == ck->rope_n && memcmp(pos, ck->rope_pos, (size_t)T * sizeof *pos) == 0)
        return;
    if (T > ck->rope_cap) {
        free(ck->rope_pos);
        free(ck->rope_cs);
        ck->rope_pos = alloc_aligned((size_t)T * sizeof *pos);
        ck->rope_cs = alloc_aligned((size_t)T * 2 * (size_t)hd * sizeof(float));
        ck->rope_cap = T;
    }
    for (int64_t t = 0; t < T; t++) {
        float *cc = ck->rope_cs + t * 2 * hd, *ss = cc + hd;
        for (int i = 0; i < hd; i += 2) {
            float val = (float)pos[t] * ck->rope_freq[i / 2];
            float c = cosf(val), s = sinf(val);
            cc[i] = c;
            cc[i + 1] = c;
            ss[i] = -s;
            ss[i + 1] = s;
        }
        ck->rope_pos[t] = pos[t];
    }
    ck->rope_n = T;
}

static void rope_task(void *arg, int64_t t, int thread)
{
    (void)thread;
    row_job_t *j = arg;
    j->ck->isa->rope(j->out + t * j->n, j->n_heads, j->head_dim,
                     j->ck->rope_cs + t * 2 * j->head_dim, j->pos[t], j->theta);
}

static void cpu_rope(pd_kernels_t *k, float *x, const int32_t *pos, int64_t T,
                     int n_heads, int head_dim, float theta)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (!x || !pos || T < 0 || n_heads < 1 || head_dim < 2 || head_dim % 2 != 0 ||
        head_dim > MAX_HEAD_DIM) {
        PD_LOG_ERROR("rope: bad arguments (head_dim %d)", head_dim);
        return;
    }
    if (T == 0)
        return;
    rope_table(ck, pos, T, head_dim, theta);
    row_job_t j = {.ck = ck,
                   .out = x,
                   .n = (int64_t)n_heads * head_dim,
                   .pos = pos,
                   .n_heads = n_heads,
                   .head_dim = head_dim,
                   .theta = theta};
    run(ck, T, (double)T * (double)j.n, rope_task, &j);
}

/* ---- attention ------------------------------------------------------------------- */

/* Every query runs over its chunks of PD_ATTN_CHUNK positions (ops.h): each chunk is
 * reduced to a partial by the ISA's attn_chunk, and the partials are folded in chunk
 * order by attn_fold. Many queries (a prompt chunk, a large decode batch): one task
 * per query, folding as it goes. Few queries (decoding a handful of sequences): one
 * task per (query, chunk), partials kept, then one fold per query: flash-decoding, so
 * two threads share one long context. Both do the same arithmetic in the same order,
 * so a query's output does not depend on which way it ran. */

typedef int (*attn_chunk_fn)(const pd_attn_args_t *a, int64_t t, int64_t p0, int64_t p1,
                             float *part, float *scores);

typedef struct attn_job {
    pd_cpu_kernels_t *ck;
    const pd_attn_args_t *a;
    attn_chunk_fn chunk;
    size_t part;     /* floats of one partial: n_heads * (head_dim + 2) */
    int64_t *first;  /* split: [T + 1] index of each query's first chunk */
    float *parts;    /* split: [first[T]][part] */
} attn_job_t;

static void attn_run_chunk(const attn_job_t *j, int64_t t, int64_t c, float *part,
                           float *scores)
{
    int64_t p0 = c * PD_ATTN_CHUNK;
    int64_t p1 = pd_cpu_min64(p0 + PD_ATTN_CHUNK, (int64_t)j->a->pos[t] + 1);
    if (!j->chunk(j->a, t, p0, p1, part, scores))
        pd_cpu_attn_chunk_any(j->a, t, p0, p1, part, scores);
}

/* st <- st (+) part, head by head: the running max, rescaled sums and values. */
static void attn_fold(float *st, const float *part, int n_heads, int hd)
{
    for (int h = 0; h < n_heads; h++) {
        float *s = st + (size_t)h * (size_t)(hd + 2);
        const float *p = part + (size_t)h * (size_t)(hd + 2);
        float m = fmaxf(s[hd], p[hd]);
        float ws = expf(s[hd] - m), wp = expf(p[hd] - m);
        for (int i = 0; i < hd; i++)
            s[i] = s[i] * ws + p[i] * wp;
        s[hd + 1] = s[hd + 1] * ws + p[hd + 1] * wp;
        s[hd] = m;
    }
}

static void attn_finish(const pd_attn_args_t *a, int64_t t, const float *st)
{
    int hd = a->head_dim;
    for (int h = 0; h < a->n_heads; h++) {
        const float *s = st + (size_t)h * (size_t)(hd + 2);
        float *out = a->out + (t * a->n_heads + h) * hd;
        for (int i = 0; i < hd; i++)
            out[i] = s[i] / s[hd + 1];
    }
}

static int64_t attn_n_chunks(const pd_attn_args_t *a, int64_t t)
{
    return ((int64_t)a->pos[t] + PD_ATTN_CHUNK) / PD_ATTN_CHUNK;
}

/* One query, all its chunks. Thread scratch: scores, then the partial, then the
 * running state. */
static void attn_query_task(void *arg, int64_t t, int thread)
{
    attn_job_t *j = arg;
    float *scores = j->ck->thread_scratch[thread];
    float *part = scores + (size_t)j->a->n_heads * PD_ATTN_CHUNK;
    float *st = part + j->part;
    attn_run_chunk(j, t, 0, st, scores);
    for (int64_t c = 1, n = attn_n_chunks(j->a, t); c < n; c++) {
        attn_run_chunk(j, t, c, part, scores);
        attn_fold(st, part, j->a->n_heads, j->a->head_dim);
    }
    attn_finish(j->a, t, st);
}

/* Global chunk g of the split form: the query that owns it by bisection. */
static void attn_split_task(void *arg, int64_t g, int thread)
{
    attn_job_t *j = arg;
    int64_t lo = 0, hi = j->a->T - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (j->first[mid] <= g)
            lo = mid;
        else
            hi = mid - 1;
    }
    attn_run_chunk(j, lo, g - j->first[lo], j->parts + (size_t)g * j->part,
                   j->ck->thread_scratch[thread]);
}

static void attn_fold_task(void *arg, int64_t t, int thread)
{
    attn_job_t *j = arg;
    float *st = j->ck->thread_scratch[thread];
    memcpy(st, j->parts + (size_t)j->first[t] * j->part, j->part * sizeof(float));
    for (int64_t g = j->first[t] + 1; g < j->first[t + 1]; g++)
        attn_fold(st, j->parts + (size_t)g * j->part, j->a->n_heads, j->a->head_dim);
    attn_finish(j->a, t, st);
}

static void cpu_attention(pd_kernels_t *k, const pd_attn_args_t *a)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    if (!a || !a->q || !a->out || !a->pos || !a->seq || !a->k_cache || !a->v_cache ||
        !a->block_tables || a->T < 0 || a->n_seqs < 1 || a->bt_stride < 1 ||
        a->block_size < 1 || a->n_heads < 1 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || a->head_dim < 1 ||
        a->head_dim > MAX_HEAD_DIM ||
        (a->kv_dtype != PD_DTYPE_F32 && a->kv_dtype != PD_DTYPE_F16)) {
        PD_LOG_ERROR("attention: bad arguments");
        return;
    }
    double work = 0.0;
    for (int64_t t = 0; t < a->T; t++) {
        if (a->pos[t] < 0 || a->seq[t] < 0 || a->seq[t] >= a->n_seqs ||
            a->pos[t] / a->block_size >= a->bt_stride) {
            PD_LOG_ERROR("attention: query %lld at position %d of sequence %d is out of "
                         "range",
                         (long long)t, (int)a->pos[t], (int)a->seq[t]);
            return;
        }
        work += ((double)a->pos[t] + 1.0) * a->n_heads * a->head_dim * 2;
    }
    attn_job_t j = {.ck = ck,
                    .a = a,
                    .chunk = ck->isa->attn_chunk ? ck->isa->attn_chunk
                                                 : pd_cpu_attn_chunk_any,
                    .part = (size_t)a->n_heads * (size_t)(a->head_dim + 2)};
    ensure_thread_scratch(ck, ((size_t)a->n_heads * PD_ATTN_CHUNK + 2 * j.part) *
                                  sizeof(float));
    if (a->T >= 4 * ck->n_threads) {
        run(ck, a->T, work, attn_query_task, &j);
        return;
    }
    size_t first_bytes = ((size_t)a->T + 1) * sizeof(int64_t);
    first_bytes = (first_bytes + PD_CPU_ALIGN - 1) / PD_CPU_ALIGN * PD_CPU_ALIGN;
    int64_t n_chunks = 0;
    for (int64_t t = 0; t < a->T; t++)
        n_chunks += attn_n_chunks(a, t);
    uint8_t *mem = ensure_shared(ck, first_bytes + (size_t)n_chunks * j.part * sizeof(float));
    j.first = (int64_t *)mem;
    j.parts = (float *)(mem + first_bytes);
    j.first[0] = 0;
    for (int64_t t = 0; t < a->T; t++)
        j.first[t + 1] = j.first[t] + attn_n_chunks(a, t);
    run(ck, n_chunks, work, attn_split_task, &j);
    run(ck, a->T, (double)n_chunks * (double)j.part * 4, attn_fold_task, &j);
}

/* ---- construction ---------------------------------------------------------------- */

static void cpu_destroy(pd_kernels_t *k)
{
    pd_cpu_kernels_t *ck = (pd_cpu_kernels_t *)k;
    pd_threadpool_destroy(&ck->pool);
    if (ck->thread_scratch)
        for (int i = 0; i < ck->n_threads; i++)
            free(ck->thread_scratch[i]);
    free(ck->thread_scratch);
    free(ck->shared);
    free(ck->rope_freq);
    free(ck->rope_pos);
    free(ck->rope_cs);
    free(ck);
}

#if defined(PD_KERNELS_X86)
/* F16C from CPUID leaf 1 (ECX bit 29): clang before 15 has no "f16c" for
 * __builtin_cpu_supports. The OS's saving of the YMM state, which F16C's 256-bit forms
 * need, is covered by the AVX2 check beside it. */
static int cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
#endif

/* The ISA for a name, or NULL with *st set (PD_ERR_UNSUPPORTED / PD_ERR_INVALID).
 * Besides the names of ops.h, "avx512-novnni" forces AVX-512 without the VNNI kernels
 * (for tests). */
static const pd_cpu_isa_t *pick_isa(const char *name, int *vnni_p, pd_status_t *st)
{
    *vnni_p = 0;
    int want_auto = !name || strcmp(name, "auto") == 0;
    if (!want_auto && strcmp(name, "scalar") == 0)
        return &pd_cpu_isa_scalar;
#if defined(PD_KERNELS_X86)
    __builtin_cpu_init();
    int avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    if (want_auto || strcmp(name, "avx512") == 0) {
        if (avx512) {
            *vnni_p = vnni;
            return &pd_cpu_isa_avx512;
        }
        if (!want_auto) {
            *st = PD_ERR_UNSUPPORTED;
            return NULL;
        }
    }
    if (!want_auto && strcmp(name, "avx512-novnni") == 0) {
        if (avx512)
            return &pd_cpu_isa_avx512;
        *st = PD_ERR_UNSUPPORTED;
        return NULL;
    }
    if (want_auto || strcmp(name, "avx2") == 0) {
        if (avx2)
            return &pd_cpu_isa_avx2;
        if (!want_auto) {
            *st = PD_ERR_UNSUPPORTED;
            return NULL;
        }
    }
#else
    if (!want_auto && (strcmp(name, "avx2") == 0 || strcmp(name, "avx512") == 0 ||
                       strcmp(name, "avx512-novnni") == 0)) {
        *st = PD_ERR_UNSUPPORTED;
        return NULL;
    }
#endif
    if (want_auto)
        return &pd_cpu_isa_scalar;
    *st = PD_ERR_INVALID;
    return NULL;
}

pd_status_t pd_kernels_cpu_new(int n_threads, const char *isa, pd_kernels_t **k_p)
{
    if (!k_p) {
        PD_LOG_ERROR("kernels: null output pointer");
        return PD_ERR_INVALID;
    }
    pd_status_t st = PD_OK;
    int vnni;
    const pd_cpu_isa_t *impl = pick_isa(isa, &vnni, &st);
    if (!impl) {
        PD_LOG_ERROR("kernels: isa '%s': %s", isa, pd_status_str(st));
        return st;
    }
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)(n > 256 ? 256 : n) : 1;
    }
    pd_cpu_kernels_t *ck = calloc(1, sizeof *ck);
    if (!ck) {
        PD_LOG_ERROR("kernels: out of memory");
        return PD_ERR_NOMEM;
    }
    ck->isa_table = *impl;
#if defined(PD_KERNELS_X86)
    if (vnni)
        pd_cpu_avx512_vnni_patch(&ck->isa_table);
#endif
    ck->isa = &ck->isa_table;
    ck->n_threads = n_threads;
    ck->thread_scratch = calloc((size_t)n_threads, sizeof *ck->thread_scratch);
    if (!ck->thread_scratch) {
        PD_LOG_ERROR("kernels: out of memory");
        st = PD_ERR_NOMEM;
        goto err_free_kernels;
    }
    st = pd_threadpool_new(n_threads, &ck->pool);
    if (st != PD_OK)
        goto err_free_kernels;
    ck->base = (pd_kernels_t){
        .name = impl->name,
        .n_threads = n_threads,
        .matmul = cpu_matmul,
        .matmul_multi = cpu_matmul_multi,
        .get_rows = cpu_get_rows,
        .rmsnorm = cpu_rmsnorm,
        .rope = cpu_rope,
        .softmax = cpu_softmax,
        .silu_mul = cpu_silu_mul,
        .add = cpu_add,
        .kv_write = cpu_kv_write,
        .attention = cpu_attention,
        .host_run = cpu_host_run,
        .destroy = cpu_destroy,
    };
    PD_LOG_INFO("kernels: cpu backend, isa %s%s, %d threads", impl->name,
                vnni ? " (vnni)" : "", n_threads);
    *k_p = &ck->base;
    return PD_OK;

err_free_kernels:
    free(ck->thread_scratch);
    free(ck);
    return st;
}

void pd_kernels_destroy(pd_kernels_t **k_p)
{
    if (!k_p || !*k_p)
        return;
    (*k_p)->destroy(*k_p);
    *k_p = NULL;
}
