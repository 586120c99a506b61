/* bench_kvxfer.c - KV transfer bandwidth through common/kvxfer: two processes (fork and
 * a socketpair for the address and rkeys) emulate the decode worker pulling a prompt's
 * KV from the prefill worker's pool.
 *
 * Shape (defaults: `pdctl mkmodel 110M`, F32 KV, block_size 16, a 2048-token prompt):
 * each pool holds K and V as [n_layers][pool_blocks][block_bytes] (block_bytes = 16 *
 * 768 * 4 = 48 KiB), both registered. The reader gets, for every layer, K then V of
 * n_blocks blocks, coalescing runs of consecutive block ids on both sides into one
 * get: "contiguous" ids make one 6 MiB get per layer per K/V, "scattered" (shuffled)
 * ids make 48 KiB gets. All gets of a run are in flight at once. Output: one JSON
 * object per mode on stdout (seconds of every run, median bytes/s). The first run of
 * each mode is checked byte for byte.
 * Threading: one thread per process; the owner progresses its worker until told to
 * stop. Usage: bench_kvxfer [runs] [layers] [n_blocks] [block_bytes] */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/kvxfer.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int die(const char *what)
{
    fprintf(stderr, "bench_kvxfer: %s\n", what);
    return 1;
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t k = read(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* The content of block b of layer l of K (kv 0) or V (kv 1) on the owner. */
static void fill_block(uint64_t *w, size_t n_words, int l, int b, int kv)
{
    uint64_t x =
        ((uint64_t)l << 40 | (uint64_t)b << 8 | (uint64_t)kv) * 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n_words; i++)
        w[i] = x + i;
}

typedef struct shape {
    int layers, n_blocks, pool_blocks;
    size_t block_bytes;
} shape_t;

static size_t region_bytes(const shape_t *s)
{
    return (size_t)s->layers * (size_t)s->pool_blocks * s->block_bytes;
}

/* The owner (prefill side): registers K and V, sends address, rkeys, bases and lengths,
 * progresses until the socket closes or says stop. */
static int owner(int fd, const shape_t *s)
{
    size_t rb = region_bytes(s);
    uint8_t *kv[2] = {aligned_alloc(4096, rb), aligned_alloc(4096, rb)};
    pd_ucx_t *u = NULL;
    pd_ucx_region_t *r[2] = {NULL, NULL};
    if (!kv[0] || !kv[1] || pd_ucx_new(&u) != PD_OK)
        return die("owner setup failed");
    for (int k = 0; k < 2; k++) {
        for (int l = 0; l < s->layers; l++)
            for (int b = 0; b < s->pool_blocks; b++)
                fill_block((uint64_t *)(kv[k] + ((size_t)l * s->pool_blocks + b) *
                                                    s->block_bytes),
                           s->block_bytes / 8, l, b, k);
        if (pd_ucx_region_new(u, kv[k], rb, &r[k]) != PD_OK)
            return die("owner region failed");
    }
    const void *addr, *rk[2];
    size_t alen, klen[2];
    pd_ucx_address(u, &addr, &alen);
    rk[0] = pd_ucx_region_rkey(r[0], &klen[0]);
    rk[1] = pd_ucx_region_rkey(r[1], &klen[1]);
    uint64_t hdr[7] = {
        alen, klen[0], klen[1], (uint64_t)(uintptr_t)kv[0], (uint64_t)(uintptr_t)kv[1],
        rb,   rb};
    if (write_all(fd, hdr, sizeof hdr) || write_all(fd, addr, alen) ||
        write_all(fd, rk[0], klen[0]) || write_all(fd, rk[1], klen[1]))
        return die("owner send failed");
    for (unsigned i = 0;; i++) {
        pd_ucx_progress(u);
        if ((i & 1023) == 0) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            if (poll(&pfd, 1, 0) != 0)
                break; /* "stop" or EOF */
        }
    }
    pd_ucx_region_destroy(&r[0]);
    pd_ucx_region_destroy(&r[1]);
    pd_ucx_destroy(&u);
    free(kv[0]);
    free(kv[1]);
    return 0;
}

static int64_t n_done, n_err;

