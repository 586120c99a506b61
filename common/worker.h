/* worker.h - a pdserve worker process: the engine in the prefill or the decode role,
 * joined to a router over ZeroMQ (docs/protocol.md).
 *
 * Threads (DESIGN.md, "Threads"): the calling thread is the I/O thread (the ZeroMQ
 * socket to the router, the UCX worker, timers, signals, all from one zmq_poll loop);
 * an engine thread owns the engine (its pool, its scheduler, the kernel thread pool).
 * They meet in two mutex-guarded queues: commands to the engine (start a prefill or a
 * decode, reserve or release blocks, cancel) wake it through a condition variable;
 * events from it (a layer finished, a prompt prefilled, tokens, a finish, blocks
 * reserved, a failure) wake the I/O thread through an eventfd.
 *
 * Prefill role: a PREFILL_TASK runs as a prefill-only request; finished layers are
 * announced (KV_READY, prompts of at least --kv-layerwise-min tokens) and the prompt's
 * blocks are held for the decode worker until KV_RELEASE, TASK_CANCEL or the lease
 * ends. With the ZeroMQ transport the rows go out in KV_DATA frames instead.
 * Decode role: a DECODE_TASK reserves blocks, pulls the prompt's KV from the prefill
 * worker's blocks with UCX gets as layers are announced (or copies KV_DATA rows), checks
 * the checksum of KV_DONE against its own copy, and admits the request into the running
 * batch; tokens go back to the router as TOKEN_CHUNKs. A decode worker started with
 * --local-prefill also prefills short prompts itself (DECODE_TASK.local_prefill).
 * SIGTERM or SIGINT drains: no new tasks, running ones finish (or are handed back after
 * --drain-timeout), DEREGISTER, exit status 0.
 * Ownership: everything belongs to the worker run. Threading: as above. */
#ifndef PD_WORKER_H
#define PD_WORKER_H

#include <stdbool.h>

typedef enum pd_worker_role {
    PD_WORKER_PREFILL = 1,
    PD_WORKER_DECODE = 2,
} pd_worker_role_t;

/* Parses argv (the flags of `pd-prefill --help`), runs the worker until it drains or
 * fails, and returns the process exit status (0 after a drain, 1 on an error, 2 on a
 * usage error). */
int pd_worker_main(int argc, char **argv, pd_worker_role_t role);

#endif
