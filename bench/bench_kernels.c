/* bench_kernels.c - micro-benchmark of the CPU kernels at the shapes of llama2.c's
 * 110M model (dim 768, hidden 2048, 12 layers, 12 heads, vocab 32000).
 *
 * Reports (medians of --reps runs):
 *   memory     read-sum and memcpy over 1 GiB, 1 and 2 threads: the ceiling for
 *              generation, which streams every weight once per token;
 *   matvec     T = 1 over all 12 layers' matrices + the classifier (a token's worth
 *              of weights, far larger than L3): GB/s of weights streamed and the
 *              matmul-only tokens/s that implies;
 *   gemm       T = 512 over all 12 layers' matrices (from DRAM, as in a real
 *              prompt): GFLOP/s and the prompt tokens/s they imply (matmuls only;
 *              the classifier is needed for the last token alone).
 *   attn       one layer's causal attention, a 512-token prompt and one decode step.
 * Usage: bench_kernels [--isa NAME] [--threads N] [--reps R] [--only mem|mv|gemm|attn]
 *                      [--hugepages]
 * Threading: single-threaded driver; the kernels use their own pool. */
#include <pthread.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/tensor.h"
#include "kernels/ops.h"

#define DIM    768
#define HIDDEN 2048
#define LAYERS 12
#define VOCAB  32000

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void *xmalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static int use_hugepages;

/* Weights: 2 MiB aligned, and backed by transparent huge pages with --hugepages
 * (what a loader gets from madvise(MADV_HUGEPAGE)): fewer TLB misses while streaming. */
static void *weight_alloc(size_t n)
{
    size_t huge = (size_t)2 << 20, rounded = (n + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, rounded);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    if (use_hugepages)
        madvise(p, rounded, MADV_HUGEPAGE);
    return p;
}

/* ---- memory bandwidth -------------------------------------------------------------- */

typedef struct mem_arg {
    const uint64_t *src;
    uint64_t *dst;
    size_t n; /* uint64 words */
    uint64_t sum;
} mem_arg_t;

static void *read_sum(void *p)
{
    mem_arg_t *a = p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= a->n; i += 4) {
        s0 += a->src[i];
        s1 += a->src[i + 1];
        s2 += a->src[i + 2];
        s3 += a->src[i + 3];
    }
    a->sum = s0 + s1 + s2 + s3;
    return NULL;
}

static void *copy(void *p)
{
    mem_arg_t *a = p;
    memcpy(a->dst, a->src, a->n * 8);
    return NULL;
}

static double mem_run(void *(*fn)(void *), const uint64_t *src, uint64_t *dst, size_t n,
                      int n_threads)
{
    pthread_t th[8];
    mem_arg_t args[8];
    double t0 = now();
    for (int i = 0; i < n_threads; i++) {
        size_t lo = n / (size_t)n_threads * (size_t)i;
        args[i] = (mem_arg_t){
            .src = src + lo, .dst = dst ? dst + lo : NULL, .n = n / (size_t)n_threads};
        pthread_create(&th[i], NULL, fn, &args[i]);
    }
    for (int i = 0; i < n_threads; i++)
        pthread_join(th[i], NULL);
    return now() - t0;
}

static void bench_memory(int reps)
{
    size_t bytes = (size_t)1 << 30, n = bytes / 8;
    uint64_t *src = weight_alloc(bytes), *dst = weight_alloc(bytes);
    for (size_t i = 0; i < n; i++)
        src[i] = i;
    memset(dst, 1, bytes);
    for (int nt = 1; nt <= 2; nt++) {
        double tr[32], tc[32];
        for (int r = 0; r < reps; r++) {
            tr[r] = mem_run(read_sum, src, NULL, n, nt);
            tc[r] = mem_run(copy, src, dst, n, nt);
        }
        printf("memory   threads %d: read %.1f GB/s, memcpy %.1f GB/s (read+write)%s\n",
               nt, bytes / median(tr, reps) / 1e9, 2.0 * bytes / median(tc, reps) / 1e9,
               use_hugepages ? " [huge pages]" : "");
    }
    free(src);
    free(dst);
}