static void on_done(void *user, pd_status_t st)
{
    (void)user;
    n_done++;
    if (st != PD_OK)
        n_err++;
}

/* One transfer: every layer's K and V of the blocks src[i] -> dst[i], runs of
 * consecutive ids on both sides coalesced. Returns seconds, or -1. */
static double transfer(pd_ucx_t *u, pd_ucx_peer_t *p, pd_ucx_region_t *const *lr,
                       uint8_t *const *lkv, const shape_t *s, const int32_t *src,
                       const int32_t *dst, int64_t *n_gets_p)
{
    size_t layer_bytes = (size_t)s->pool_blocks * s->block_bytes;
    n_done = n_err = 0;
    int64_t n_gets = 0;
    double t0 = now_s();
    for (int l = 0; l < s->layers; l++)
        for (int k = 0; k < 2; k++)
            for (int i = 0; i < s->n_blocks;) {
                int j = i + 1;
                while (j < s->n_blocks && src[j] == src[j - 1] + 1 &&
                       dst[j] == dst[j - 1] + 1)
                    j++;
                uint64_t off =
                    (uint64_t)l * layer_bytes + (uint64_t)src[i] * s->block_bytes;
                uint8_t *to =
                    lkv[k] + (size_t)l * layer_bytes + (size_t)dst[i] * s->block_bytes;
                if (pd_ucx_get(p, k, off, to, (size_t)(j - i) * s->block_bytes, lr[k],
                               on_done, NULL) != PD_OK)
                    return -1;
                n_gets++;
                i = j;
            }
    while (n_done < n_gets)
        pd_ucx_progress(u);
    double t = now_s() - t0;
    *n_gets_p = n_gets;
    (void)u;
    return n_err ? -1 : t;
}

