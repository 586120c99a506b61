/* main.c - the pd-router command line: parses the flags, opens the model (for its
 * tokenizer, shape and digest), binds, prints the bound endpoints on one stdout line
 * ("pd-router: client tcp://H:P worker tcp://H:P"; tests and pdctl up parse it) and
 * serves until SIGTERM/SIGINT and the drain that follows. Exit status: 0 after a
 * clean drain, 1 on a start-up failure, 2 for bad flags. Threading: one thread. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/digest.h"
#include "common/log.h"
#include "common/model.h"
#include "router/router.h"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: pd-router --model M [--tokenizer T]\n"
        "         [--client-endpoint tcp://127.0.0.1:5555] "
        "[--worker-endpoint tcp://127.0.0.1:5556]\n"
        "         [--policy prefix-aware|least-loaded|round-robin] "
        "[--local-prefill-max N]\n"
        "         [--heartbeat-ms N] [--dead-ms N] [--lease-ms N] [--max-retries N]\n"
        "         [--max-frame-bytes SIZE] [--block-size N] [--kv-dtype f32|f16]\n"
        "         [--kv-transport ucx|zmq|cuda-ipc] [--kv-layerwise-min N]\n"
        "         [--drain-timeout DUR] [--queue-timeout DUR]\n"
        "         [--log-level error|warn|info|debug] [--print-digest] [--help]\n"
        "Defaults: policy prefix-aware, local prefill off (0), heartbeat 100 ms, dead\n"
        "after 3000 ms, lease 10000 ms, 3 re-runs, frames up to 4MiB, block size and\n"
        "KV dtype from the first registered worker, KV over ucx, drain and queue\n"
        "timeouts 30s. An endpoint with port 0 binds any free port; the bound ones\n"
        "are printed on stdout: \"pd-router: client ENDPOINT worker ENDPOINT\".\n"
        "SIZE takes K/KiB, M/MiB, G/GiB suffixes; DUR takes ms, s (the default), m.\n"
        "--print-digest prints the model's digest (32 hex digits) and exits.\n"
        "--kv-layerwise-min is accepted for symmetry with the workers and unused.\n");
}

static int parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *v_p)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v < lo || v > hi)
        return -1;
    *v_p = v;
    return 0;
}

static int parse_size(const char *s, uint64_t *v_p)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-')
        return -1;
    uint64_t mul = 1;
    if (!*end || !strcmp(end, "B"))
        mul = 1;
    else if (!strcmp(end, "K") || !strcmp(end, "KiB"))
        mul = 1ull << 10;
    else if (!strcmp(end, "M") || !strcmp(end, "MiB"))
        mul = 1ull << 20;
    else if (!strcmp(end, "G") || !strcmp(end, "GiB"))
        mul = 1ull << 30;
    else
        return -1;
    if (v > UINT64_MAX / mul)
        return -1;
    *v_p = v * mul;
    return 0;
}

static int parse_duration_ms(const char *s, uint64_t *v_p)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || v > 1e9)
        return -1;
    double mul = !*end || !strcmp(end, "s") ? 1e3
                 : !strcmp(end, "ms")       ? 1
                 : !strcmp(end, "m")        ? 6e4
                                            : -1;
    if (mul < 0)
        return -1;
    *v_p = (uint64_t)(v * mul);
    return 0;
}

typedef struct args {
    const char *model, *tokenizer;
    bool print_digest;
    pd_router_opts_t o;
} args_t;

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* One flag and its value. Returns 0, or -1 with the reason printed. */
static int parse_flag(args_t *a, const char *f, const char *v)
{
    uint64_t n;
    pd_router_opts_t *o = &a->o;
    if (!strcmp(f, "--model"))
        a->model = v;
    else if (!strcmp(f, "--tokenizer"))
        a->tokenizer = v;
    else if (!strcmp(f, "--client-endpoint"))
        o->client_endpoint = v;
    else if (!strcmp(f, "--worker-endpoint"))
        o->worker_endpoint = v;
    else if (!strcmp(f, "--policy")) {
        int p = pd_policy_parse(v);
        if (p < 0)
            return -1;
        o->policy = (pd_policy_t)p;
    } else if (!strcmp(f, "--local-prefill-max") && !parse_u64(v, 0, 1u << 30, &n))
        o->local_prefill_max = (uint32_t)n;
    else if (!strcmp(f, "--heartbeat-ms") && !parse_u64(v, 1, 600000, &n))
        o->heartbeat_ms = (uint32_t)n;
    else if (!strcmp(f, "--dead-ms") && !parse_u64(v, 1, 3600000, &n))
        o->dead_ms = (uint32_t)n;
    else if (!strcmp(f, "--lease-ms") && !parse_u64(v, 1, 3600000, &n))
        o->lease_ms = (uint32_t)n;
    else if (!strcmp(f, "--max-retries") && !parse_u64(v, 0, 1000, &n))
        o->max_retries = (uint32_t)n;
    else if (!strcmp(f, "--max-frame-bytes") && !parse_size(v, &n) && n >= 1024 &&
             n <= (64u << 20))
        o->max_frame_bytes = (size_t)n;
    else if (!strcmp(f, "--block-size") && !parse_u64(v, 1, 65536, &n))
        o->block_size = (uint32_t)n;
    else if (!strcmp(f, "--kv-dtype") && (!strcmp(v, "f32") || !strcmp(v, "f16")))
        o->kv_dtype = strcmp(v, "f32") ? 1 : 0; /* pd_dtype_t F32 0, F16 1 */
    else if (!strcmp(f, "--kv-transport") && !strcmp(v, "ucx"))
        o->kv_transport = PD__KV_TRANSPORT__UCX;
    else if (!strcmp(f, "--kv-transport") && !strcmp(v, "zmq"))
        o->kv_transport = PD__KV_TRANSPORT__ZMQ;
    else if (!strcmp(f, "--kv-transport") && !strcmp(v, "cuda-ipc"))
        o->kv_transport = PD__KV_TRANSPORT__CUDA_IPC;
    else if (!strcmp(f, "--kv-layerwise-min") && !parse_u64(v, 0, 1u << 30, &n))
        ; /* the workers' flag; nothing for the router to do */
    else if (!strcmp(f, "--drain-timeout") && !parse_duration_ms(v, &n))
        o->drain_timeout_ms = n;
    else if (!strcmp(f, "--queue-timeout") && !parse_duration_ms(v, &n))
        o->queue_timeout_ms = n;
    else if (!strcmp(f, "--log-level") && pd_log_level_parse(v) >= 0)
        pd_log_set_level((pd_log_level_t)pd_log_level_parse(v));
    else
        return -1;
    return 0;
}

