/* rpc.h - the ZeroMQ + protobuf-c glue of the service: one pd.Envelope per frame,
 * checked on receipt, so that every process answers a bad frame the same way.
 *
 * A message on the wire is [identity] [envelope] [data]: the identity frame only on
 * a ROUTER socket (ZeroMQ adds and strips it), the data frame only for KV_DATA (raw
 * KV bytes, kept out of protobuf so they are not copied twice).
 * pd_rpc_recv checks, in order: the frame count and sizes (TOO_LARGE over the limit),
 * that the envelope unpacks (BAD_REQUEST), its version (UNSUPPORTED_VERSION), that the
 * method is one of pd.Method (UNKNOWN_METHOD) and that the body is the method's own
 * (BAD_REQUEST). A message that fails keeps its identity and request id (when they
 * could be read), so the caller can answer it with pd_rpc_send_error.
 * Ownership: a pd_rpc_msg_t owns its unpacked envelope and data frame until
 * pd_rpc_msg_clear. Threading: a socket belongs to one thread, as ZeroMQ wants. */
#ifndef PD_RPC_H
#define PD_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <zmq.h>

#include "proto/pd.pb-c.h"

#define PD_RPC_VERSION 1
#define PD_RPC_MAX_IDENT 255
/* The default limit on one envelope frame (a Generate of a long prompt is ~100 KiB). */
#define PD_RPC_MAX_FRAME_DEFAULT (4u << 20)

typedef struct pd_rpc_msg {
    uint8_t ident[PD_RPC_MAX_IDENT];
    size_t ident_len;
    Pd__Envelope *env; /* NULL when the message failed a check */
    zmq_msg_t data;    /* the data frame, when has_data */
    bool has_data;
    /* why env is NULL: */
    Pd__ErrorCode err;
    char err_msg[200];
    uint64_t err_request_id; /* the request id of a bad envelope, when readable */
    size_t bytes;            /* of the envelope frame */
} pd_rpc_msg_t;

/* Receives one message without blocking. Returns 1 with *m filled (env set, or env
 * NULL and err set for a message that failed a check), 0 when nothing is queued, -1
 * on a socket error (errno). router: the socket is a ROUTER (identity frame first).
 * max_frame: the envelope frame limit (0: PD_RPC_MAX_FRAME_DEFAULT); max_data: the
 * data frame limit (0: no data frame accepted). */
int pd_rpc_recv(void *sock, bool router, size_t max_frame, size_t max_data, pd_rpc_msg_t *m);
void pd_rpc_msg_clear(pd_rpc_msg_t *m);

/* An envelope for method with the current version and the body case that goes with
 * it; the caller sets the body pointer (e.g. env->generate). */
void pd_rpc_envelope_init(Pd__Envelope *env, Pd__Method method, uint64_t request_id);

/* Packs env and sends [ident] env [data]. Non-blocking: returns 0, or -1 with errno
 * (EAGAIN when the peer's queue is full, EHOSTUNREACH for a ROUTER identity that is
 * gone with ZMQ_ROUTER_MANDATORY set). */
int pd_rpc_send(void *sock, const void *ident, size_t ident_len, const Pd__Envelope *env,
                const void *data, size_t data_len);
/* Sends an ERROR envelope (request_id echoed) with a printf-style message, cut to 511
 * bytes and made valid UTF-8 (bytes that are not: U+FFFD), as a string field must be,
 * whatever peer-supplied text it quotes. */
int pd_rpc_send_error(void *sock, const void *ident, size_t ident_len, uint64_t request_id,
                      Pd__ErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* The body case a method must carry; PD__ENVELOPE__BODY__NOT_SET for an unknown one. */
Pd__Envelope__BodyCase pd_rpc_body_case(Pd__Method method);
const char *pd_rpc_method_name(Pd__Method method);
const char *pd_rpc_error_name(Pd__ErrorCode code);

/* CLOCK_REALTIME milliseconds (deadlines on the wire) and CLOCK_MONOTONIC ones. */
uint64_t pd_rpc_realtime_ms(void);
uint64_t pd_rpc_mono_ms(void);

#endif
