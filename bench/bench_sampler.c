/* bench_sampler.c - micro-benchmark of pd_sampler_sample, the host-side draw that every
 * sampled (temperature > 0) sequence makes each step: on a GPU its logits cross to the
 * host and this runs once per sequence on the host's sampling threads, so at 256
 * sequences its cost is multiplied by 256 (and divided among those threads).
 *
 * For vocabularies of 512 (stories260K), 32000 (Llama-2, the mkmodel presets) and
 * 128256 (Llama-3), logits that are flat (normal, sd 3: top-p reaches thousands of
 * candidates), peaked (a real model's shape: a few dozen carry the mass) and uniform
 * (normal, sd 0.05: a random model's, as llama-2-tiny-random.gguf gives; top-p reaches
 * nearly all of them), and four common settings, it reports the median microseconds
 * per draw of
 *   pdserve    pd_sampler_sample;
 *   full-sort  the same rule with every candidate sorted by qsort first (the plain
 *              way; a peer in the same run, on the same logits).
 * Both draw the same tokens from the same seed (a checksum of the tokens says so).
 * Usage: bench_sampler [--reps R] [--draws N]
 * Threading: one thread. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/rng.h"
#include "common/sampler.h"

typedef struct cand {
    float p;
    int32_t id;
} cand_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_desc(const void *a, const void *b)
{
    const cand_t *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The peer: softmax, min-p, every candidate sorted, top-p, draw (no top-k: the
 * settings below that use it are left to pdserve alone). */
static int32_t full_sort_sample(pd_rng_t *g, const float *l, int n,
                                const pd_sampler_params_t *sp, cand_t *c)
{
    float max = l[0];
    for (int i = 1; i < n; i++)
        max = l[i] > max ? l[i] : max;
    float inv_t = 1.0f / sp->temperature, total = 0.0f;
    int m = 0;
    for (int i = 0; i < n; i++) {
        float e = expf((l[i] - max) * inv_t);
        if (sp->min_p > 0.0f && !(e >= sp->min_p))
            continue;
        c[m].p = e;
        c[m++].id = i;
    }
    for (int i = 0; i < m; i++)
        total += c[i].p;
    qsort(c, (size_t)m, sizeof *c, cmp_desc);
    int k = m;
    if (sp->top_p < 1.0f) {
        float cum = 0.0f, limit = sp->top_p * total;
        k = 0;
        while (k < m && cum < limit)
            cum += c[k++].p;
        total = cum < total ? cum : total;
    }
    float r = pd_rng_float(g) * total, acc = 0.0f;
    for (int i = 0; i < k; i++) {
        acc += c[i].p;
        if (r < acc)
            return c[i].id;
    }
    return c[k - 1].id;
}

int main(int argc, char **argv)
{
    int reps = 7, draws = 100;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--draws"))
            draws = atoi(argv[i + 1]);
    }
    if (reps < 1 || reps > 101 || draws < 1) {
        fprintf(stderr, "usage: bench_sampler [--reps 1..101] [--draws N]\n");
        return 2;
    }
    const int vocabs[] = {512, 32000, 128256};
    const char *shapes[] = {"flat", "peaked", "uniform"};
    const struct {
        const char *name;
        float t, top_p, min_p;
        int32_t top_k;
    } sets[] = {{"T=0.8 top_p=0.95", 0.8f, 0.95f, 0.0f, 0},
                {"T=1", 1.0f, 1.0f, 0.0f, 0},
                {"T=0.8 min_p=0.05", 0.8f, 1.0f, 0.05f, 0},
                {"T=0.7 top_k=40 top_p=0.9", 0.7f, 0.9f, 0.0f, 40}};
    float *l = malloc(128256 * sizeof *l);
    cand_t *c = malloc(128256 * sizeof *c);
    double *t_us = malloc((size_t)reps * sizeof *t_us);
    if (!l || !c || !t_us)
        return 1;
    printf("%-7s %-7s %-26s %12s %12s %8s\n", "vocab", "logits", "setting", "pdserve us",
           "full-sort us", "speedup");
    for (size_t vi = 0; vi < sizeof vocabs / sizeof *vocabs; vi++)
        for (int shape = 0; shape < 3; shape++) {
            int n = vocabs[vi];
            pd_rng_t g;
            pd_rng_seed(&g, 11);
            for (int i = 0; i < n; i++) {
                float u = pd_rng_float(&g) + 1e-7f, v = pd_rng_float(&g);
                float z = sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
                l[i] = shape == 1   ? z + (i % 1000 == 7 ? 9.0f + (float)(i % 13) : 0.0f)
                       : shape == 2 ? 0.05f * z
                                    : 3.0f * z;
            }
            for (size_t si = 0; si < sizeof sets / sizeof *sets; si++) {
                pd_sampler_params_t sp = pd_sampler_params_default();
                sp.temperature = sets[si].t;
                sp.top_p = sets[si].top_p;
                sp.min_p = sets[si].min_p;
                sp.top_k = sets[si].top_k;
                sp.seed = 3;
                pd_sampler_t *s = NULL;
                if (pd_sampler_new(n, &sp, &s) != PD_OK)
                    return 1;
                double med[2] = {0, 0};
                uint64_t sum[2] = {0, 0};
                for (int who = 0; who < (sp.top_k ? 1 : 2); who++) {
                    for (int r = 0; r < reps; r++) {
                        pd_rng_t ref;
                        pd_rng_seed(&ref, sp.seed);
                        pd_sampler_reseed(s, sp.seed);
                        uint64_t h = 0;
                        double t0 = now_s();
                        for (int d = 0; d < draws; d++) {
                            int32_t tok = who ? full_sort_sample(&ref, l, n, &sp, c)
                                              : pd_sampler_sample(s, l);
                            h = h * 31 + (uint64_t)tok;
                        }
                        t_us[r] = (now_s() - t0) * 1e6 / draws;
                        sum[who] = h;
                    }
                    qsort(t_us, (size_t)reps, sizeof *t_us, cmp_double);
                    med[who] = t_us[reps / 2];
                }
                pd_sampler_destroy(&s);
                if (sp.top_k) {
                    printf("%-7d %-7s %-26s %12.1f %12s %8s\n", n, shapes[shape],
                           sets[si].name, med[0], "-", "-");
                    continue;
                }
                if (sum[0] != sum[1]) {
                    fprintf(stderr,
                            "bench_sampler: the draws differ from a full sort's\n");
                    return 1;
                }
                printf("%-7d %-7s %-26s %12.1f %12.1f %7.1fx\n", n, shapes[shape],
                       sets[si].name, med[0], med[1], med[1] / med[0]);
            }
        }
    free(l);
    free(c);
    free(t_us);
    return 0;
}
