/* test_cuda_graphs.c - decode passes replayed as CUDA graphs against the same passes
 * run op by op, on a GPU (run by tests/gpu/run.sh; CTest runs it on cudasim).
 *
 * Two llms on one CUDA backend, each over its own device KV pool with the same block
 * tables, one with cuda_graphs and one without, get the same batches of stories260K:
 * every prompt prefilled (prompt runs: never recorded), then decode steps whose batch
 * size changes (12, 5, 1 and 12 sequences), whose longest context crosses the
 * 256-position split boundary of the decode attention (a new key), speculative-like
 * steps (3 consecutive positions of each of 3 sequences, 9 logit rows), steps on the
 * argmax path, and a sweep over 24 more keys that makes the 32-graph cache evict. Every
 * step's logits (or ids) must be the same bits from both llms, and the graph llm's
 * counters must show recordings and replays and no fallback. All of it twice: F32
 * weights (matvec only) and F32 converted to BF16 (more than 8 rows go through
 * cuBLAS, recorded with its fixed workspace).
 * usage: test_cuda_graphs SHARED_DIR [cpu]; "cpu" runs the same on the CPU backend,
 * where the option is ignored (a check of the test itself). Exit status 1 on a
 * failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/kvpool.h"
#include "common/llm.h"
#include "common/model.h"
#include "kernels/ops.h"

#define N_SEQ   12
#define BS      16 /* positions per block */
#define MAX_POS 512
#define BT      (MAX_POS / BS) /* block table row */
#define MAX_T   256

static int n_checks, n_fail;

static void check(int ok, const char *what)
{
    n_checks++;
    if (!ok) {
        n_fail++;
        printf("FAIL %s\n", what);
    }
}

static uint64_t rng = 0x2545f4914f6cdd1dull;

static int32_t rand_below(int32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (int32_t)((rng >> 33) % (uint64_t)n);
}

/* The two sides and the sequences both compute. */
typedef struct side {
    pd_llm_t *llm;
    pd_kv_pool_t *pool;
} side_t;

static side_t g_on, g_off;
static int32_t tables[N_SEQ * BT]; /* [N_SEQ][BT], a shuffled block per entry */
static int32_t len[N_SEQ];         /* positions computed */
static int32_t next_tok[N_SEQ];    /* the token each sequence feeds next */
static int32_t vocab;
static int64_t max_ctx_seen[2]; /* decode steps with the longest context <= / > 256 */

/* One pass on both sides; the logits (or ids) must be equal bit for bit. Returns the
 * argmax of each logit row (from the eager side) in ids_out. */
static void both(const char *what, int64_t T, const int32_t *ids, const int32_t *pos,
                 const int32_t *seq, const int32_t *out_rows, int64_t n_out, bool use_ids,
                 int32_t *ids_out)
{
    pd_llm_batch_t b = {.T = T,
                        .ids = ids,
                        .pos = pos,
                        .seq = seq,
                        .n_seqs = N_SEQ,
                        .bt_stride = BT,
                        .block_tables = tables,
                        .out_rows = out_rows,
                        .n_out = n_out};
    char msg[160];
    if (use_ids) {
        int32_t a[MAX_T], e[MAX_T];
        pd_status_t s1 = pd_llm_forward_batch_ids(g_on.llm, g_on.pool, &b, a);
        pd_status_t s2 = pd_llm_forward_batch_ids(g_off.llm, g_off.pool, &b, e);
        snprintf(msg, sizeof msg, "%s: forward (ids) %d/%d", what, (int)s1, (int)s2);
        check(s1 == PD_OK && s2 == PD_OK, msg);
        snprintf(msg, sizeof msg, "%s: ids differ", what);
        check(s1 != PD_OK || s2 != PD_OK || !memcmp(a, e, (size_t)n_out * sizeof *a),
              msg);
        memcpy(ids_out, e, (size_t)n_out * sizeof *e);
        return;
    }
    const float *la = NULL, *le = NULL;
    pd_status_t s1 = pd_llm_forward_batch(g_on.llm, g_on.pool, &b, &la);
    pd_status_t s2 = pd_llm_forward_batch(g_off.llm, g_off.pool, &b, &le);
    snprintf(msg, sizeof msg, "%s: forward %d/%d", what, (int)s1, (int)s2);
    check(s1 == PD_OK && s2 == PD_OK, msg);
    if (s1 != PD_OK || s2 != PD_OK)
        return;
    /* each llm owns its logits buffer: both are valid here */
    int64_t bad = -1;
    for (int64_t r = 0; r < n_out && bad < 0; r++)
        if (memcmp(la + r * vocab, le + r * vocab, (size_t)vocab * sizeof(float)))
            bad = r;
    snprintf(msg, sizeof msg, "%s: logits of row %lld differ", what, (long long)bad);
    check(bad < 0, msg);
    for (int64_t r = 0; r < n_out; r++) {
        const float *l = le + r * vocab;
        int32_t best = 0;
        for (int32_t i = 1; i < vocab; i++)
            if (l[i] > l[best])
                best = i;
        ids_out[r] = best;
    }
}

