/* bench_cuda.c - the CUDA backend's kernels against the GPU's own limits, in one run:
 * device-to-device copy bandwidth (the yardstick), the matvec kernel reading BF16
 * weights of the 1B preset's shapes at T = 1 (decode), paged attention (decode
 * kernel) at 4k and 32k contexts, and the prefill products (cuBLAS BF16, T = 2048)
 * in TFLOP/s. Also: the whole model's decode weight reads in the engine's launch
 * order (separate and multi matvecs, op by op and as a CUDA graph), and the decode
 * attention kernel's variants side by side. Each figure is the median of 7 timed
 * batches of back-to-back calls after a warm-up, timed on the host around a sync.
 * Prints one JSON object.
 * usage: bench_cuda [--quick] */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/tensor.h"
#include "kernels/cuda/cuda_internal.h"
#include "kernels/ops.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return v[n / 2];
}

static void *dalloc(size_t bytes)
{
    void *p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        fprintf(stderr, "bench_cuda: cudaMalloc(%zu) failed\n", bytes);
        exit(1);
    }
    cudaMemset(p, 0, bytes);
    return p;
}

/* Device memory of n random BF16 (or F32) values in [-1, 1). */
static void *drand(size_t n, size_t es)
{
    uint8_t *h = malloc(n * es);
    uint64_t s = 88172645463325252ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        float f = (float)((s >> 40) * (1.0 / (1 << 23))) - 1.0f;
        if (es == 2) {
            uint16_t b = pd_f32_to_bf16(f);
            memcpy(h + 2 * i, &b, 2);
        } else {
            memcpy(h + 4 * i, &f, 4);
        }
    }
    void *d = dalloc(n * es);
    cudaMemcpy(d, h, n * es, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
    free(h);
    return d;
}

typedef void (*op_fn)(void *ctx);

/* Seconds per call: median over 7 batches of reps calls. */
static double time_op(pd_kernels_t *k, op_fn fn, void *ctx, int reps)
{
    double t[7];
    for (int i = 0; i < reps; i++) /* warm-up */
        fn(ctx);
    k->sync(k);
    cudaDeviceSynchronize();
    for (int b = 0; b < 7; b++) {
        double t0 = now_s();
        for (int i = 0; i < reps; i++)
            fn(ctx);
        k->sync(k);
        cudaDeviceSynchronize();
        t[b] = (now_s() - t0) / reps;
    }
    return median(t, 7);
}

typedef struct copy_ctx {
    void *a, *b;
    size_t bytes;
} copy_ctx_t;

static void do_copy(void *p)
{
    copy_ctx_t *c = p;
    cudaMemcpyAsync(c->b, c->a, c->bytes, cudaMemcpyDeviceToDevice, 0);
}

typedef struct mm_ctx {
    pd_kernels_t *k;
    pd_tensor_t w;
    float *x, *y;
    int64_t T;
} mm_ctx_t;

static void do_mm(void *p)
{
    mm_ctx_t *c = p;
    c->k->matmul(c->k, &c->w, c->x, c->T, c->y);
}

/* The 1B preset's decode weight reads at T = 1, as the engine issues them: 16 layers
 * of Q, K, V, O, gate, up, down and the output matrix, each layer's weights its own
 * memory (2 GB in all: nothing stays in L2 between tokens). */
#define SEQ_LAYERS 16
typedef struct seq_ctx {
    pd_kernels_t *k;
    pd_tensor_t w[SEQ_LAYERS][7], out; /* q k v o gate up down */
    float *x, *x_ffn, *y[7], *logits;
    bool multi;
    void *graph;        /* non-NULL: launch this instead */
    bool launch_failed; /* a graph launch was refused (its timing measured nothing) */
} seq_ctx_t;

static void seq_ops(seq_ctx_t *c)
{
    pd_kernels_t *k = c->k;
    for (int l = 0; l < SEQ_LAYERS; l++) {
        pd_tensor_t *w = c->w[l];
        if (c->multi) {
            const pd_tensor_t *qkv[3] = {&w[0], &w[1], &w[2]}, *gu[2] = {&w[4], &w[5]};
            float *yq[3] = {c->y[0], c->y[1], c->y[2]}, *yg[2] = {c->y[4], c->y[5]};
            k->matmul_multi(k, qkv, yq, 3, c->x, 1);
            k->matmul(k, &w[3], c->x, 1, c->y[3]);
            k->matmul_multi(k, gu, yg, 2, c->x, 1);
        } else {
            for (int m = 0; m < 6; m++)
                k->matmul(k, &w[m], c->x, 1, c->y[m]);
        }
        k->matmul(k, &w[6], c->x_ffn, 1, c->y[6]);
    }
    k->matmul(k, &c->out, c->x, 1, c->logits);
}

