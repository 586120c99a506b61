/* test_kvxfer.c - the UCX KV transfer layer: gets of many sizes (1 B .. 8 MiB) and
 * offsets into registered and plain memory match the remote bytes; a peer destroyed
 * with gets in flight completes each of them exactly once and writes nothing after;
 * a SIGKILLed peer process fails later gets in bounded time; malformed addresses and
 * rkeys and out-of-range gets are refused. Every test runs twice: with UCX_TLS unset
 * (UCX picks shm/cma/tcp) and with UCX_TLS=tcp (what crosses hosts); Check forks each
 * run, and UCX reads the environment when the test creates its contexts.
 * Both ends live in one process and one thread (progressed alternately), except the
 * dead-peer test, whose remote is a forked child. */
#include <check.h>
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
#include "common/log.h"
#include "support/pdcheck.h"

#define MIB    (1024u * 1024u)
#define WAIT_S 30.0

static const char *const tls_names[] = {"default", "tcp"};

static void set_tls(int i)
{
    if (i == 0)
        unsetenv("UCX_TLS");
    else
        setenv("UCX_TLS", "tcp", 1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fill_pattern(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

/* One get's completion record. */
typedef struct rec {
    int calls;
    pd_status_t st;
} rec_t;

static void rec_done(void *user, pd_status_t st)
{
    rec_t *r = user;
    r->calls++;
    r->st = st;
}

/* The remote end (b) and the reader (a) in this process. */
typedef struct pair {
    pd_ucx_t *a, *b;
    uint8_t *remote; /* [rlen] */
    size_t rlen;
    pd_ucx_region_t *rreg; /* remote's region, on b */
    pd_ucx_peer_t *peer;   /* a's endpoint to b */
} pair_t;

static void pair_open(pair_t *pr, size_t rlen)
{
    memset(pr, 0, sizeof *pr);
    ck_assert_int_eq(pd_ucx_new(&pr->a), PD_OK);
    ck_assert_int_eq(pd_ucx_new(&pr->b), PD_OK);
    pr->rlen = rlen;
    pr->remote = aligned_alloc(4096, rlen);
    ck_assert_ptr_nonnull(pr->remote);
    fill_pattern(pr->remote, rlen, 7);
    ck_assert_int_eq(pd_ucx_region_new(pr->b, pr->remote, rlen, &pr->rreg), PD_OK);
    const void *addr, *rkey;
    size_t addr_len, rkey_len;
    ck_assert_int_eq(pd_ucx_address(pr->b, &addr, &addr_len), PD_OK);
    rkey = pd_ucx_region_rkey(pr->rreg, &rkey_len);
    uint64_t base = (uint64_t)(uintptr_t)pr->remote, len = rlen;
    ck_assert_int_eq(pd_ucx_peer_new(pr->a, addr, addr_len, 1, &rkey, &rkey_len, &base,
                                     &len, &pr->peer),
                     PD_OK);
}

static void pair_close(pair_t *pr)
{
    pd_ucx_peer_destroy(&pr->peer);
    ck_assert_ptr_null(pr->peer);
    pd_ucx_region_destroy(&pr->rreg);
    pd_ucx_destroy(&pr->a);
    pd_ucx_destroy(&pr->b);
    ck_assert_ptr_null(pr->a);
    free(pr->remote);
}

/* Progresses both ends until every record in recs[0..n) has completed (fails the test
 * after WAIT_S). */
static void wait_recs(pair_t *pr, rec_t *recs, int n)
{
    double t_end = now_s() + WAIT_S;
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++)
            left += recs[i].calls == 0;
        if (!left)
            return;
        ck_assert_msg(now_s() < t_end, "%d gets still pending after %.0f s", left,
                      WAIT_S);
        pd_ucx_progress(pr->a);
        pd_ucx_progress(pr->b);
    }
}

START_TEST(gets_match)
{
    set_tls(_i);
    pair_t pr;
    const size_t rlen = 24 * MIB;
    pair_open(&pr, rlen);
    /* local: a registered buffer and a plain (unregistered) one */
    const size_t llen = 24 * MIB;
    uint8_t *lreg_mem = aligned_alloc(4096, llen), *plain = malloc(llen);
    ck_assert_ptr_nonnull(lreg_mem);
    ck_assert_ptr_nonnull(plain);
    pd_ucx_region_t *lreg = NULL;
    ck_assert_int_eq(pd_ucx_region_new(pr.a, lreg_mem, llen, &lreg), PD_OK);
    ck_assert_ptr_eq(pd_ucx_region_base(lreg), lreg_mem);
    ck_assert_uint_eq(pd_ucx_region_len(lreg), llen);

    static const size_t sizes[] = {1,         7,          64,         4095,    4096,
                                   48 * 1024, 65536 + 3,  MIB + 3,    3 * MIB, 6 * MIB,
                                   8 * MIB,   128 * 1024, 49152 * 16, 2,       511};
    enum { N = sizeof sizes / sizeof sizes[0] };
    for (int round = 0; round < 2; round++) {
        uint8_t *dst = round == 0 ? lreg_mem : plain;
        const pd_ucx_region_t *dreg = round == 0 ? lreg : NULL;
        memset(dst, 0xa5, llen);
        rec_t recs[N] = {0};
        uint64_t roff[N];
        size_t loff[N];
        /* all in flight at once, each into its own destination range (odd offsets) */
        size_t lpos = 0;
        for (int i = 0; i < N; i++) {
            size_t n = sizes[i];
            roff[i] = ((uint64_t)i * 1234567u + (uint64_t)round * 77) % (rlen - n + 1);
            loff[i] = lpos;
            lpos += n + 13;
            ck_assert_uint_le(lpos, llen);
            ck_assert_int_eq(pd_ucx_get(pr.peer, 0, roff[i], dst + loff[i], n, dreg,
                                        rec_done, &recs[i]),
                             PD_OK);
        }
        wait_recs(&pr, recs, N);
        ck_assert_int_eq(pd_ucx_peer_pending(pr.peer), 0);
        for (int i = 0; i < N; i++) {
            ck_assert_int_eq(recs[i].calls, 1);
            ck_assert_int_eq(recs[i].st, PD_OK);
            ck_assert_msg(memcmp(dst + loff[i], pr.remote + roff[i], sizes[i]) == 0,
                          "get %d (%zu bytes at %llu, %s) differs", i, sizes[i],
                          (unsigned long long)roff[i], round ? "plain" : "registered");
            /* the gap after each range is untouched */
            ck_assert_int_eq(dst[loff[i] + sizes[i]], 0xa5);
        }
    }
    /* idle: arming succeeds within a few progress calls, the fd is a real one */
    ck_assert_int_ge(pd_ucx_fd(pr.a), 0);
    double t_end = now_s() + WAIT_S;
    while (!pd_ucx_arm(pr.a)) {
        ck_assert(now_s() < t_end);
        pd_ucx_progress(pr.a);
        pd_ucx_progress(pr.b);
    }
    ck_assert_int_eq(pd_test_n_errors, 0);
    pd_ucx_region_destroy(&lreg);
    free(lreg_mem);
    free(plain);
    pair_close(&pr);
}
END_TEST

START_TEST(destroy_completes_all)
{
    set_tls(_i);
    pair_t pr;
    pair_open(&pr, 16 * MIB);
    enum { N = 64 };
    const size_t n = 256 * 1024;
    uint8_t *dst = malloc(N * n);
    ck_assert_ptr_nonnull(dst);
    rec_t recs[N] = {0};
    /* the remote is not progressed: over TCP the gets stay in flight */
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(pd_ucx_get(pr.peer, 0, (uint64_t)i * n, dst + (size_t)i * n, n,
                                    NULL, rec_done, &recs[i]),
                         PD_OK);
    int64_t in_flight = pd_ucx_peer_pending(pr.peer);
    pd_ucx_peer_destroy(&pr.peer);
    int n_ok = 0, n_err = 0;
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(recs[i].calls, 1);
        if (recs[i].st == PD_OK) {
            n_ok++;
        } else {
            n_err++;
            ck_assert_int_eq(recs[i].st, PD_ERR_IO);
        }
    }
    ck_assert_int_ge(n_err, in_flight); /* every get pending at destroy failed */
    fprintf(stderr,
            "kvxfer %s: %lld of %d gets in flight at destroy, %d ok, %d cancelled\n",
            tls_names[_i], (long long)in_flight, N, n_ok, n_err);
    /* nothing lands afterwards, however long both ends progress */
    memset(dst, 0x5a, N * n);
    double t_end = now_s() + 0.5;
    while (now_s() < t_end) {
        pd_ucx_progress(pr.a);
        pd_ucx_progress(pr.b);
    }
    size_t bad = 0;
    while (bad < N * n && dst[bad] == 0x5a)
        bad++;
    ck_assert_msg(bad == N * n, "byte %zu written after the peer was destroyed", bad);
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(recs[i].calls, 1);
    free(dst);
    pair_close(&pr);
}
END_TEST

