/* test_rpc.c - the envelope checks every process applies (common/rpc.h), over a real
 * ZeroMQ DEALER/ROUTER pair on inproc: a good envelope arrives whole with the sender's
 * identity; garbage, a wrong version, an unknown method, a body that is not the
 * method's, an oversized frame, a third frame and a data frame on a method other than
 * KV_DATA are each refused with their error code (and the request id when it could
 * be read); KV_DATA keeps its data frame; an error reply reaches the sender, its
 * message valid UTF-8 whatever bytes it quotes and wherever the length limit cuts. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common/rpc.h"
#include "common/utf8.h"
#include "support/pdcheck.h"

static void *ctx, *router, *dealer;

static void setup(void)
{
    pd_test_log_setup();
    ctx = zmq_ctx_new();
    router = zmq_socket(ctx, ZMQ_ROUTER);
    dealer = zmq_socket(ctx, ZMQ_DEALER);
    ck_assert_int_eq(zmq_bind(router, "inproc://rpc"), 0);
    ck_assert_int_eq(zmq_setsockopt(dealer, ZMQ_ROUTING_ID, "client-7", 8), 0);
    ck_assert_int_eq(zmq_connect(dealer, "inproc://rpc"), 0);
}

static void teardown(void)
{
    int zero = 0;
    zmq_setsockopt(router, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(dealer, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(router);
    zmq_close(dealer);
    zmq_ctx_term(ctx);
}

/* Receives one message on the router, waiting up to a second. */
static int recv_one(pd_rpc_msg_t *m, size_t max_frame, size_t max_data)
{
    zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
    ck_assert_int_eq(zmq_poll(&it, 1, 1000), 1);
    return pd_rpc_recv(router, true, max_frame, max_data, m);
}

static void send_raw(const void *a, size_t na, const void *b, size_t nb, const void *c,
                     size_t nc)
{
    ck_assert_int_ge(zmq_send(dealer, a, na, b ? ZMQ_SNDMORE : 0), 0);
    if (b)
        ck_assert_int_ge(zmq_send(dealer, b, nb, c ? ZMQ_SNDMORE : 0), 0);
    if (c)
        ck_assert_int_ge(zmq_send(dealer, c, nc, 0), 0);
}

static size_t pack_env(Pd__Envelope *env, uint8_t *buf, size_t cap)
{
    size_t n = pd__envelope__get_packed_size(env);
    ck_assert_uint_le(n, cap);
    pd__envelope__pack(env, buf);
    return n;
}

START_TEST(good_envelope_arrives)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__GENERATE, 42);
    Pd__GenerateRequest g = PD__GENERATE_REQUEST__INIT;
    int32_t ids[3] = {1, 2, 3};
    g.prompt_ids = ids;
    g.n_prompt_ids = 3;
    g.max_tokens = 9;
    env.generate = &g;
    env.trace_id = 77;
    ck_assert_int_eq(pd_rpc_send(dealer, NULL, 0, &env, NULL, 0), 0);
    pd_rpc_msg_t m;
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_ptr_nonnull(m.env);
    ck_assert_uint_eq(m.ident_len, 8);
    ck_assert(memcmp(m.ident, "client-7", 8) == 0);
    ck_assert_int_eq(m.env->method, PD__METHOD__GENERATE);
    ck_assert_uint_eq(m.env->request_id, 42);
    ck_assert_uint_eq(m.env->trace_id, 77);
    ck_assert_uint_eq(m.env->generate->n_prompt_ids, 3);
    ck_assert_int_eq(m.env->generate->prompt_ids[2], 3);
    ck_assert_int_eq(m.env->generate->max_tokens, 9);
    /* an error reply goes back to that identity */
    ck_assert_int_eq(pd_rpc_send_error(router, m.ident, m.ident_len, 42,
                                       PD__ERROR_CODE__INVALID_ARGUMENT, "bad %s", "thing"),
                     0);
    pd_rpc_msg_clear(&m);
    zmq_pollitem_t it = {.socket = dealer, .events = ZMQ_POLLIN};
    ck_assert_int_eq(zmq_poll(&it, 1, 1000), 1);
    ck_assert_int_eq(pd_rpc_recv(dealer, false, 0, 0, &m), 1);
    ck_assert_ptr_nonnull(m.env);
    ck_assert_int_eq(m.env->method, PD__METHOD__ERROR);
    ck_assert_uint_eq(m.env->request_id, 42);
    ck_assert_int_eq(m.env->error->code, PD__ERROR_CODE__INVALID_ARGUMENT);
    ck_assert_str_eq(m.env->error->message, "bad thing");
    pd_rpc_msg_clear(&m);
    /* nothing else queued */
    ck_assert_int_eq(pd_rpc_recv(router, true, 0, 0, &m), 0);
}
END_TEST

