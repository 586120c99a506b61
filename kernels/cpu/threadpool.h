/* threadpool.h - a persistent pool of worker threads for kernel fan-out.
 *
 * pd_threadpool_run() splits n_tasks over the calling thread and n_threads-1
 * workers and returns when all are done. Workers spin briefly on a generation
 * counter before sleeping on a condition variable, so back-to-back ops (hundreds per
 * token) cost little synchronisation. No allocation per run.
 * Threading: one thread at a time may call run(); fn runs concurrently on up to
 * n_threads threads with distinct task indices. */
#ifndef PD_THREADPOOL_H
#define PD_THREADPOOL_H

#include <stdint.h>

#include "common/status.h"

typedef struct pd_threadpool pd_threadpool_t;

/* fn(arg, task, thread) for task in [0, n_tasks); thread in [0, n_threads). */
typedef void (*pd_task_fn)(void *arg, int64_t task, int thread);

/* Returns once every worker thread is running (or after a 10 s wait, logged), so the
 * first runs have all their threads and contain none of their start-up work. */
pd_status_t pd_threadpool_new(int n_threads, pd_threadpool_t **pool_p);
void pd_threadpool_destroy(pd_threadpool_t **pool_p);
int pd_threadpool_size(const pd_threadpool_t *pool);
/* Worker threads (n_threads - 1 at most) that have started their loop. */
int pd_threadpool_running(pd_threadpool_t *pool);
void pd_threadpool_run(pd_threadpool_t *pool, int64_t n_tasks, pd_task_fn fn, void *arg);

#endif