/* ---- weights ------------------------------------------------------------------------
 */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

static pd_tensor_t make_weight(pd_dtype_t dt, int64_t n_out, int64_t n_in)
{
    size_t rb;
    pd_dtype_row_bytes(dt, n_in, &rb);
    uint8_t *data = weight_alloc(rb * (size_t)n_out);
    float *row = xmalloc((size_t)n_in * 4);
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t i = 0; i < n_in; i++)
            row[i] = frand() * 0.1f;
        uint8_t *d = data + (size_t)o * rb;
        switch (dt) {
        case PD_DTYPE_F32:
            memcpy(d, row, (size_t)n_in * 4);
            break;
        case PD_DTYPE_Q8_0:
            pd_quantize_q8_0(row, n_in, (pd_block_q8_0_t *)d);
            break;
        case PD_DTYPE_Q4_0:
            pd_quantize_q4_0(row, n_in, (pd_block_q4_0_t *)d);
            break;
        default:
            for (int64_t i = 0; i < n_in; i++) {
                uint16_t h =
                    dt == PD_DTYPE_F16 ? pd_f32_to_fp16(row[i]) : pd_f32_to_bf16(row[i]);
                memcpy(d + 2 * i, &h, 2);
            }
        }
    }
    free(row);
    return (pd_tensor_t){.dtype = dt,
                         .n_dims = 2,
                         .ne = {n_in, n_out, 1, 1},
                         .data = data,
                         .nbytes = rb * (size_t)n_out};
}

/* The 7 matrices of a layer: wq wk wv wo (dim x dim), w1 w3 (hidden x dim), w2. */
static void make_layer(pd_dtype_t dt, pd_tensor_t w[7])
{
    for (int i = 0; i < 4; i++)
        w[i] = make_weight(dt, DIM, DIM);
    w[4] = make_weight(dt, HIDDEN, DIM);
    w[5] = make_weight(dt, HIDDEN, DIM);
    w[6] = make_weight(dt, DIM, HIDDEN);
}

static void free_layer(pd_tensor_t w[7])
{
    for (int i = 0; i < 7; i++)
        free((void *)w[i].data);
}

/* y = W x for each matrix of the layer, inputs of the right width. */
static double run_layer(pd_kernels_t *k, const pd_tensor_t w[7], const float *x,
                        int64_t T, float *y)
{
    double flops = 0;
    for (int i = 0; i < 7; i++) {
        k->matmul(k, &w[i], x, T, y);
        flops += 2.0 * (double)T * (double)w[i].ne[0] * (double)w[i].ne[1];
    }
    return flops;
}

static void bench_matvec(const char *isa, int n_threads, pd_dtype_t dt, int reps)
{
    pd_kernels_t *k = NULL;
    if (pd_kernels_cpu_new(n_threads, isa, &k) != PD_OK)
        exit(1);
    pd_tensor_t layers[LAYERS][7];
    for (int l = 0; l < LAYERS; l++)
        make_layer(dt, layers[l]);
    pd_tensor_t cls = make_weight(dt, VOCAB, DIM);
    float *x = xmalloc(HIDDEN * 4), *y = xmalloc(VOCAB * 4);
    for (int i = 0; i < HIDDEN; i++)
        x[i] = frand();
    double bytes = (double)cls.nbytes, times[32];
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < 7; i++)
            bytes += (double)layers[l][i].nbytes;
    for (int r = -1; r < reps; r++) {
        double t0 = now();
        for (int l = 0; l < LAYERS; l++)
            run_layer(k, layers[l], x, 1, y);
        k->matmul(k, &cls, x, 1, y);
        if (r >= 0)
            times[r] = now() - t0;
    }
    double t = median(times, reps);
    printf("matvec   %-6s %-5s threads %d: %6.1f GB/s  %7.1f tok/s (%.0f MB/token)\n",
           k->name, pd_dtype_name(dt), n_threads, bytes / t / 1e9, 1.0 / t, bytes / 1e6);
    for (int l = 0; l < LAYERS; l++)
        free_layer(layers[l]);
    free((void *)cls.data);
    free(x);
    free(y);
    pd_kernels_destroy(&k);
}