static void do_seq(void *p)
{
    seq_ctx_t *c = p;
    if (c->graph) {
        if (c->k->graph_launch(c->k, c->graph) != PD_OK)
            c->launch_failed = true;
    } else
        seq_ops(c);
}

static pd_tensor_t bf16_matrix(int64_t n_out, int64_t n_in)
{
    pd_tensor_t t = {.dtype = PD_DTYPE_BF16,
                     .n_dims = 2,
                     .ne = {n_in, n_out, 1, 1},
                     .nbytes = (size_t)(n_in * n_out * 2)};
    t.data = drand((size_t)(n_in * n_out), 2);
    return t;
}

/* Prints the sequence's figures: plain launches and multi launches, each op by op and
 * recorded as one CUDA graph; returns 0, or 1 when a graph could not be recorded. */
static int bench_sequence(pd_kernels_t *k, double copy_bw, int quick)
{
    static seq_ctx_t c;
    const int64_t shape[7][2] = {{2048, 2048}, {512, 2048},  {512, 2048}, {2048, 2048},
                                 {8192, 2048}, {8192, 2048}, {2048, 8192}};
    double bytes = 0;
    c.k = k;
    for (int l = 0; l < SEQ_LAYERS; l++)
        for (int m = 0; m < 7; m++) {
            c.w[l][m] = bf16_matrix(shape[m][0], shape[m][1]);
            bytes += (double)c.w[l][m].nbytes;
        }
    c.out = bf16_matrix(32000, 2048);
    bytes += (double)c.out.nbytes;
    c.x = drand(2048, 4);
    c.x_ffn = drand(8192, 4);
    for (int m = 0; m < 7; m++)
        c.y[m] = dalloc((size_t)shape[m][0] * 4);
    c.logits = dalloc(32000 * 4);
    const char *names[4] = {"separate", "multi", "separate_graph", "multi_graph"};
    int rc = 0;
    printf(",\n \"decode_weights_bf16_T1\": {\"GB_per_token\": %.3f", bytes / 1e9);
    for (int v = 0; v < 4; v++) {
        c.multi = v & 1;
        c.graph = NULL;
        if (v >= 2) {
            void *g = NULL;
            if (!k->graph_begin || k->graph_begin(k) != PD_OK) {
                rc = 1;
                continue;
            }
            seq_ops(&c);
            if (k->graph_end(k, &g) != PD_OK || !g) {
                rc = 1;
                continue;
            }
            c.graph = g;
        }
        c.launch_failed = false;
        double t = time_op(k, do_seq, &c, quick ? 5 : 30);
        if (c.launch_failed)
            rc = 1;
        printf(", \"%s\": {\"ms_per_token\": %.3f, \"GBps\": %.1f, \"of_copy\": %.3f%s}",
               names[v], t * 1e3, bytes / t / 1e9, bytes / t / copy_bw,
               c.launch_failed ? ", \"launch_failed\": true" : "");
        if (c.graph)
            k->graph_destroy(k, c.graph);
    }
    printf("}");
    for (int l = 0; l < SEQ_LAYERS; l++)
        for (int m = 0; m < 7; m++)
            cudaFree((void *)c.w[l][m].data);
    cudaFree((void *)c.out.data);
    cudaFree(c.x);
    cudaFree(c.x_ffn);
    for (int m = 0; m < 7; m++)
        cudaFree(c.y[m]);
    cudaFree(c.logits);
    return rc;
}

/* The decode attention kernel's variants (cuda_internal.h) on the same arguments,
 * called directly on a stream of this program's own. */
typedef struct variant_ctx {
    const pd_attn_args_t *a;
    cudaStream_t s;
    float *scratch;
    int64_t max_ctx;
    int variant;
    cudaError_t err;
} variant_ctx_t;

static void do_variant(void *p)
{
    variant_ctx_t *c = p;
    cudaError_t e = pdc_attn_decode_variant(c->s, c->a, NULL, c->a->T, c->max_ctx,
                                            c->scratch, c->variant);
    if (e != cudaSuccess)
        c->err = e;
}

typedef struct attn_ctx {
    pd_kernels_t *k;
    pd_attn_args_t a;
} attn_ctx_t;