START_TEST(bad_frames_refused)
{
    uint8_t buf[4096];
    pd_rpc_msg_t m;
    /* garbage */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01};
    send_raw(junk, sizeof junk, NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_ptr_null(m.env);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    ck_assert_uint_eq(m.ident_len, 8);
    pd_rpc_msg_clear(&m);
    /* wrong version */
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 5);
    Pd__HealthRequest h = PD__HEALTH_REQUEST__INIT;
    env.health = &h;
    env.version = 9;
    send_raw(buf, pack_env(&env, buf, sizeof buf), NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__UNSUPPORTED_VERSION);
    ck_assert_uint_eq(m.err_request_id, 5);
    pd_rpc_msg_clear(&m);
    /* unknown method */
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 6);
    env.health = &h;
    env.method = (Pd__Method)999;
    send_raw(buf, pack_env(&env, buf, sizeof buf), NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__UNKNOWN_METHOD);
    ck_assert_uint_eq(m.err_request_id, 6);
    pd_rpc_msg_clear(&m);
    /* the body of another method */
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 7);
    Pd__StatsRequest st = PD__STATS_REQUEST__INIT;
    env.body_case = PD__ENVELOPE__BODY_STATS;
    env.stats = &st;
    send_raw(buf, pack_env(&env, buf, sizeof buf), NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    ck_assert_uint_eq(m.err_request_id, 7);
    pd_rpc_msg_clear(&m);
    /* a field numbered 0, its tag in two bytes (0x80 0x00, value 1): protobuf-c would
     * take it and pack it back as the byte 0x00, which it refuses; at the top level
     * and inside the body */
    Pd__KvDone kd = PD__KV_DONE__INIT;
    kd.n_tokens = 3;
    const uint8_t zero_field[] = {0x80, 0x00, 0x01};
    pd_rpc_envelope_init(&env, PD__METHOD__KV_DONE, 8);
    env.kv_done = &kd;
    size_t n = pack_env(&env, buf, sizeof buf - sizeof zero_field);
    memcpy(buf + n, zero_field, sizeof zero_field);
    Pd__Envelope *taken = pd__envelope__unpack(NULL, n + sizeof zero_field, buf);
    ck_assert_ptr_nonnull(taken); /* protobuf-c itself takes it */
    pd__envelope__free_unpacked(taken, NULL);
    send_raw(buf, n + sizeof zero_field, NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_ptr_null(m.env);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    ck_assert_uint_eq(m.err_request_id, 8);
    pd_rpc_msg_clear(&m);
    uint8_t body[64];
    size_t nb = pd__kv_done__pack(&kd, body);
    memcpy(body + nb, zero_field, sizeof zero_field);
    nb += sizeof zero_field;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_DONE, 9);
    env.body_case = PD__ENVELOPE__BODY__NOT_SET; /* the body is appended by hand */
    n = pack_env(&env, buf, sizeof buf);
    const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field_by_name(
        &pd__envelope__descriptor, "kv_done");
    ck_assert_ptr_nonnull(fd);
    for (uint32_t tag = fd->id << 3 | 2; tag; tag >>= 7) /* the tag as a varint */
        buf[n++] = (uint8_t)((tag & 0x7f) | (tag >= 0x80 ? 0x80 : 0));
    buf[n++] = (uint8_t)nb; /* < 128 */
    memcpy(buf + n, body, nb);
    n += nb;
    send_raw(buf, n, NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_ptr_null(m.env);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    ck_assert_str_eq(m.err_msg, "a field numbered 0");
    pd_rpc_msg_clear(&m);
    /* too large: the id is still read from the frame's head */
    pd_rpc_envelope_init(&env, PD__METHOD__GENERATE, 8);
    Pd__GenerateRequest g = PD__GENERATE_REQUEST__INIT;
    static char big[3000];
    memset(big, 'a', sizeof big - 1);
    g.prompt = big;
    env.generate = &g;
    send_raw(buf, pack_env(&env, buf, sizeof buf), NULL, 0, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 1024, 0), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__TOO_LARGE);
    ck_assert_uint_eq(m.err_request_id, 8);
    pd_rpc_msg_clear(&m);
    /* three frames */
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 9);
    env.health = &h;
    n = pack_env(&env, buf, sizeof buf);
    send_raw(buf, n, "x", 1, "y", 1);
    ck_assert_int_eq(recv_one(&m, 0, 16), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    pd_rpc_msg_clear(&m);
    /* a data frame on HEALTH */
    send_raw(buf, n, "x", 1, NULL, 0);
    ck_assert_int_eq(recv_one(&m, 0, 16), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__BAD_REQUEST);
    pd_rpc_msg_clear(&m);
    /* KV_DATA keeps its data frame, within the limit */
    pd_rpc_envelope_init(&env, PD__METHOD__KV_DATA, 10);
    Pd__KvData d = PD__KV_DATA__INIT;
    d.n_pos = 2;
    env.kv_data = &d;
    ck_assert_int_eq(pd_rpc_send(dealer, NULL, 0, &env, "0123456789", 10), 0);
    ck_assert_int_eq(recv_one(&m, 0, 16), 1);
    ck_assert_ptr_nonnull(m.env);
    ck_assert(m.has_data);
    ck_assert_uint_eq(zmq_msg_size(&m.data), 10);
    ck_assert(memcmp(zmq_msg_data(&m.data), "0123456789", 10) == 0);
    pd_rpc_msg_clear(&m);
    ck_assert_int_eq(pd_rpc_send(dealer, NULL, 0, &env, "0123456789", 10), 0);
    ck_assert_int_eq(recv_one(&m, 0, 4), 1);
    ck_assert_int_eq(m.err, PD__ERROR_CODE__TOO_LARGE);
    pd_rpc_msg_clear(&m);
    /* the socket still serves a good one afterwards */
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 11);
    env.health = &h;
    ck_assert_int_eq(pd_rpc_send(dealer, NULL, 0, &env, NULL, 0), 0);
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    ck_assert_ptr_nonnull(m.env);
    ck_assert_uint_eq(m.env->request_id, 11);
    pd_rpc_msg_clear(&m);
}
END_TEST

