/* rpc.c - envelopes over ZeroMQ frames; see rpc.h. */
#include "common/rpc.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/utf8.h"

typedef struct method_info {
    Pd__Method method;
    Pd__Envelope__BodyCase body;
    const char *name;
} method_info_t;

static const method_info_t METHODS[] = {
    {PD__METHOD__GENERATE, PD__ENVELOPE__BODY_GENERATE, "GENERATE"},
    {PD__METHOD__CANCEL, PD__ENVELOPE__BODY_CANCEL, "CANCEL"},
    {PD__METHOD__HEALTH, PD__ENVELOPE__BODY_HEALTH, "HEALTH"},
    {PD__METHOD__STATS, PD__ENVELOPE__BODY_STATS, "STATS"},
    {PD__METHOD__CHUNK, PD__ENVELOPE__BODY_CHUNK, "CHUNK"},
    {PD__METHOD__ERROR, PD__ENVELOPE__BODY_ERROR, "ERROR"},
    {PD__METHOD__CANCEL_REPLY, PD__ENVELOPE__BODY_CANCEL_REPLY, "CANCEL_REPLY"},
    {PD__METHOD__HEALTH_REPLY, PD__ENVELOPE__BODY_HEALTH_REPLY, "HEALTH_REPLY"},
    {PD__METHOD__STATS_REPLY, PD__ENVELOPE__BODY_STATS_REPLY, "STATS_REPLY"},
    {PD__METHOD__REGISTER, PD__ENVELOPE__BODY_REGISTER, "REGISTER"},
    {PD__METHOD__REGISTER_REPLY, PD__ENVELOPE__BODY_REGISTER_REPLY, "REGISTER_REPLY"},
    {PD__METHOD__HEARTBEAT, PD__ENVELOPE__BODY_HEARTBEAT, "HEARTBEAT"},
    {PD__METHOD__DEREGISTER, PD__ENVELOPE__BODY_DEREGISTER, "DEREGISTER"},
    {PD__METHOD__PREFILL_TASK, PD__ENVELOPE__BODY_PREFILL_TASK, "PREFILL_TASK"},
    {PD__METHOD__DECODE_TASK, PD__ENVELOPE__BODY_DECODE_TASK, "DECODE_TASK"},
    {PD__METHOD__KV_TARGET, PD__ENVELOPE__BODY_KV_TARGET, "KV_TARGET"},
    {PD__METHOD__KV_READY, PD__ENVELOPE__BODY_KV_READY, "KV_READY"},
    {PD__METHOD__KV_DONE, PD__ENVELOPE__BODY_KV_DONE, "KV_DONE"},
    {PD__METHOD__KV_RELEASE, PD__ENVELOPE__BODY_KV_RELEASE, "KV_RELEASE"},
    {PD__METHOD__KV_DATA, PD__ENVELOPE__BODY_KV_DATA, "KV_DATA"},
    {PD__METHOD__TOKEN_CHUNK, PD__ENVELOPE__BODY_TOKEN_CHUNK, "TOKEN_CHUNK"},
    {PD__METHOD__TASK_CANCEL, PD__ENVELOPE__BODY_TASK_CANCEL, "TASK_CANCEL"},
    {PD__METHOD__TASK_FAILED, PD__ENVELOPE__BODY_TASK_FAILED, "TASK_FAILED"},
    {PD__METHOD__DRAIN, PD__ENVELOPE__BODY_DRAIN, "DRAIN"},
};
#define N_METHODS (sizeof METHODS / sizeof METHODS[0])

static const method_info_t *method_find(Pd__Method m)
{
    for (size_t i = 0; i < N_METHODS; i++)
        if (METHODS[i].method == m)
            return &METHODS[i];
    return NULL;
}

Pd__Envelope__BodyCase pd_rpc_body_case(Pd__Method method)
{
    const method_info_t *mi = method_find(method);
    return mi ? mi->body : PD__ENVELOPE__BODY__NOT_SET;
}

const char *pd_rpc_method_name(Pd__Method method)
{
    const method_info_t *mi = method_find(method);
    return mi ? mi->name : "UNKNOWN";
}

const char *pd_rpc_error_name(Pd__ErrorCode code)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
        &pd__error_code__descriptor, (int)code);
    return v ? v->name : "UNKNOWN_ERROR";
}

uint64_t pd_rpc_realtime_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t pd_rpc_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void pd_rpc_envelope_init(Pd__Envelope *env, Pd__Method method, uint64_t request_id)
{
    pd__envelope__init(env);
    env->version = PD_RPC_VERSION;
    env->method = method;
    env->request_id = request_id;
    env->body_case = pd_rpc_body_case(method);
}

