/* membw.c - a memory read bandwidth probe for bench_cpu.py.
 *
 * Reads a buffer (default 1 GiB, far beyond the caches) with T threads, each
 * summing its contiguous slice with independent 64-bit accumulators (what a
 * bandwidth-bound matrix-vector product does with weights), and prints the best of
 * several passes as JSON: {"threads": T, "bytes": N, "gb_per_s": X}. Decode speed of
 * a model is bounded by about gb_per_s / weight bytes per token.
 * Usage: membw [threads] [MiB] [passes]. Threads: one pthread per slice. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct slice {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} slice_t;

static void *read_slice(void *arg)
{
    slice_t *s = arg;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= s->n; i += 8) {
        a0 += s->p[i];
        a1 += s->p[i + 1];
        a2 += s->p[i + 2];
        a3 += s->p[i + 3];
        a4 += s->p[i + 4];
        a5 += s->p[i + 5];
        a6 += s->p[i + 6];
        a7 += s->p[i + 7];
    }
    for (; i < s->n; i++)
        a0 += s->p[i];
    s->sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int passes = argc > 3 ? atoi(argv[3]) : 5;
    if (threads < 1 || threads > 256 || mib < 1 || passes < 1) {
        fprintf(stderr, "usage: membw [threads] [MiB] [passes]\n");
        return 2;
    }
    size_t bytes = mib << 20, n = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(bytes);
    if (!buf) {
        fprintf(stderr, "membw: cannot allocate %zu MiB\n", mib);
        return 1;
    }
    for (size_t i = 0; i < n; i++) /* fault every page in, non-zero contents */
        buf[i] = i;
    pthread_t tid[256];
    slice_t sl[256];
    double best = 0;
    uint64_t check = 0;
    for (int pass = 0; pass < passes; pass++) {
        double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            size_t lo = n * (size_t)t / (size_t)threads;
            size_t hi = n * (size_t)(t + 1) / (size_t)threads;
            sl[t] = (slice_t){buf + lo, hi - lo, 0};
            if (pthread_create(&tid[t], NULL, read_slice, &sl[t])) {
                fprintf(stderr, "membw: pthread_create failed\n");
                return 1;
            }
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            check += sl[t].sum;
        }
        double gbs = (double)bytes / (now_s() - t0) / 1e9;
        if (gbs > best)
            best = gbs;
    }
    printf("{\"threads\": %d, \"bytes\": %zu, \"gb_per_s\": %.2f, \"check\": %llu}\n",
           threads, bytes, best, (unsigned long long)(check & 0xffff));
    free(buf);
    return 0;
}
