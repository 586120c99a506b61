/* test_threadpool.c - the kernel thread pool: every task runs exactly once per run,
 * across many back-to-back runs, with 0, 1 and many tasks, after the workers have
 * gone to sleep, and from pools of 1..4 threads; thread indices stay in range; every
 * worker is running when the pool is handed out. */
#include <check.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "kernels/cpu/threadpool.h"

typedef struct counts {
    atomic_int *hits; /* [n_tasks] */
    atomic_int bad_thread;
    atomic_int threads_seen[8];
    int n_threads;
} counts_t;

static void count_task(void *arg, int64_t task, int thread)
{
    counts_t *c = arg;
    atomic_fetch_add(&c->hits[task], 1);
    if (thread < 0 || thread >= c->n_threads)
        atomic_fetch_add(&c->bad_thread, 1);
    else
        atomic_store(&c->threads_seen[thread], 1);
}

static void check_runs(int n_threads, int64_t n_tasks, int runs)
{
    pd_threadpool_t *pool = NULL;
    ck_assert_int_eq(pd_threadpool_new(n_threads, &pool), PD_OK);
    ck_assert_int_eq(pd_threadpool_size(pool), n_threads);
    counts_t c = {.n_threads = n_threads};
    c.hits = calloc((size_t)(n_tasks > 0 ? n_tasks : 1), sizeof *c.hits);
    ck_assert_ptr_nonnull(c.hits);
    for (int r = 0; r < runs; r++) {
        pd_threadpool_run(pool, n_tasks, count_task, &c);
        for (int64_t t = 0; t < n_tasks; t++)
            ck_assert_int_eq(atomic_load(&c.hits[t]), r + 1);
    }
    ck_assert_int_eq(atomic_load(&c.bad_thread), 0);
    free(c.hits);
    pd_threadpool_destroy(&pool);
    ck_assert_ptr_null(pool);
}

START_TEST(test_zero_tasks)
{
    for (int n = 1; n <= 4; n++)
        check_runs(n, 0, 10);
}
END_TEST

START_TEST(test_one_task)
{
    for (int n = 1; n <= 4; n++)
        check_runs(n, 1, 1000);
}
END_TEST

START_TEST(test_many_runs)
{
    for (int n = 1; n <= 4; n++) {
        check_runs(n, 3, 5000);
        check_runs(n, 17, 2000);
    }
}
END_TEST

START_TEST(test_large)
{
    check_runs(2, 100000, 5);
    check_runs(3, 1 << 20, 2);
}
END_TEST

static void slow_task(void *arg, int64_t task, int thread)
{
    counts_t *c = arg;
    struct timespec ts = {0, 200000}; /* 0.2 ms: long enough for every thread to join */
    nanosleep(&ts, NULL);
    count_task(c, task, thread);
}

/* Workers that slept (condvar path) wake for the next run; all threads take part. */
START_TEST(test_sleep_and_wake)
{
    pd_threadpool_t *pool = NULL;
    ck_assert_int_eq(pd_threadpool_new(3, &pool), PD_OK);
    counts_t c = {.n_threads = 3};
    c.hits = calloc(64, sizeof *c.hits);
    for (int r = 0; r < 3; r++) {
        struct timespec ts = {0, 50 * 1000 * 1000}; /* longer than the spin phase */
        nanosleep(&ts, NULL);
        pd_threadpool_run(pool, 64, slow_task, &c);
        for (int t = 0; t < 64; t++)
            ck_assert_int_eq(atomic_load(&c.hits[t]), r + 1);
    }
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(atomic_load(&c.threads_seen[i]), 1);
    free(c.hits);
    pd_threadpool_destroy(&pool);
}
END_TEST

/* Every worker is running when pd_threadpool_new returns (a worker the scheduler
 * started late did its thread start-up, which allocates under ASan, inside the first
 * forward passes: test_llm's allocation-free generation failed now and then). */
START_TEST(test_workers_running_at_return)
{
    for (int round = 0; round < 20; round++) {
        pd_threadpool_t *pool = NULL;
        ck_assert_int_eq(pd_threadpool_new(8, &pool), PD_OK);
        ck_assert_int_eq(pd_threadpool_running(pool), 7);
        pd_threadpool_destroy(&pool);
    }
    ck_assert_int_eq(pd_threadpool_running(NULL), 0);
}
END_TEST

START_TEST(test_bad_args)
{
    pd_threadpool_t *pool = (pd_threadpool_t *)0x1;
    ck_assert_int_eq(pd_threadpool_new(0, &pool), PD_ERR_INVALID);
    ck_assert_ptr_eq(pool, (pd_threadpool_t *)0x1); /* untouched on failure */
    pd_threadpool_destroy(NULL);
    pd_threadpool_t *none = NULL;
    pd_threadpool_destroy(&none);
    ck_assert_int_eq(pd_threadpool_size(NULL), 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("threadpool");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_zero_tasks);
    tcase_add_test(tc, test_one_task);
    tcase_add_test(tc, test_many_runs);
    tcase_add_test(tc, test_large);
    tcase_add_test(tc, test_sleep_and_wake);
    tcase_add_test(tc, test_workers_running_at_return);
    tcase_add_test(tc, test_bad_args);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