void pd_rpc_msg_clear(pd_rpc_msg_t *m)
{
    if (m->env)
        pd__envelope__free_unpacked(m->env, NULL);
    m->env = NULL;
    if (m->has_data)
        zmq_msg_close(&m->data);
    m->has_data = false;
}

static void drain_frames(void *sock)
{
    int more = 1;
    size_t len = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return;
        }
        zmq_msg_close(&f);
        len = sizeof more;
    }
}

static bool has_more(void *sock)
{
    int more = 0;
    size_t len = sizeof more;
    return zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more;
}

static int fail(pd_rpc_msg_t *m, Pd__ErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(pd_rpc_msg_t *m, Pd__ErrorCode code, const char *fmt, ...)
{
    m->err = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->err_msg, sizeof m->err_msg, fmt, ap);
    va_end(ap);
    if (m->env)
        pd__envelope__free_unpacked(m->env, NULL);
    m->env = NULL;
    if (m->has_data)
        zmq_msg_close(&m->data);
    m->has_data = false;
    return 1;
}

/* Whether msg itself has an unknown field numbered 0 (see has_field_zero). */
static bool unknown_field_zero(const ProtobufCMessage *msg)
{
    for (unsigned i = 0; i < msg->n_unknown_fields; i++)
        if (msg->unknown_fields[i].tag == 0)
            return true;
    return false;
}

/* Whether msg, or a message inside it, holds an unknown field numbered 0. Field
 * numbers start at 1 and Google's parsers refuse 0; protobuf-c 1.4 refuses the tag
 * byte 0x00 but takes the same tag written in two bytes (0x80 0x00) as an unknown
 * field, and packs it back as 0x00: a message relayed by the router would then not
 * parse at the peer it is relayed to. Descends only through set message fields. */
static bool has_field_zero(const ProtobufCMessage *msg)
{
    if (unknown_field_zero(msg))
        return true;
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    const char *base = (const char *)msg;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n;
            ProtobufCMessage *const *v;
            memcpy(&n, base + f->quantifier_offset, sizeof n);
            memcpy(&v, base + f->offset, sizeof v);
            for (size_t j = 0; j < n; j++)
                if (v[j] && has_field_zero(v[j]))
                    return true;
            continue;
        }
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) { /* members share one slot */
            uint32_t set;
            memcpy(&set, base + f->quantifier_offset, sizeof set);
            if (set != f->id)
                continue;
        }
        const ProtobufCMessage *sub;
        memcpy(&sub, base + f->offset, sizeof sub);
        if (sub && has_field_zero(sub))
            return true;
    }
    return false;
}

/* has_field_zero for an envelope: its own unknown fields, then only its body (the
 * one message field it has; walking the ~40 members of the oneof would cost as
 * much as half the unpack). */
static bool envelope_has_field_zero(const Pd__Envelope *env)
{
    if (unknown_field_zero(&env->base))
        return true;
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(
        &pd__envelope__descriptor, env->body_case);
    if (!f || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return false;
    const ProtobufCMessage *body;
    memcpy(&body, (const char *)env + f->offset, sizeof body);
    return body && has_field_zero(body);
}

/* The request id of a bad envelope: field 3 (varint) scanned at the top level, so an
 * error reply can still name the request. */
static uint64_t scan_request_id(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t key = 0;
        int sh = 0;
        while (i < n && sh < 64) {
            key |= (uint64_t)(p[i] & 0x7f) << sh;
            sh += 7;
            if (!(p[i++] & 0x80))
                break;
        }
        uint32_t wt = key & 7, field = (uint32_t)(key >> 3);
        uint64_t v = 0;
        if (wt == 0) {
            sh = 0;
            while (i < n && sh < 64) {
                v |= (uint64_t)(p[i] & 0x7f) << sh;
                sh += 7;
                if (!(p[i++] & 0x80))
                    break;
            }
            if (field == 3)
                return v;
        } else if (wt == 1) {
            i += 8;
        } else if (wt == 5) {
            i += 4;
        } else if (wt == 2) {
            sh = 0;
            while (i < n && sh < 64) {
                v |= (uint64_t)(p[i] & 0x7f) << sh;
                sh += 7;
                if (!(p[i++] & 0x80))
                    break;
            }
            if (v > n - i)
                return 0;
            i += (size_t)v;
        } else {
            return 0;
        }
    }
    return 0;
}

