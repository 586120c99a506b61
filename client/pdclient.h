/* pdclient.h - the C client of pdserve: Generate (streamed), Cancel, Health and Stats
 * over one ZeroMQ DEALER socket connected to the router's client endpoint
 * (docs/protocol.md, "Client calls").
 *
 * Two ways to run requests, usable on the same client:
 *  - pdc_generate: one blocking, streaming call; on_chunk sees every chunk in order.
 *  - pdc_submit + pdc_poll: many requests in flight on the one socket; pdc_poll waits
 *    for replies and delivers them as events tagged with the request id (a request's
 *    last event has done = true: its finish chunk, or an error). pdc_cancel asks the
 *    router to stop one; its stream then ends with finish_reason "cancelled".
 * Replies that a blocking call (pdc_generate, pdc_health, pdc_stats) reads for other
 * requests are kept and delivered by the next pdc_poll, so the two styles mix.
 *
 * Timeouts: every request has a deadline (its timeout_ms or deadline_ms, else the
 * client's default_timeout_ms), sent on the wire so the router stops it there; the
 * client gives up grace_ms later with PDC_ERR_TIMEOUT, sends CANCEL, and forgets the
 * request (late replies to it are dropped). Health and Stats take their own timeout.
 * No call blocks longer than its timeout; none calls exit().
 *
 * Errors: calls return a pd_status_t (PD_OK, or negative) and fill a pdc_error_t:
 * a pd.ErrorCode sent by the router (code 1..99, same numbers as pd.proto) or a local
 * one (PDC_ERR_TIMEOUT and up), with a message. Every error is also logged
 * (common/log.h) where it is first seen.
 *
 * Ownership: the client owns its socket and ZeroMQ context. Pointers inside a chunk
 * or an event are valid only during the callback. A pdc_result_t and a pdc_stats_t
 * own their arrays until pdc_result_fini / pdc_stats_fini. Strings and arrays in a
 * request are read during the call only.
 * Threading: a client belongs to one thread at a time (ZeroMQ sockets are not
 * thread-safe); separate clients are independent. Callbacks run on the calling
 * thread, inside the call, and must not call back into the same client except
 * pdc_cancel. */
#ifndef PD_PDCLIENT_H
#define PD_PDCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct pdc_client pdc_client_t;

/* pd.ErrorCode values (the router's), then the client's own. */
typedef enum pdc_code {
    PDC_OK = 0,
    PDC_BAD_REQUEST = 1,
    PDC_UNSUPPORTED_VERSION = 2,
    PDC_UNKNOWN_METHOD = 3,
    PDC_TOO_LARGE = 4,
    PDC_INVALID_ARGUMENT = 5,
    PDC_UNAVAILABLE = 6,
    PDC_DEADLINE_EXCEEDED = 7,
    PDC_CANCELLED = 8,
    PDC_NOT_FOUND = 9,
    PDC_INTERNAL = 10,
    PDC_LEASE_EXPIRED = 11,
    PDC_CHECKSUM_MISMATCH = 12,
    PDC_WORKER_LOST = 13,
    PDC_REFUSED = 14,
    PDC_DUPLICATE = 15,
    PDC_ERR_TIMEOUT = 100,   /* no (complete) answer before the deadline + grace */
    PDC_ERR_TRANSPORT = 101, /* a ZeroMQ call failed */
    PDC_ERR_PROTOCOL = 102,  /* a reply that breaks the protocol (index gap, bad body) */
    PDC_ERR_ARGUMENT = 103,  /* the call's own arguments are wrong (caught locally) */
} pdc_code_t;

typedef struct pdc_error {
    pdc_code_t code;
    char message[256];
} pdc_error_t;

/* "INVALID_ARGUMENT", "TIMEOUT", ...; never NULL. */
const char *pdc_code_name(pdc_code_t code);

typedef struct pdc_options {
    uint32_t default_timeout_ms; /* of a request without its own; 0: 600000 */
    uint32_t grace_ms;           /* past a request's deadline before giving up; 0: 250 */
    uint32_t linger_ms;          /* unsent messages kept at destroy; 0: 0 */
    size_t max_frame;            /* reply frame limit; 0: PD_RPC_MAX_FRAME_DEFAULT */
} pdc_options_t;