/* The child: owns the remote region, sends its address, rkey, base and length over
 * fd, then progresses until killed (or 60 s). */
static void child_serve(int fd, size_t rlen)
{
    pd_ucx_t *u = NULL;
    pd_ucx_region_t *r = NULL;
    uint8_t *mem = aligned_alloc(4096, rlen);
    if (!mem || pd_ucx_new(&u) != PD_OK)
        _exit(2);
    fill_pattern(mem, rlen, 9);
    if (pd_ucx_region_new(u, mem, rlen, &r) != PD_OK)
        _exit(3);
    const void *addr, *rkey;
    size_t alen, klen;
    pd_ucx_address(u, &addr, &alen);
    rkey = pd_ucx_region_rkey(r, &klen);
    uint64_t hdr[4] = {alen, klen, (uint64_t)(uintptr_t)mem, rlen};
    if (write(fd, hdr, sizeof hdr) != sizeof hdr ||
        write(fd, addr, alen) != (ssize_t)alen || write(fd, rkey, klen) != (ssize_t)klen)
        _exit(4);
    double t_end = now_s() + 60;
    while (now_s() < t_end)
        pd_ucx_progress(u);
    _exit(0);
}

static void read_all(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        ck_assert_int_eq(poll(&pfd, 1, 30000), 1);
        ssize_t k = read(fd, p, n);
        ck_assert_int_gt(k, 0);
        p += k;
        n -= (size_t)k;
    }
}

