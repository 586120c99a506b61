/* threadpool.c - persistent worker threads for kernel fan-out (see threadpool.h).
 *
 * Design: a run publishes (fn, arg, n_tasks), opens a task counter tagged with a new
 * generation, and bumps the generation that idle workers watch. Workers spin on it
 * for a while (back-to-back ops cost well under a microsecond to hand out), then
 * sleep on a condition variable so an idle pool burns no CPU. Every participant,
 * the calling thread included, claims task indices from the counter with a
 * compare-and-swap that also checks the generation tag, so a thread slowed by other
 * load on the machine simply takes fewer tasks, and a worker that wakes late can never
 * run a task of a finished or later run. The caller returns once every task has
 * completed (a done counter), never waiting for workers that did not show up. When
 * the run is over the caller closes the counter (index = CLOSED) before it publishes
 * the next run, and the published fields are release-stored / acquire-loaded: a
 * worker that reads the next run's fields must then fail its compare-and-swap.
 * Lost wake-ups: a worker increments n_sleeping and re-checks the generation, both
 * seq_cst, before it waits under the mutex; run() bumps the generation, then reads
 * n_sleeping (seq_cst) and broadcasts under the mutex when anyone may be asleep.
 * Threading: one thread at a time calls run(); fn runs on up to n_threads threads. */
#include "kernels/cpu/threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "common/log.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Spin iterations (each a pause, tens of ns) before a worker sleeps: about a
 * millisecond, longer than the gap between the ops of one forward pass. */
#define SPIN_BEFORE_SLEEP 40000
/* Spins of the caller waiting for running tasks before it starts yielding the CPU. */
#define SPIN_BEFORE_YIELD 20000
/* The task counter: generation tag in the high 32 bits, next index in the low 32. */
#define CLOSED    0xffffffffu
#define MAX_BATCH ((int64_t)1 << 30)
/* How long pd_threadpool_new waits for its workers to be running. */
#define START_WAIT_S 10

typedef struct worker {
    struct pd_threadpool *pool;
    int index;
    pthread_t thread;
} worker_t;

struct pd_threadpool {
    int n_threads;     /* including the calling thread */
    worker_t *workers; /* [n_threads - 1] */
    int n_started;
    int n_running; /* workers that reached their loop (under mutex) */
    uint32_t gen;  /* the caller's copy of the current generation */

    /* The current run: release-stored by run(), acquire-loaded by workers. */
    _Atomic(pd_task_fn) fn;
    _Atomic(void *) arg;
    atomic_int_fast64_t n_tasks;
    atomic_int_fast64_t base; /* task index offset of this batch */

    _Alignas(64) atomic_uint_fast64_t counter;
    _Alignas(64) atomic_uint_fast32_t generation;
    _Alignas(64) atomic_int_fast64_t n_done;
    _Alignas(64) atomic_int n_sleeping;
    atomic_int stop;

    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t running; /* a worker reached its loop */
};

/* Claims and runs tasks of generation gen until none are left. */
static void run_tasks(pd_threadpool_t *pool, uint32_t gen, int thread)
{
    pd_task_fn fn = atomic_load_explicit(&pool->fn, memory_order_acquire);
    void *arg = atomic_load_explicit(&pool->arg, memory_order_acquire);
    int64_t n = atomic_load_explicit(&pool->n_tasks, memory_order_acquire);
    int64_t base = atomic_load_explicit(&pool->base, memory_order_acquire);
    uint64_t v = atomic_load_explicit(&pool->counter, memory_order_relaxed);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (int64_t)(v & 0xffffffffu) >= n)
            return;
        if (!atomic_compare_exchange_weak_explicit(
                &pool->counter, &v, v + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        fn(arg, base + (int64_t)(v & 0xffffffffu), thread);
        atomic_fetch_add_explicit(&pool->n_done, 1, memory_order_release);
        v = atomic_load_explicit(&pool->counter, memory_order_relaxed);
    }
}

/* Waits until the generation differs from seen; returns it (or seen when stopping). */
static uint32_t wait_generation(pd_threadpool_t *pool, uint32_t seen)
{
    for (int i = 0; i < SPIN_BEFORE_SLEEP; i++) {
        uint32_t g =
            (uint32_t)atomic_load_explicit(&pool->generation, memory_order_acquire);
        if (g != seen)
            return g;
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    atomic_fetch_add(&pool->n_sleeping, 1);
    uint32_t g;
    while ((g = (uint32_t)atomic_load(&pool->generation)) == seen &&
           !atomic_load(&pool->stop))
        pthread_cond_wait(&pool->wake, &pool->mutex);
    atomic_fetch_sub(&pool->n_sleeping, 1);
    pthread_mutex_unlock(&pool->mutex);
    return g;
}

static void *worker_main(void *p)
{
    worker_t *w = p;
    pd_threadpool_t *pool = w->pool;
    uint32_t seen = 0;
    pthread_mutex_lock(&pool->mutex);
    pool->n_running++;
    pthread_cond_signal(&pool->running);
    pthread_mutex_unlock(&pool->mutex);
    for (;;) {
        uint32_t g = wait_generation(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_acquire))
            break;
        seen = g;
        run_tasks(pool, g, w->index);
    }
    return NULL;
}

static void stop_workers(pd_threadpool_t *pool)
{
    pthread_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->generation, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->workers[i].thread, NULL);
    pool->n_started = 0;
}