/* The ERROR message the dealer gets for pd_rpc_send_error(..., "%s", quoted). */
static char *error_message_for(const char *quoted)
{
    ck_assert_int_eq(pd_rpc_send_error(router, "client-7", 8, 5, PD__ERROR_CODE__INTERNAL,
                                       "worker said: %s", quoted),
                     0);
    pd_rpc_msg_t m;
    zmq_pollitem_t it = {.socket = dealer, .events = ZMQ_POLLIN};
    ck_assert_int_eq(zmq_poll(&it, 1, 1000), 1);
    ck_assert_int_eq(pd_rpc_recv(dealer, false, 0, 0, &m), 1);
    ck_assert_ptr_nonnull(m.env);
    ck_assert_int_eq(m.env->method, PD__METHOD__ERROR);
    char *msg = strdup(m.env->error->message);
    pd_rpc_msg_clear(&m);
    ck_assert_ptr_nonnull(msg);
    return msg;
}

START_TEST(error_message_is_utf8)
{
    /* the router must know the dealer's identity before it can answer it */
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, 1);
    Pd__HealthRequest h = PD__HEALTH_REQUEST__INIT;
    env.health = &h;
    ck_assert_int_eq(pd_rpc_send(dealer, NULL, 0, &env, NULL, 0), 0);
    pd_rpc_msg_t m;
    ck_assert_int_eq(recv_one(&m, 0, 0), 1);
    pd_rpc_msg_clear(&m);
    /* bytes that are not UTF-8: each becomes U+FFFD, the rest stays */
    char *msg = error_message_for("a\xff\xc3(b\xe2\x82");
    ck_assert_str_eq(msg,
                     "worker said: a\xef\xbf\xbd\xef\xbf\xbd(b\xef\xbf\xbd\xef\xbf\xbd");
    free(msg);
    /* two-byte characters cut by the 511-byte limit: no half character at the end */
    char long_s[1200];
    long_s[0] = 'x'; /* the 511th byte is then the first of a character */
    for (size_t i = 1; i + 2 < sizeof long_s; i += 2)
        memcpy(long_s + i, "\xc3\xa9", 2);
    long_s[sizeof long_s - 1] = 0;
    msg = error_message_for(long_s);
    size_t n = strlen(msg);
    ck_assert(pd_utf8_valid((const unsigned char *)msg, n));
    ck_assert_uint_ge(n, 500);
    ck_assert_uint_le(n, 511 + 2);
    ck_assert(strstr(msg, "\xc3\xa9\xc3\xa9") != NULL);
    free(msg);
}
END_TEST

START_TEST(names_and_cases)
{
    ck_assert_str_eq(pd_rpc_method_name(PD__METHOD__KV_DONE), "KV_DONE");
    ck_assert_str_eq(pd_rpc_method_name((Pd__Method)555), "UNKNOWN");
    ck_assert_int_eq(pd_rpc_body_case(PD__METHOD__DECODE_TASK), PD__ENVELOPE__BODY_DECODE_TASK);
    ck_assert_int_eq(pd_rpc_body_case(PD__METHOD__METHOD_UNSPECIFIED),
                     PD__ENVELOPE__BODY__NOT_SET);
    ck_assert_str_eq(pd_rpc_error_name(PD__ERROR_CODE__LEASE_EXPIRED), "LEASE_EXPIRED");
    ck_assert_uint_gt(pd_rpc_realtime_ms(), 1600000000000ull);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("rpc", 60, setup, teardown);
    PD_TEST_ADD(tc, good_envelope_arrives, bad_frames_refused, error_message_is_utf8,
                names_and_cases);
    return pd_test_run("rpc", tc);
}