static void bench_gemm(const char *isa, int n_threads, pd_dtype_t dt, int64_t T, int reps)
{
    pd_kernels_t *k = NULL;
    if (pd_kernels_cpu_new(n_threads, isa, &k) != PD_OK)
        exit(1);
    pd_tensor_t layers[LAYERS][7]; /* 12 distinct layers: weights come from DRAM */
    for (int l = 0; l < LAYERS; l++)
        make_layer(dt, layers[l]);
    float *x = xmalloc((size_t)T * HIDDEN * 4), *y = xmalloc((size_t)T * HIDDEN * 4);
    for (int64_t i = 0; i < T * HIDDEN; i++)
        x[i] = frand();
    double times[32], flops = 0;
    for (int r = -1; r < reps; r++) {
        double t0 = now();
        flops = 0;
        for (int l = 0; l < LAYERS; l++)
            flops += run_layer(k, layers[l], x, T, y);
        if (r >= 0)
            times[r] = now() - t0;
    }
    double t = median(times, reps);
    printf("gemm     %-6s %-5s threads %d T %lld: %6.1f GFLOP/s  %7.0f prompt tok/s\n",
           k->name, pd_dtype_name(dt), n_threads, (long long)T, flops / t / 1e9,
           (double)T / t);
    for (int l = 0; l < LAYERS; l++)
        free_layer(layers[l]);
    free(x);
    free(y);
    pd_kernels_destroy(&k);
}

/* Causal attention over 16-row paged F32 caches at the 110M shapes: a prompt of T
 * tokens at positions 0..T-1 in one layer (its cache stays in L2/L3, as in a real
 * prompt), or one decode step at position T - 1 through all 12 layers' caches (38 MB
 * at T = 512: they come from DRAM, as in real decoding, after the weights streamed
 * through the caches). */