static int verify(uint8_t *const *lkv, const shape_t *s, const int32_t *src,
                  const int32_t *dst)
{
    size_t layer_bytes = (size_t)s->pool_blocks * s->block_bytes;
    uint64_t *want = malloc(s->block_bytes);
    int bad = 0;
    for (int l = 0; l < s->layers && !bad; l++)
        for (int k = 0; k < 2 && !bad; k++)
            for (int i = 0; i < s->n_blocks && !bad; i++) {
                fill_block(want, s->block_bytes / 8, l, src[i], k);
                bad = memcmp(lkv[k] + (size_t)l * layer_bytes +
                                 (size_t)dst[i] * s->block_bytes,
                             want, s->block_bytes) != 0;
            }
    free(want);
    return bad;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void shuffle(int32_t *a, int n, uint64_t *seed)
{
    for (int i = n - 1; i > 0; i--) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        int j = (int)((*seed >> 33) % (uint64_t)(i + 1));
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static int reader(int fd, const shape_t *s, int runs)
{
    uint64_t hdr[7];
    if (read_all(fd, hdr, sizeof hdr) || hdr[0] > 65536 || hdr[1] > 65536 ||
        hdr[2] > 65536)
        return die("reader: bad header");
    uint8_t *addr = malloc(hdr[0]), *rk0 = malloc(hdr[1]), *rk1 = malloc(hdr[2]);
    if (read_all(fd, addr, hdr[0]) || read_all(fd, rk0, hdr[1]) ||
        read_all(fd, rk1, hdr[2]))
        return die("reader: short read");
    size_t rb = region_bytes(s);
    uint8_t *lkv[2] = {aligned_alloc(4096, rb), aligned_alloc(4096, rb)};
    memset(lkv[0], 0, rb);
    memset(lkv[1], 0, rb);
    pd_ucx_t *u = NULL;
    pd_ucx_region_t *lr[2] = {NULL, NULL};
    pd_ucx_peer_t *p = NULL;
    const void *rks[2] = {rk0, rk1};
    size_t rkl[2] = {hdr[1], hdr[2]};
    if (pd_ucx_new(&u) || pd_ucx_region_new(u, lkv[0], rb, &lr[0]) ||
        pd_ucx_region_new(u, lkv[1], rb, &lr[1]) ||
        pd_ucx_peer_new(u, addr, hdr[0], 2, rks, rkl, &hdr[3], &hdr[5], &p))
        return die("reader setup failed");
    const char *tls = getenv("UCX_TLS");
    int32_t *src = malloc(sizeof(int32_t) * (size_t)s->pool_blocks);
    int32_t *dst = malloc(sizeof(int32_t) * (size_t)s->pool_blocks);
    double *t = malloc(sizeof(double) * (size_t)runs);
    uint64_t seed = 42;
    int rc = 0;
    for (int mode = 0; mode < 2 && !rc; mode++) {
        int64_t n_gets = 0;
        for (int r = -1; r < runs; r++) { /* run -1: warm-up, verified */
            for (int i = 0; i < s->pool_blocks; i++)
                src[i] = dst[i] = i;
            if (mode == 1) {
                shuffle(src, s->pool_blocks, &seed);
                shuffle(dst, s->pool_blocks, &seed);
            } else { /* contiguous, at different places on the two sides */
                for (int i = 0; i < s->n_blocks; i++) {
                    src[i] = (s->pool_blocks - s->n_blocks) / 3 + i;
                    dst[i] = (s->pool_blocks - s->n_blocks) / 2 + i;
                }
            }
            double dt = transfer(u, p, lr, lkv, s, src, dst, &n_gets);
            if (dt < 0) {
                rc = die("transfer failed");
                break;
            }
            if (r < 0 && verify(lkv, s, src, dst)) {
                rc = die("transferred bytes differ");
                break;
            }
            if (r >= 0)
                t[r] = dt;
        }
        if (rc)
            break;
        double bytes = 2.0 * s->layers * s->n_blocks * (double)s->block_bytes;
        printf("{\"tls\": \"%s\", \"mode\": \"%s\", \"layers\": %d, \"blocks\": %d, "
               "\"block_bytes\": %zu, \"gets_per_run\": %lld, \"mean_get_bytes\": %.0f, "
               "\"bytes_per_run\": %.0f, \"runs_s\": [",
               tls ? tls : "default", mode ? "scattered" : "contiguous", s->layers,
               s->n_blocks, s->block_bytes, (long long)n_gets, bytes / (double)n_gets,
               bytes);
        for (int r = 0; r < runs; r++)
            printf("%s%.6f", r ? ", " : "", t[r]);
        qsort(t, (size_t)runs, sizeof *t, cmp_double);
        double med = runs % 2 ? t[runs / 2] : 0.5 * (t[runs / 2 - 1] + t[runs / 2]);
        printf("], \"median_s\": %.6f, \"median_bytes_per_s\": %.0f}\n", med,
               bytes / med);
        fflush(stdout);
    }
    pd_ucx_peer_destroy(&p);
    pd_ucx_region_destroy(&lr[0]);
    pd_ucx_region_destroy(&lr[1]);
    pd_ucx_destroy(&u);
    free(lkv[0]);
    free(lkv[1]);
    free(addr);
    free(rk0);
    free(rk1);
    free(src);
    free(dst);
    free(t);
    return rc;
}

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 9;
    shape_t s = {
        .layers = argc > 2 ? atoi(argv[2]) : 12,
        .n_blocks = argc > 3 ? atoi(argv[3]) : 128,
        .block_bytes = argc > 4 ? (size_t)atol(argv[4]) : 16 * 768 * 4,
    };
    if (runs < 1 || s.layers < 1 || s.n_blocks < 1 || s.block_bytes < 8 ||
        s.block_bytes % 8)
        return die("usage: bench_kvxfer [runs] [layers] [n_blocks] [block_bytes]");
    s.pool_blocks = 2 * s.n_blocks; /* room for scattered ids and disjoint runs */
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
        return die("socketpair failed");
    pid_t pid = fork();
    if (pid < 0)
        return die("fork failed");
    if (pid == 0) {
        close(sv[0]);
        _exit(owner(sv[1], &s));
    }
    close(sv[1]);
    int rc = reader(sv[0], &s, runs);
    char stop = 'q';
    if (write_all(sv[0], &stop, 1))
        kill(pid, SIGKILL);
    int ws = 0;
    waitpid(pid, &ws, 0);
    close(sv[0]);
    if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0)
        rc = rc ? rc : die("owner failed");
    return rc;
}