START_TEST(dead_peer_fails_gets)
{
    set_tls(_i);
    const size_t rlen = 8 * MIB;
    int sv[2];
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    pid_t pid = fork(); /* before this process touches UCX */
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(sv[0]);
        child_serve(sv[1], rlen);
    }
    close(sv[1]);
    uint64_t hdr[4];
    read_all(sv[0], hdr, sizeof hdr);
    ck_assert_uint_lt(hdr[0], 65536);
    ck_assert_uint_lt(hdr[1], 65536);
    uint8_t *addr = malloc(hdr[0]), *rkey = malloc(hdr[1]);
    read_all(sv[0], addr, hdr[0]);
    read_all(sv[0], rkey, hdr[1]);
    close(sv[0]);

    pd_ucx_t *u = NULL;
    pd_ucx_peer_t *p = NULL;
    ck_assert_int_eq(pd_ucx_new(&u), PD_OK);
    const void *rk = rkey;
    size_t rk_len = hdr[1];
    ck_assert_int_eq(
        pd_ucx_peer_new(u, addr, hdr[0], 1, &rk, &rk_len, &hdr[2], &hdr[3], &p), PD_OK);
    uint8_t *dst = malloc(rlen), *want = malloc(rlen);
    fill_pattern(want, rlen, 9);
    /* alive: a get works */
    rec_t r0 = {0};
    ck_assert_int_eq(pd_ucx_get(p, 0, 0, dst, rlen, NULL, rec_done, &r0), PD_OK);
    double t_end = now_s() + WAIT_S;
    while (r0.calls == 0 && now_s() < t_end)
        pd_ucx_progress(u);
    ck_assert_int_eq(r0.calls, 1);
    ck_assert_int_eq(r0.st, PD_OK);
    ck_assert_int_eq(memcmp(dst, want, rlen), 0);

    kill(pid, SIGKILL);
    ck_assert_int_eq(waitpid(pid, NULL, 0), pid);
    /* dead: gets keep being tried until one fails (at start or on completion) */
    enum { MAX_GETS = 4096 };
    rec_t *recs = calloc(MAX_GETS, sizeof *recs);
    int n_started = 0;
    bool failed = false;
    t_end = now_s() + WAIT_S;
    while (!failed && now_s() < t_end) {
        if (pd_ucx_peer_pending(p) < 4 && n_started < MAX_GETS) {
            pd_status_t st =
                pd_ucx_get(p, 0, 4096, dst, 64 * 1024, NULL, rec_done, &recs[n_started]);
            if (st != PD_OK) {
                ck_assert_int_eq(st, PD_ERR_IO);
                failed = true;
            } else {
                n_started++;
            }
        }
        pd_ucx_progress(u);
        for (int i = 0; i < n_started; i++)
            if (recs[i].calls && recs[i].st != PD_OK)
                failed = true;
    }
    ck_assert_msg(failed, "gets from a dead peer did not fail in %.0f s", WAIT_S);
    fprintf(stderr, "kvxfer %s: dead peer detected after %d gets, peer_failed=%d\n",
            tls_names[_i], n_started, pd_ucx_peer_failed(p));
    pd_ucx_peer_destroy(&p);
    for (int i = 0; i < n_started; i++)
        ck_assert_int_eq(recs[i].calls, 1);
    /* once the endpoint reported the failure, gets are refused at once */
    pd_ucx_destroy(&u);
    free(recs);
    free(dst);
    free(want);
    free(addr);
    free(rkey);
}
END_TEST

