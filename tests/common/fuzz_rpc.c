/* fuzz_rpc.c - libFuzzer target: pd_rpc_recv, the checks every process applies to a
 * frame, on arbitrary bytes over a real ZeroMQ DEALER/ROUTER pair on inproc (the
 * first input byte's low bit sends the last 16 bytes as a data frame). Whatever it
 * accepts must survive a relay: packed again, it must unpack (the router passes
 * workers' envelopes on this way). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/rpc.h"

static void quiet(pd_log_level_t l, const char *file, int line, const char *msg, void *u)
{
    (void)l, (void)file, (void)line, (void)msg, (void)u;
}

static void *ctx, *router, *dealer;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ctx) {
        pd_log_set_callback(quiet, NULL);
        ctx = zmq_ctx_new();
        router = zmq_socket(ctx, ZMQ_ROUTER);
        dealer = zmq_socket(ctx, ZMQ_DEALER);
        if (!router || !dealer || zmq_bind(router, "inproc://fuzz") != 0 ||
            zmq_connect(dealer, "inproc://fuzz") != 0)
            abort();
    }
    if (size < 1)
        return 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1, extra = (data[0] & 1) && n >= 16 ? 16 : 0;
    if (zmq_send(dealer, p, n - extra, extra ? ZMQ_SNDMORE : 0) < 0 ||
        (extra && zmq_send(dealer, p + n - extra, extra, 0) < 0))
        abort();
    zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 1000) != 1)
        abort(); /* inproc delivers at once */
    pd_rpc_msg_t m;
    if (pd_rpc_recv(router, true, 0, 0, &m) != 1)
        abort();
    if (m.env) {
        size_t len = pd__envelope__get_packed_size(m.env);
        uint8_t *buf = malloc(len ? len : 1);
        if (!buf || pd__envelope__pack(m.env, buf) != len)
            abort();
        Pd__Envelope *again = pd__envelope__unpack(NULL, len, buf);
        if (!again)
            abort(); /* accepted here, refused by the peer it would be relayed to */
        pd__envelope__free_unpacked(again, NULL);
        free(buf);
    }
    pd_rpc_msg_clear(&m);
    return 0;
}