int pd_rpc_recv(void *sock, bool router, size_t max_frame, size_t max_data, pd_rpc_msg_t *m)
{
    memset(m, 0, sizeof *m);
    if (!max_frame)
        max_frame = PD_RPC_MAX_FRAME_DEFAULT;
    zmq_msg_t f;
    zmq_msg_init(&f);
    if (zmq_msg_recv(&f, sock, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&f);
        return errno == EAGAIN ? 0 : -1;
    }
    if (router) {
        size_t n = zmq_msg_size(&f);
        if (n > PD_RPC_MAX_IDENT)
            n = PD_RPC_MAX_IDENT;
        memcpy(m->ident, zmq_msg_data(&f), n);
        m->ident_len = n;
        zmq_msg_close(&f);
        if (!has_more(sock))
            return fail(m, PD__ERROR_CODE__BAD_REQUEST, "empty message");
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return -1;
        }
    }
    size_t n = zmq_msg_size(&f);
    m->bytes = n;
    const uint8_t *p = zmq_msg_data(&f);
    if (n > max_frame) {
        m->err_request_id = scan_request_id(p, n < 64 ? n : 64);
        zmq_msg_close(&f);
        drain_frames(sock);
        return fail(m, PD__ERROR_CODE__TOO_LARGE, "frame of %zu bytes over the limit of %zu",
                    n, max_frame);
    }
    m->env = pd__envelope__unpack(NULL, n, p);
    if (!m->env)
        m->err_request_id = scan_request_id(p, n);
    zmq_msg_close(&f);
    if (has_more(sock)) {
        zmq_msg_init(&m->data);
        if (zmq_msg_recv(&m->data, sock, 0) < 0) {
            zmq_msg_close(&m->data);
            return fail(m, PD__ERROR_CODE__BAD_REQUEST, "data frame lost");
        }
        m->has_data = true;
        if (has_more(sock)) {
            drain_frames(sock);
            return fail(m, PD__ERROR_CODE__BAD_REQUEST, "more than two frames");
        }
    }
    if (!m->env)
        return fail(m, PD__ERROR_CODE__BAD_REQUEST, "the envelope does not parse (%zu bytes)",
                    n);
    m->err_request_id = m->env->request_id;
    if (envelope_has_field_zero(m->env))
        return fail(m, PD__ERROR_CODE__BAD_REQUEST, "%s", "a field numbered 0");
    if (m->env->version != PD_RPC_VERSION)
        return fail(m, PD__ERROR_CODE__UNSUPPORTED_VERSION,
                    "protocol version %u is not supported (this peer speaks %d)",
                    m->env->version, PD_RPC_VERSION);
    Pd__Envelope__BodyCase want = pd_rpc_body_case(m->env->method);
    if (want == PD__ENVELOPE__BODY__NOT_SET)
        return fail(m, PD__ERROR_CODE__UNKNOWN_METHOD, "unknown method %d",
                    (int)m->env->method);
    if (m->env->body_case != want)
        return fail(m, PD__ERROR_CODE__BAD_REQUEST, "method %s without its body",
                    pd_rpc_method_name(m->env->method));
    if (m->has_data) {
        if (m->env->method != PD__METHOD__KV_DATA)
            return fail(m, PD__ERROR_CODE__BAD_REQUEST, "a data frame with method %s",
                        pd_rpc_method_name(m->env->method));
        if (zmq_msg_size(&m->data) > max_data)
            return fail(m, PD__ERROR_CODE__TOO_LARGE, "data frame of %zu bytes over %zu",
                        zmq_msg_size(&m->data), max_data);
    }
    return 1;
}

static void free_buf(void *data, void *hint)
{
    (void)hint;
    free(data);
}

int pd_rpc_send(void *sock, const void *ident, size_t ident_len, const Pd__Envelope *env,
                const void *data, size_t data_len)
{
    size_t n = pd__envelope__get_packed_size(env);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        errno = ENOMEM;
        return -1;
    }
    pd__envelope__pack(env, buf);
    if (ident && zmq_send(sock, ident, ident_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        free(buf);
        return -1;
    }
    zmq_msg_t f;
    zmq_msg_init_data(&f, buf, n, free_buf, NULL);
    if (zmq_msg_send(&f, sock, ZMQ_DONTWAIT | (data ? ZMQ_SNDMORE : 0)) < 0) {
        int e = errno;
        zmq_msg_close(&f);
        errno = e;
        return -1;
    }
    if (data && zmq_send(sock, data, data_len, ZMQ_DONTWAIT) < 0)
        return -1;
    return 0;
}

int pd_rpc_send_error(void *sock, const void *ident, size_t ident_len, uint64_t request_id,
                      Pd__ErrorCode code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* a peer's string in the message, or the cut above, may not be UTF-8; a string
     * field must be (strict parsers drop the whole message): bad bytes -> U+FFFD */
    size_t len = n < 0 ? 0 : (size_t)n >= sizeof msg ? sizeof msg - 1 : (size_t)n;
    char clean[3 * sizeof msg + 1];
    pd_utf8_sanitize(msg, len, clean);
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__ERROR, request_id);
    Pd__Error err = PD__ERROR__INIT;
    err.code = code;
    err.message = clean;
    env.error = &err;
    return pd_rpc_send(sock, ident, ident_len, &env, NULL, 0);
}