static void bench_attention(const char *isa, int n_threads, int64_t T, int decode,
                            pd_dtype_t kv, int reps)
{
    pd_kernels_t *k = NULL;
    if (pd_kernels_cpu_new(n_threads, isa, &k) != PD_OK)
        exit(1);
    const int heads = 12, hd = DIM / 12, bs = 16, n_layers = decode ? LAYERS : 1;
    int64_t n_blocks = (T + bs - 1) / bs;
    size_t layer_floats = (size_t)(n_blocks * bs * DIM);
    size_t es = kv == PD_DTYPE_F16 ? 2 : 4, layer_bytes = layer_floats * es;
    uint8_t *kc = weight_alloc(layer_bytes * (size_t)n_layers);
    uint8_t *vc = weight_alloc(layer_bytes * (size_t)n_layers);
    float *q = xmalloc((size_t)(T * DIM) * 4), *out = xmalloc((size_t)(T * DIM) * 4);
    int32_t *table = xmalloc((size_t)n_blocks * 4), *pos = xmalloc((size_t)T * 4);
    int32_t *seq = xmalloc((size_t)T * 4);
    memset(seq, 0, (size_t)T * 4);
    for (int64_t b = 0; b < n_blocks; b++)
        table[b] = (int32_t)(n_blocks - 1 - b);
    for (int64_t t = 0; t < T; t++)
        pos[t] = (int32_t)t;
    for (int64_t i = 0; i < T * DIM; i++)
        q[i] = frand();
    for (size_t i = 0; i < layer_floats * (size_t)n_layers; i++) {
        float a = frand(), b = frand();
        if (kv == PD_DTYPE_F16) {
            uint16_t ha = pd_f32_to_fp16(a), hb = pd_f32_to_fp16(b);
            memcpy(kc + 2 * i, &ha, 2);
            memcpy(vc + 2 * i, &hb, 2);
        } else {
            memcpy(kc + 4 * i, &a, 4);
            memcpy(vc + 4 * i, &b, 4);
        }
    }
    double times[32];
    for (int r = -1; r < reps; r++) {
        double t0 = now();
        for (int l = 0; l < n_layers; l++) {
            pd_attn_args_t a = {.q = q,
                                .out = out,
                                .T = decode ? 1 : T,
                                .pos = decode ? pos + T - 1 : pos,
                                .seq = seq,
                                .k_cache = kc + (size_t)l * layer_bytes,
                                .v_cache = vc + (size_t)l * layer_bytes,
                                .kv_dtype = kv,
                                .block_tables = table,
                                .n_seqs = 1,
                                .bt_stride = n_blocks,
                                .block_size = bs,
                                .n_heads = heads,
                                .n_kv_heads = heads,
                                .head_dim = hd,
                                .scale = 0.125f};
            k->attention(k, &a);
        }
        if (r >= 0)
            times[r] = now() - t0;
    }
    double t = median(times, reps);
    if (decode)
        printf("attn     %-6s decode at pos %lld threads %d: %7.1f us/token (12 layers, "
               "%s K/V, %.1f GB/s)\n",
               k->name, (long long)T - 1, n_threads, t * 1e6, pd_dtype_name(kv),
               2.0 * (double)T * DIM * (double)es * LAYERS / t / 1e9);
    else
        printf(
            "attn     %-6s prompt T %lld threads %d: %7.2f ms/layer (%.0f ms for 12)\n",
            k->name, (long long)T, n_threads, t * 1e3, t * 1e3 * LAYERS);
    free(kc);
    free(vc);
    free(q);
    free(out);
    free(table);
    free(pos);
    free(seq);
    pd_kernels_destroy(&k);
}

int main(int argc, char **argv)
{
    const char *isa = "auto", *only = NULL;
    int threads = 0, reps = 7;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc)
            isa = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
        else if (strcmp(argv[i], "--hugepages") == 0)
            use_hugepages = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--isa NAME] [--threads N] [--reps R] "
                    "[--only mem|mv|gemm|attn] [--hugepages]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1 || reps > 32)
        reps = 7;
    int t_lo = threads > 0 ? threads : 1, t_hi = threads > 0 ? threads : 2;
    if (!only || strcmp(only, "mem") == 0)
        bench_memory(reps < 3 ? reps : 3);
    static const pd_dtype_t mv_dts[] = {PD_DTYPE_F32, PD_DTYPE_Q8_0, PD_DTYPE_F16,
                                        PD_DTYPE_Q4_0};
    if (!only || strcmp(only, "mv") == 0)
        for (size_t d = 0; d < sizeof mv_dts / sizeof mv_dts[0]; d++)
            for (int nt = t_lo; nt <= t_hi; nt++)
                bench_matvec(isa, nt, mv_dts[d], reps);
    static const pd_dtype_t gemm_dts[] = {PD_DTYPE_F32, PD_DTYPE_F16, PD_DTYPE_Q8_0,
                                          PD_DTYPE_BF16, PD_DTYPE_Q4_0};
    if (!only || strcmp(only, "gemm") == 0)
        for (size_t d = 0; d < sizeof gemm_dts / sizeof gemm_dts[0]; d++)
            for (int nt = t_lo; nt <= t_hi; nt++)
                bench_gemm(isa, nt, gemm_dts[d], 512, reps < 5 ? reps : 5);
    if (!only || strcmp(only, "attn") == 0)
        for (int nt = t_lo; nt <= t_hi; nt++) {
            bench_attention(isa, nt, 512, 0, PD_DTYPE_F32, reps);
            bench_attention(isa, nt, 512, 1, PD_DTYPE_F32, reps);
            bench_attention(isa, nt, 512, 1, PD_DTYPE_F16, reps);
        }
    return 0;
}