/* Connects (asynchronously, as ZeroMQ does) to the router's client endpoint, e.g.
 * "tcp://127.0.0.1:5555". opts may be NULL. *client_p is set only on PD_OK. */
pd_status_t pdc_client_new(const char *endpoint, const pdc_options_t *opts,
                           pdc_client_t **client_p);
/* Drops every request in flight without cancelling it (the router treats a client
 * that is gone as a cancel); accepts NULL and clears *client_p. */
void pdc_client_destroy(pdc_client_t **client_p);
/* Requests submitted and not yet done. */
size_t pdc_in_flight(const pdc_client_t *client);

/* A zeroed request is valid with a prompt: max_tokens 0 is 256, temperature 0 greedy,
 * top_p/top_k/min_p 0 off, no seed (the router picks one, returned in usage). */
typedef struct pdc_request {
    const char *prompt;        /* tokenized by the router (BOS added); or: */
    const int32_t *prompt_ids; /* used verbatim when n_prompt_ids > 0 */
    size_t n_prompt_ids;
    int32_t max_tokens; /* 0: 256; -1: until the context is full */
    float temperature, top_p, min_p;
    int32_t top_k;
    uint64_t seed;
    bool has_seed;
    bool ignore_eos;
    int32_t spec_k; /* speculative decoding: 0 the worker's, -1 off, > 0 at most */
    bool no_text; /* chunks carry ids only */
    const int32_t *stop_ids;
    size_t n_stop_ids;
    uint32_t timeout_ms;  /* from submission; 0: the client's default */
    uint64_t deadline_ms; /* CLOCK_REALTIME ms; overrides timeout_ms when set */
    uint64_t trace_id;
} pdc_request_t;

typedef struct pdc_usage {
    uint32_t prompt_tokens, completion_tokens, cached_tokens, retries;
    uint64_t seed;
    uint64_t spec_proposed, spec_accepted; /* speculative decoding */
    double queue_ms, ttft_ms, e2e_ms; /* measured by the router */
    const char *prefill_worker, *decode_worker;
    const int32_t *prompt_ids; /* the prompt as tokenized */
    size_t n_prompt_ids;
} pdc_usage_t;

/* One piece of a stream: output tokens ids[index .. index + n_ids). */
typedef struct pdc_chunk {
    uint64_t request_id;
    uint32_t index;
    const int32_t *ids; /* never NULL, even when n_ids is 0 */
    size_t n_ids;
    const char *text; /* UTF-8 these ids complete, NUL-terminated */
    size_t text_len;
    const char
        *finish_reason;       /* "" until the last chunk: "stop", "length", "cancelled" */
    const pdc_usage_t *usage; /* on the last chunk, else NULL */
} pdc_chunk_t;

/* Called for each chunk, in index order. Returning nonzero cancels the request: the
 * call sends CANCEL and waits (bounded) for the end of the stream, delivering no
 * more chunks. */
typedef int (*pdc_chunk_fn)(void *user, const pdc_chunk_t *chunk);

/* What a pdc_generate produced; owned by the caller's pdc_result_t. */
typedef struct pdc_result {
    uint64_t request_id;
    int32_t *ids; /* every output id, in order */
    size_t n_ids;
    char *text; /* NUL-terminated */
    size_t text_len;
    char finish_reason[16];
    bool has_usage;
    pdc_usage_t usage;      /* its strings and prompt_ids owned by the result */
    double ttft_ms, e2e_ms; /* measured by the client, from submission */
    pdc_error_t error;      /* code PDC_OK unless the call failed */
} pdc_result_t;

/* Runs one request to its end. Returns PD_OK when the stream finished (any finish
 * reason, "cancelled" included), else a negative status with res->error set; res
 * holds what arrived either way and must be pdc_result_fini'd. */