static void do_attn(void *p)
{
    attn_ctx_t *c = p;
    c->k->attention(c->k, &c->a);
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    pd_kernels_t *k = NULL;
    if (pd_kernels_cuda_new(0, false, &k) != PD_OK)
        return 1;
    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("{\"device\": \"%s\"", prop.name);

    /* 1. copy bandwidth (bytes read + written) */
    copy_ctx_t cc = {.bytes = (size_t)1 << 30};
    cc.a = dalloc(cc.bytes);
    cc.b = dalloc(cc.bytes);
    double tc = time_op(k, do_copy, &cc, quick ? 3 : 10);
    double copy_bw = 2.0 * (double)cc.bytes / tc;
    printf(",\n \"copy_GBps\": %.1f", copy_bw / 1e9);
    cudaFree(cc.a);
    cudaFree(cc.b);

    /* 2. matvec, T = 1, the 1B preset's matrices (dim 2048, hidden 8192, kv 512,
     * vocab 32000), BF16 */
    const int64_t shapes[][2] = {
        {2048, 2048}, {512, 2048}, {8192, 2048}, {2048, 8192}, {32000, 2048}};
    const char *names[] = {"wq_wo", "wk_wv", "gate_up", "down", "output"};
    printf(",\n \"matvec_bf16_T1\": {");
    double bytes_all = 0, time_all = 0;
    const int per_layer[] = {2, 2, 2, 1, 0}; /* how many of each in one layer */
    for (int s = 0; s < 5; s++) {
        mm_ctx_t m = {.k = k, .T = 1};
        int64_t n_out = shapes[s][0], n_in = shapes[s][1];
        m.w = (pd_tensor_t){.dtype = PD_DTYPE_BF16,
                            .n_dims = 2,
                            .ne = {n_in, n_out, 1, 1},
                            .nbytes = (size_t)(n_in * n_out * 2)};
        m.w.data = drand((size_t)(n_in * n_out), 2);
        m.x = drand((size_t)n_in, 4);
        m.y = dalloc((size_t)n_out * 4);
        double t = time_op(k, do_mm, &m, quick ? 20 : 200);
        double bw = (double)m.w.nbytes / t;
        bytes_all += (double)m.w.nbytes * (s < 4 ? 16 * per_layer[s] : 1);
        time_all += t * (s < 4 ? 16 * per_layer[s] : 1);
        printf("%s\"%s_%lldx%lld\": {\"us\": %.2f, \"GBps\": %.1f, \"of_copy\": %.3f}",
               s ? ", " : "", names[s], (long long)n_out, (long long)n_in, t * 1e6,
               bw / 1e9, bw / copy_bw);
        cudaFree((void *)m.w.data);
        cudaFree(m.x);
        cudaFree(m.y);
    }
    printf("},\n \"matvec_bf16_T1_whole_model\": {\"GBps\": %.1f, \"of_copy\": %.3f, "
           "\"ms_per_token\": %.3f}",
           bytes_all / time_all / 1e9, bytes_all / time_all / copy_bw, time_all * 1e3);
    int graphs_ok = bench_sequence(k, copy_bw, quick) == 0;

    /* 3. paged attention, decode queries, F16 cache, 32 heads / 8 KV heads of 64
     * (the 1B preset), block size 16 */
    printf(",\n \"attention_decode_f16\": {");
    int variants_ok = 1;
    const int64_t ctxs[] = {4096, 32768}, seqs[] = {64, 8};
    for (int ci = 0; ci < 2; ci++) {
        int64_t ctx = ctxs[ci], S = seqs[ci], bs = 16, hd = 64, nh = 32, nkv = 8;
        int64_t bt_stride = ctx / bs, n_blocks = S * bt_stride;
        int64_t row = nkv * hd;
        attn_ctx_t ac = {.k = k};
        pd_attn_args_t *a = &ac.a;
        a->T = S;
        a->n_heads = (int)nh;
        a->n_kv_heads = (int)nkv;
        a->head_dim = (int)hd;
        a->block_size = bs;
        a->n_seqs = S;
        a->bt_stride = bt_stride;
        a->kv_dtype = PD_DTYPE_F16;
        a->scale = 0.125f;
        a->k_cache = drand((size_t)(n_blocks * bs * row), 2); /* bits as BF16: any */
        a->v_cache = drand((size_t)(n_blocks * bs * row), 2);
        a->q = drand((size_t)(S * nh * hd), 4);
        a->out = dalloc((size_t)(S * nh * hd * 4));
        int32_t *pos = malloc(S * 4), *seq = malloc(S * 4), *tab = malloc(n_blocks * 4);
        for (int64_t i = 0; i < S; i++) {
            pos[i] = (int32_t)(ctx - 1);
            seq[i] = (int32_t)i;
        }
        for (int64_t i = 0; i < n_blocks; i++) /* strided: not in memory order */
            tab[i] = (int32_t)((i * 7919) % n_blocks);
        int32_t *dpos = dalloc(S * 4), *dseq = dalloc(S * 4),
                *dtab = dalloc(n_blocks * 4);
        cudaMemcpy(dpos, pos, S * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dseq, seq, S * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dtab, tab, n_blocks * 4, cudaMemcpyHostToDevice);
        cudaDeviceSynchronize();
        a->pos = dpos;
        a->seq = dseq;
        a->block_tables = dtab;
        a->pos_host = pos;
        a->seq_host = seq;
        double t = time_op(k, do_attn, &ac, quick ? 3 : 20);
        double bytes = 2.0 * (double)(S * ctx * row * 2);
        printf("%s\"ctx%lld_x%lld\": {\"us\": %.1f, \"GBps\": %.1f, \"of_copy\": %.3f",
               ci ? ", " : "", (long long)ctx, (long long)S, t * 1e6, bytes / t / 1e9,
               bytes / t / copy_bw);
        /* the kernel's variants side by side, and whether they agree bit for bit */
        variant_ctx_t vc = {.a = a, .max_ctx = ctx};
        cudaStreamCreate(&vc.s);
        vc.scratch = dalloc((size_t)pdc_attn_decode_scratch(a, S, ctx) * 4);
        size_t out_bytes = (size_t)(S * nh * hd * 4);
        float *o0 = malloc(out_bytes), *o1 = malloc(out_bytes);
        const char *vnames[2] = {"regs", "vstage"};
        for (int v = 0; v < 2; v++) {
            vc.variant = v ? PDC_ATTN_DEC_VSTAGE : PDC_ATTN_DEC_REGS;
            double tv = time_op(k, do_variant, &vc, quick ? 3 : 20);
            cudaMemcpy(v ? o1 : o0, a->out, out_bytes, cudaMemcpyDeviceToHost);
            printf(", \"%s\": {\"us\": %.1f, \"of_copy\": %.3f}", vnames[v], tv * 1e6,
                   bytes / tv / copy_bw);
        }
        int same = vc.err == cudaSuccess && !memcmp(o0, o1, out_bytes);
        int vs_runs = pdc_attn_decode_vstage_runs(a); /* else "vstage" timed REGS */
        variants_ok &= same && vs_runs == 1;
        printf(", \"variants_same_bits\": %s, \"vstage_ran\": %s}",
               same ? "true" : "false", vs_runs == 1 ? "true" : "false");
        free(o0);
        free(o1);
        cudaFree(vc.scratch);
        cudaStreamDestroy(vc.s);
        cudaFree((void *)a->k_cache);
        cudaFree((void *)a->v_cache);
        cudaFree((void *)a->q);
        cudaFree(a->out);
        cudaFree(dpos);
        cudaFree(dseq);
        cudaFree(dtab);
        free(pos);
        free(seq);
        free(tab);
    }
    printf("}");

    /* 4. prefill products: T = 2048 rows through cuBLAS (BF16, F32 accumulation and
     * output, the activations converted to BF16 first, as the backend does) */
    printf(",\n \"prefill_gemm_bf16_T2048\": {");
    double flop_all = 0, tg_all = 0;
    for (int s = 0; s < 5; s++) {
        mm_ctx_t m = {.k = k, .T = 2048};
        int64_t n_out = shapes[s][0], n_in = shapes[s][1];
        m.w = (pd_tensor_t){.dtype = PD_DTYPE_BF16,
                            .n_dims = 2,
                            .ne = {n_in, n_out, 1, 1},
                            .nbytes = (size_t)(n_in * n_out * 2)};
        m.w.data = drand((size_t)(n_in * n_out), 2);
        m.x = drand((size_t)(n_in * m.T), 4);
        m.y = dalloc((size_t)(n_out * m.T) * 4);
        double t = time_op(k, do_mm, &m, quick ? 3 : 20);
        double flop = 2.0 * (double)m.T * (double)n_in * (double)n_out;
        flop_all += flop * (s < 4 ? 16 * per_layer[s] : 0);
        tg_all += t * (s < 4 ? 16 * per_layer[s] : 0);
        printf("%s\"%s\": {\"ms\": %.3f, \"TFLOPs\": %.1f}", s ? ", " : "", names[s],
               t * 1e3, flop / t / 1e12);
        cudaFree((void *)m.w.data);
        cudaFree(m.x);
        cudaFree(m.y);
    }
    printf("},\n \"prefill_gemm_layers_TFLOPs\": %.1f", flop_all / tg_all / 1e12);
    int ok = k->sync(k) == PD_OK && graphs_ok && variants_ok;
    printf(",\n \"graphs_ok\": %s, \"attention_variants_ok\": %s, \"ok\": %s}\n",
           graphs_ok ? "true" : "false", variants_ok ? "true" : "false",
           ok ? "true" : "false");
    pd_kernels_destroy(&k);
    return ok ? 0 : 1;
}