pd_status_t pd_threadpool_new(int n_threads, pd_threadpool_t **pool_p)
{
    if (n_threads < 1 || n_threads > 1024 || !pool_p) {
        PD_LOG_ERROR("threadpool: bad thread count %d", n_threads);
        return PD_ERR_INVALID;
    }
    pd_threadpool_t *pool = calloc(1, sizeof *pool);
    if (!pool) {
        PD_LOG_ERROR("threadpool: out of memory");
        return PD_ERR_NOMEM;
    }
    pool->n_threads = n_threads;
    atomic_init(&pool->fn, NULL);
    atomic_init(&pool->arg, NULL);
    atomic_init(&pool->n_tasks, 0);
    atomic_init(&pool->base, 0);
    atomic_init(&pool->counter, CLOSED);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->n_done, 0);
    atomic_init(&pool->n_sleeping, 0);
    atomic_init(&pool->stop, 0);
    pd_status_t st = PD_ERR_INTERNAL;
    if (pthread_mutex_init(&pool->mutex, NULL) != 0) {
        PD_LOG_ERROR("threadpool: pthread_mutex_init failed");
        goto err_free_pool;
    }
    if (pthread_cond_init(&pool->wake, NULL) != 0) {
        PD_LOG_ERROR("threadpool: pthread_cond_init failed");
        goto err_destroy_mutex;
    }
    if (pthread_cond_init(&pool->running, NULL) != 0) {
        PD_LOG_ERROR("threadpool: pthread_cond_init failed");
        pthread_cond_destroy(&pool->wake);
        goto err_destroy_mutex;
    }
    if (n_threads > 1) {
        pool->workers = calloc((size_t)n_threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            PD_LOG_ERROR("threadpool: out of memory");
            st = PD_ERR_NOMEM;
            goto err_destroy_cond;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        worker_t *w = &pool->workers[i];
        w->pool = pool;
        w->index = i + 1;
        int rc = pthread_create(&w->thread, NULL, worker_main, w);
        if (rc != 0) {
            PD_LOG_ERROR("threadpool: pthread_create failed (%d)", rc);
            goto err_stop_workers;
        }
        pool->n_started++;
    }
    /* Every worker running before the pool is handed out: a thread the scheduler has
     * not started yet would join the first runs late (fewer hands on the first ops)
     * and do its start-up work (a sanitizer's per-thread set-up allocates) inside
     * them, which an allocation-free forward pass must not contain. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += START_WAIT_S;
    pthread_mutex_lock(&pool->mutex);
    int rc = 0;
    while (pool->n_running < pool->n_started && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&pool->running, &pool->mutex, &until);
    int running = pool->n_running;
    pthread_mutex_unlock(&pool->mutex);
    if (running < pool->n_started)
        PD_LOG_WARN("threadpool: %d of %d workers running after %d s; going on", running,
                    pool->n_started, START_WAIT_S);
    *pool_p = pool;
    return PD_OK;

err_stop_workers:
    stop_workers(pool);
    free(pool->workers);
err_destroy_cond:
    pthread_cond_destroy(&pool->running);
    pthread_cond_destroy(&pool->wake);
err_destroy_mutex:
    pthread_mutex_destroy(&pool->mutex);
err_free_pool:
    free(pool);
    return st;
}

void pd_threadpool_destroy(pd_threadpool_t **pool_p)
{
    if (!pool_p || !*pool_p)
        return;
    pd_threadpool_t *pool = *pool_p;
    stop_workers(pool);
    free(pool->workers);
    pthread_cond_destroy(&pool->running);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mutex);
    free(pool);
    *pool_p = NULL;
}

int pd_threadpool_size(const pd_threadpool_t *pool)
{
    return pool ? pool->n_threads : 0;
}

int pd_threadpool_running(pd_threadpool_t *pool)
{
    if (!pool)
        return 0;
    pthread_mutex_lock(&pool->mutex);
    int n = pool->n_running;
    pthread_mutex_unlock(&pool->mutex);
    return n;
}

static void run_batch(pd_threadpool_t *pool, int64_t base, int64_t n_tasks, pd_task_fn fn,
                      void *arg)
{
    uint32_t gen = ++pool->gen;
    if (gen == 0) /* 0 is the workers' initial "seen" value */
        gen = ++pool->gen;
    atomic_store_explicit(&pool->fn, fn, memory_order_release);
    atomic_store_explicit(&pool->arg, arg, memory_order_release);
    atomic_store_explicit(&pool->n_tasks, n_tasks, memory_order_release);
    atomic_store_explicit(&pool->base, base, memory_order_release);
    atomic_store_explicit(&pool->n_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->counter, (uint64_t)gen << 32, memory_order_release);
    /* seq_cst: orders the bump before the n_sleeping read below (see header). */
    atomic_store(&pool->generation, gen);
    if (atomic_load(&pool->n_sleeping) > 0) {
        pthread_mutex_lock(&pool->mutex);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mutex);
    }
    run_tasks(pool, gen, 0);
    for (long spins = 0;
         atomic_load_explicit(&pool->n_done, memory_order_acquire) < n_tasks; spins++) {
        if (spins < SPIN_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
    /* Close the counter: a late worker holding this generation finds nothing. */
    atomic_store(&pool->counter, ((uint64_t)gen << 32) | CLOSED);
}

void pd_threadpool_run(pd_threadpool_t *pool, int64_t n_tasks, pd_task_fn fn, void *arg)
{
    if (n_tasks <= 0)
        return;
    if (pool->n_threads == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    for (int64_t base = 0; base < n_tasks; base += MAX_BATCH)
        run_batch(pool, base, n_tasks - base < MAX_BATCH ? n_tasks - base : MAX_BATCH, fn,
                  arg);
}