static int parse_args(int argc, char **argv, args_t *a)
{
    pd_router_opts_default(&a->o);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(f, "--print-digest")) {
            a->print_digest = true;
            continue;
        }
        char flag[64];
        const char *v;
        const char *eq = strchr(f, '=');
        if (eq && (size_t)(eq - f) < sizeof flag) { /* --flag=value */
            memcpy(flag, f, (size_t)(eq - f));
            flag[eq - f] = 0;
            v = eq + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", f);
            if (i + 1 >= argc) {
                fprintf(stderr, "pd-router: %s needs a value\n", f);
                return -1;
            }
            v = argv[++i];
        }
        if (strncmp(flag, "--", 2) || parse_flag(a, flag, v) != 0) {
            fprintf(stderr, "pd-router: bad flag or value: %s %s\n", flag, v);
            return -1;
        }
    }
    if (!a->model) {
        fprintf(stderr, "pd-router: --model is required\n");
        return -1;
    }
    a->o.model_name = base_name(a->model);
    return 0;
}

int main(int argc, char **argv)
{
    args_t a = {0};
    pd_log_set_level(PD_LOG_LEVEL_INFO);
    int rc = parse_args(argc, argv, &a);
    if (rc != 0) {
        if (rc < 0)
            usage(stderr);
        return rc < 0 ? 2 : 0;
    }
    pd_model_t *model = NULL;
    if (pd_model_open(a.model, a.tokenizer, &model) != PD_OK) {
        fprintf(stderr, "pd-router: cannot open the model %s\n", a.model);
        return 1;
    }
    if (a.print_digest) {
        uint8_t d[PD_DIGEST_BYTES];
        char hex[2 * PD_DIGEST_BYTES + 1];
        pd_model_digest(model, d);
        pd_digest_hex(d, hex);
        printf("%s\n", hex);
        pd_model_destroy(&model);
        return 0;
    }
    pd_router_t *rt = NULL;
    if (pd_router_new(&a.o, model, &rt) != PD_OK) {
        pd_model_destroy(&model);
        return 1;
    }
    printf("pd-router: client %s worker %s\n", pd_router_client_endpoint(rt),
           pd_router_worker_endpoint(rt));
    fflush(stdout);
    pd_status_t st = pd_router_run(rt);
    pd_router_destroy(&rt);
    pd_model_destroy(&model);
    return st == PD_OK ? 0 : 1;
}