START_TEST(bad_inputs_refused)
{
    set_tls(_i);
    pair_t pr;
    pair_open(&pr, MIB);
    const void *addr, *rkey;
    size_t alen, klen;
    ck_assert_int_eq(pd_ucx_address(pr.b, &addr, &alen), PD_OK);
    rkey = pd_ucx_region_rkey(pr.rreg, &klen);
    uint64_t base = (uint64_t)(uintptr_t)pr.remote, len = MIB;
    pd_ucx_peer_t *q = NULL;
    uint8_t junk[512];
    fill_pattern(junk, sizeof junk, 3);

    /* garbage, truncated and corrupted addresses */
    uint8_t *abad = malloc(alen);
    memcpy(abad, addr, alen);
    abad[alen / 2] ^= 0x40;
    struct {
        const void *a;
        size_t n;
    } addrs[] = {
        {junk, sizeof junk}, {junk, 3}, {addr, alen - 1}, {abad, alen}, {NULL, 0}};
    for (size_t i = 0; i < sizeof addrs / sizeof addrs[0]; i++) {
        pd_test_n_errors = 0;
        ck_assert_int_eq(pd_ucx_peer_new(pr.a, addrs[i].a, addrs[i].n, 1, &rkey, &klen,
                                         &base, &len, &q),
                         PD_ERR_FORMAT);
        ck_assert_ptr_null(q);
        ck_assert_int_gt(pd_test_n_errors, 0);
    }
    /* garbage, truncated and corrupted rkeys */
    uint8_t *kbad = malloc(klen);
    memcpy(kbad, rkey, klen);
    kbad[klen - 1] ^= 1;
    const void *keys[] = {junk, rkey, kbad};
    size_t key_lens[] = {sizeof junk, klen - 2, klen};
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(
            pd_ucx_peer_new(pr.a, addr, alen, 1, &keys[i], &key_lens[i], &base, &len, &q),
            PD_ERR_FORMAT);
        ck_assert_ptr_null(q);
    }
    /* bad counts and lengths */
    uint64_t zero = 0, huge = UINT64_MAX;
    ck_assert_int_eq(pd_ucx_peer_new(pr.a, addr, alen, -1, &rkey, &klen, &base, &len, &q),
                     PD_ERR_INVALID);
    ck_assert_int_eq(pd_ucx_peer_new(pr.a, addr, alen, 1, NULL, NULL, NULL, NULL, &q),
                     PD_ERR_INVALID);
    ck_assert_int_eq(pd_ucx_peer_new(pr.a, addr, alen, 1, &rkey, &klen, &base, &zero, &q),
                     PD_ERR_INVALID);
    ck_assert_int_eq(pd_ucx_peer_new(pr.a, addr, alen, 1, &rkey, &klen, &base, &huge, &q),
                     PD_ERR_INVALID);
    ck_assert_ptr_null(q);

    /* out-of-range gets, refused without calling done */
    uint8_t *dst = malloc(2 * MIB);
    rec_t r = {0};
    pd_test_n_errors = 0;
    ck_assert_int_eq(pd_ucx_get(pr.peer, 1, 0, dst, 8, NULL, rec_done, &r), PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, -1, 0, dst, 8, NULL, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, MIB - 7, dst, 8, NULL, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, dst, MIB + 1, NULL, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, UINT64_MAX - 3, dst, 8, NULL, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, dst, 0, NULL, rec_done, &r),
                     PD_ERR_INVALID);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, NULL, 8, NULL, rec_done, &r),
                     PD_ERR_INVALID);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, dst, 8, NULL, NULL, &r), PD_ERR_INVALID);
    pd_ucx_region_t *lreg = NULL;
    ck_assert_int_eq(pd_ucx_region_new(pr.a, dst, MIB, &lreg), PD_OK);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, dst + MIB - 4, 8, lreg, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, 0, dst + MIB, 8, lreg, rec_done, &r),
                     PD_ERR_RANGE);
    ck_assert_int_eq(pd_test_n_errors, 10);
    ck_assert_int_eq(r.calls, 0);
    ck_assert_int_eq(pd_ucx_region_new(pr.a, NULL, 8, &lreg), PD_ERR_INVALID);
    ck_assert_ptr_nonnull(lreg); /* untouched on failure */
    /* the peer still works after all that: the exact last byte */
    ck_assert_int_eq(pd_ucx_get(pr.peer, 0, MIB - 1, dst, 1, lreg, rec_done, &r), PD_OK);
    wait_recs(&pr, &r, 1);
    ck_assert_int_eq(r.st, PD_OK);
    ck_assert_int_eq(dst[0], pr.remote[MIB - 1]);

    /* a context destroyed with a peer and regions alive cleans them up (no leak) */
    pd_ucx_peer_t *extra = NULL;
    ck_assert_int_eq(
        pd_ucx_peer_new(pr.a, addr, alen, 1, &rkey, &klen, &base, &len, &extra), PD_OK);
    pd_ucx_destroy(&pr.a);
    pr.peer = NULL; /* destroyed with pr.a */
    free(dst);
    free(abad);
    free(kbad);
    pair_close(&pr);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("kvxfer", 300, pd_test_log_setup, NULL);
    tcase_add_loop_test(tc, gets_match, 0, 2);
    tcase_add_loop_test(tc, destroy_completes_all, 0, 2);
    tcase_add_loop_test(tc, dead_peer_fails_gets, 0, 2);
    tcase_add_loop_test(tc, bad_inputs_refused, 0, 2);
    return pd_test_run("kvxfer", tc);
}