/* One decode step of the sequences in list[0..n), one token each; logits for the first
 * n_out of them. */
static void decode_step(const char *what, const int32_t *list, int n, int n_out,
                        bool use_ids)
{
    int32_t ids[MAX_T] = {0}, pos[MAX_T] = {0}, seq[MAX_T] = {0}, rows[MAX_T] = {0};
    int32_t got[MAX_T] = {0};
    int64_t ctx = 0;
    for (int i = 0; i < n; i++) {
        int s = list[i];
        ids[i] = next_tok[s];
        pos[i] = len[s];
        seq[i] = s;
        rows[i] = i;
        ctx = pos[i] + 1 > ctx ? pos[i] + 1 : ctx;
    }
    max_ctx_seen[ctx > 256]++;
    both(what, n, ids, pos, seq, rows, n_out, use_ids, got);
    for (int i = 0; i < n; i++) {
        len[list[i]]++;
        next_tok[list[i]] = i < n_out ? got[i] : rand_below(vocab);
    }
}

/* Speculative-like: k consecutive rows of each of the sequences in list (a decode
 * token and k-1 proposals), every row with logits; short runs take the decode kernel
 * and may be recorded. */
static void spec_step(const char *what, const int32_t *list, int n, int k)
{
    int32_t ids[MAX_T] = {0}, pos[MAX_T] = {0}, seq[MAX_T] = {0}, rows[MAX_T] = {0};
    int32_t got[MAX_T] = {0};
    int T = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < k; j++) {
            int s = list[i];
            ids[T] = j == 0 ? next_tok[s] : rand_below(vocab);
            pos[T] = len[s] + j;
            seq[T] = s;
            rows[T] = T;
            T++;
        }
    both(what, T, ids, pos, seq, rows, T, false, got);
    for (int i = 0; i < n; i++) {
        len[list[i]] += k;
        next_tok[list[i]] = got[i * k + k - 1];
    }
}