pd_status_t pdc_generate(pdc_client_t *client, const pdc_request_t *req,
                         pdc_chunk_fn on_chunk, void *user, pdc_result_t *res);
void pdc_result_fini(pdc_result_t *res);

/* ---- asynchronous requests ---- */

typedef enum pdc_event_kind {
    PDC_EVENT_CHUNK,        /* chunk set */
    PDC_EVENT_ERROR,        /* error set; the request is over */
    PDC_EVENT_CANCEL_REPLY, /* found set: the router knew the request */
} pdc_event_kind_t;

typedef struct pdc_event {
    pdc_event_kind_t kind;
    uint64_t request_id;
    void *req_user; /* as given to pdc_submit (NULL for a CANCEL_REPLY of one done) */
    const pdc_chunk_t *chunk;
    const pdc_error_t *error;
    bool found;
    bool done; /* the request's last event: nothing more comes for it */
} pdc_event_t;

/* Returning nonzero from a CHUNK event cancels that request, as pdc_cancel does. */
typedef int (*pdc_event_fn)(void *user, const pdc_event_t *ev);

/* Sends a Generate and returns at once; *request_id_p names it in events. req_user
 * comes back in its events. On failure nothing was sent and err_p (may be NULL) says
 * why. */
pd_status_t pdc_submit(pdc_client_t *client, const pdc_request_t *req, void *req_user,
                       uint64_t *request_id_p, pdc_error_t *err_p);
/* Waits up to timeout_ms (negative: until the next event or the earliest request
 * deadline; returns 0 at once when nothing is in flight) for replies and delivers
 * every one that is queued, plus a PDC_ERR_TIMEOUT error for each request past its
 * deadline + grace. Returns the number of events delivered, or a negative
 * pd_status_t when the socket failed. */
int pdc_poll(pdc_client_t *client, int timeout_ms, pdc_event_fn on_event, void *user);
/* Sends CANCEL for an in-flight request (non-blocking). Its stream then ends with a
 * "cancelled" chunk (delivered by pdc_poll), and a CANCEL_REPLY event follows.
 * PD_ERR_NOT_FOUND for a request not in flight. */
pd_status_t pdc_cancel(pdc_client_t *client, uint64_t request_id, pdc_error_t *err_p);

/* ---- health and stats (blocking, bounded by timeout_ms; 0: 5000) ---- */

typedef struct pdc_health {
    bool ok, draining;
    uint32_t prefill_workers, decode_workers;
    char model[128];
} pdc_health_t;
pd_status_t pdc_health(pdc_client_t *client, uint32_t timeout_ms, pdc_health_t *health_p,
                       pdc_error_t *err_p);

typedef enum pdc_role {
    PDC_ROLE_UNKNOWN = 0,
    PDC_ROLE_PREFILL = 1,
    PDC_ROLE_DECODE = 2
} pdc_role_t;

typedef struct pdc_worker_stats {
    uint64_t worker_id;
    char name[96];
    pdc_role_t role;
    bool alive, draining;
    double last_heartbeat_ms_ago;
    uint32_t free_blocks, total_blocks, running, waiting;
    uint32_t reserved_blocks, held_blocks;
    uint64_t queued_prefill_tokens, tasks_done, tokens_out, kv_bytes;
    /* the worker's engine steps and their seconds: forward passes, then drawing the
     * tokens (on sample_threads host threads) */
    uint64_t steps;
    double forward_s, sample_s;
    uint32_t sample_threads;
} pdc_worker_stats_t;

typedef struct pdc_stats {
    pdc_worker_stats_t *workers; /* owned; n_workers of them */
    size_t n_workers;
    uint64_t requests_total, requests_in_flight, requests_failed, retries, tokens_out,
        bad_frames;
} pdc_stats_t;
/* *stats_p is filled on PD_OK (free it with pdc_stats_fini), zeroed otherwise. */
pd_status_t pdc_stats(pdc_client_t *client, uint32_t timeout_ms, pdc_stats_t *stats_p,
                      pdc_error_t *err_p);
void pdc_stats_fini(pdc_stats_t *stats);

#endif