static int run(pd_model_t *model, pd_kernels_t *k, bool gpu, const char *label)
{
    int fail0 = n_fail;
    vocab = pd_model_config(model)->vocab_size;
    pd_llm_opts_t lo = {.max_ctx = MAX_POS,
                        .max_batch_tokens = MAX_T,
                        .max_logits = 64,
                        .no_private_kv = true,
                        .cuda_graphs = true};
    pd_kv_pool_opts_t po = {
        .block_size = BS, .n_blocks = N_SEQ * BT, .kv_type = PD_KV_F32, .device = k};
    memset(&g_on, 0, sizeof g_on);
    memset(&g_off, 0, sizeof g_off);
    int ok = pd_llm_new(model, k, &lo, &g_on.llm) == PD_OK &&
             pd_kv_pool_new(model, &po, &g_on.pool) == PD_OK;
    lo.cuda_graphs = false;
    ok = ok && pd_llm_new(model, k, &lo, &g_off.llm) == PD_OK &&
         pd_kv_pool_new(model, &po, &g_off.pool) == PD_OK;
    check(ok, "create the llms and pools");
    if (!ok)
        goto out;

    /* block tables: a shuffled permutation of every block */
    for (int32_t i = 0; i < N_SEQ * BT; i++)
        tables[i] = i;
    for (int32_t i = N_SEQ * BT - 1; i > 0; i--) {
        int32_t j = rand_below(i + 1), t = tables[i];
        tables[i] = tables[j];
        tables[j] = t;
    }
    /* prompts of 236 + s tokens, one prompt run each (recorded never) */
    char what[96];
    for (int s = 0; s < N_SEQ; s++) {
        int32_t ids[MAX_T] = {0}, pos[MAX_T] = {0}, seq[MAX_T] = {0}, row, got = 0;
        int n = 236 + s;
        for (int i = 0; i < n; i++) {
            ids[i] = rand_below(vocab);
            pos[i] = i;
            seq[i] = s;
        }
        row = n - 1;
        snprintf(what, sizeof what, "%s prefill %d", label, s);
        both(what, n, ids, pos, seq, &row, 1, false, &got);
        len[s] = n;
        next_tok[s] = got;
    }
    pd_llm_graph_stats_t st0;
    pd_llm_graph_stats(g_on.llm, &st0);
    check(st0.captures == 0 && st0.replays == 0, "prompt runs were recorded");

    int32_t all[N_SEQ];
    for (int s = 0; s < N_SEQ; s++)
        all[s] = s;
    /* 12, 5, 1, 12 sequences, 12 steps each; every third step on the argmax path.
     * The longest context crosses 256 in the first phase (12 sequences) and in the
     * second (5). */
    const int phase_n[4] = {N_SEQ, 5, 1, N_SEQ};
    int step = 0;
    for (int ph = 0; ph < 4; ph++)
        for (int i = 0; i < 12; i++, step++) {
            snprintf(what, sizeof what, "%s decode phase %d step %d", label, ph, i);
            decode_step(what, all, phase_n[ph], phase_n[ph], step % 3 == 2);
        }
    /* speculative-like rows: 3 sequences x 3 positions, 4 steps */
    for (int i = 0; i < 4; i++) {
        snprintf(what, sizeof what, "%s spec step %d", label, i);
        spec_step(what, all, 3, 3);
    }
    /* 24 keys (n_out 1..12, logits and ids) over 12 sequences, twice (recorded the
     * second time), then 22 over 11 sequences, twice: the cache (32 graphs) evicts
     * recorded graphs */
    for (int n = N_SEQ; n >= N_SEQ - 1; n--)
        for (int rep = 0; rep < 2; rep++)
            for (int n_out = 1; n_out <= n; n_out++)
                for (int use_ids = 0; use_ids < 2; use_ids++) {
                    snprintf(what, sizeof what, "%s sweep %d/%d n_out %d ids %d", label,
                             n, rep, n_out, use_ids);
                    decode_step(what, all, n, n_out, use_ids);
                }

    pd_llm_graph_stats_t on, off;
    pd_llm_graph_stats(g_on.llm, &on);
    pd_llm_graph_stats(g_off.llm, &off);
    printf("%s: graphs on: %lld recorded, %lld replayed, %lld fallbacks, %lld op by op, "
           "%lld dropped, %d cached; off: %lld op by op; decode steps with the longest "
           "context <= 256: %lld, > 256: %lld\n",
           label, (long long)on.captures, (long long)on.replays, (long long)on.fallbacks,
           (long long)on.eager, (long long)on.dropped, on.cached, (long long)off.eager,
           (long long)max_ctx_seen[0], (long long)max_ctx_seen[1]);
    check(off.captures == 0 && off.replays == 0 && off.cached == 0,
          "the llm without graphs recorded some");
    check(max_ctx_seen[0] > 0 && max_ctx_seen[1] > 0,
          "the decode steps did not cross the 256-position split boundary");
    if (gpu) {
        /* A model of the cache over these steps expects 54 recorded, 35 replayed and
         * 20 evicted; the bounds leave room for scratch growth the model ignores. */
        check(on.captures >= 30, "too few passes recorded");
        check(on.replays >= 20, "too few passes replayed");
        check(on.dropped > 0, "no recorded graph was evicted");
        check(on.fallbacks == 0, "a recording or launch failed (see the log)");
        check(on.cached > 0 && on.cached <= 32, "graph cache size");
    } else {
        check(on.captures == 0 && on.replays == 0, "graphs on the CPU backend");
    }
out:
    pd_llm_destroy(&g_on.llm);
    pd_llm_destroy(&g_off.llm);
    pd_kv_pool_destroy(&g_on.pool);
    pd_kv_pool_destroy(&g_off.pool);
    max_ctx_seen[0] = max_ctx_seen[1] = 0;
    printf("%-4s %s\n", n_fail == fail0 ? "ok" : "FAIL", label);
    return n_fail == fail0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_cuda_graphs SHARED_DIR [cpu]\n");
        return 2;
    }
    bool cpu = argc > 2 && !strcmp(argv[2], "cpu");
    char path[4096];
    snprintf(path, sizeof path, "%s/models/stories260K.gguf", argv[1]);
    pd_model_t *model = NULL;
    if (pd_model_open(path, NULL, &model) != PD_OK) {
        fprintf(stderr, "test_cuda_graphs: cannot open %s\n", path);
        return 1;
    }
    for (int bf16 = 0; bf16 < 2; bf16++) {
        pd_kernels_t *k = NULL;
        pd_status_t st =
            cpu ? pd_kernels_cpu_new(2, NULL, &k) : pd_kernels_cuda_new(0, bf16 != 0, &k);
        if (st != PD_OK) {
            fprintf(stderr, "test_cuda_graphs: no %s backend\n", cpu ? "cpu" : "cuda");
            pd_model_destroy(&model);
            return 1;
        }
        run(model, k, !cpu, bf16 ? "bf16 weights" : "f32 weights");
        pd_kernels_destroy(&k);
        if (cpu)
            break; /* no bf16 conversion on the CPU */
    }
    pd_model_destroy(&model);
    printf("graphs: %d checks, %d failures\n", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
