/* worker.c - see worker.h: the options, setup and teardown, the I/O thread's poll
 * loop and the router connection (registration, heartbeats, dispatch of messages and
 * engine events); the engine thread and the two sides live in worker_engine.c,
 * worker_prefill.c and worker_decode.c (worker_impl.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"
#include "common/worker_impl.h"

static worker_t *g_worker; /* for the signal handler's pipe */

/* ---- I/O thread: sending ------------------------------------------------- */

void wk_send_env(worker_t *w, Pd__Envelope *env, const void *data, size_t len)
{
    if (pd_rpc_send(w->sock, NULL, 0, env, data, len) != 0)
        PD_LOG_WARN("worker: cannot send %s: %s", pd_rpc_method_name(env->method),
                    zmq_strerror(errno));
}

void wk_send_failed(worker_t *w, uint64_t task, Pd__ErrorCode code, const char *what)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__TASK_FAILED, task);
    Pd__TaskFailed tf = PD__TASK_FAILED__INIT;
    Pd__Error err = PD__ERROR__INIT;
    err.code = code;
    err.message = (char *)what;
    tf.error = &err;
    env.task_failed = &tf;
    wk_send_env(w, &env, NULL, 0);
}

Pd__ErrorCode wk_status_code(pd_status_t st)
{
    switch (st) {
    case PD_ERR_INVALID:
    case PD_ERR_RANGE:
        return PD__ERROR_CODE__INVALID_ARGUMENT;
    case PD_ERR_NOMEM:
        return PD__ERROR_CODE__UNAVAILABLE;
    default:
        return PD__ERROR_CODE__INTERNAL;
    }
}

/* ---- I/O thread: the router ---------------------------------------------- */

static void fill_load(worker_t *w, Pd__WorkerLoad *l)
{
    pthread_mutex_lock(&w->mu);
    load_t x = w->load;
    pthread_mutex_unlock(&w->mu);
    l->free_blocks = (uint32_t)x.free_blocks;
    l->total_blocks = (uint32_t)x.total_blocks;
    l->running = (uint32_t)x.running;
    l->waiting = (uint32_t)(x.waiting > 0 ? x.waiting : 0);
    /* decode tasks still reserving or reading their KV are load the engine cannot see
     * yet: count them as waiting, so that the router balances bursts */
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->state != D_RUNNING)
            l->waiting++;
    l->queued_prefill_tokens = (uint64_t)(x.queued_prefill > 0 ? x.queued_prefill : 0);
    uint32_t reserved = 0, held = 0;
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->blocks)
            reserved += (uint32_t)t->n_blocks;
    for (ptask_t *t = w->ptasks; t; t = t->next)
        if (t->prefilled)
            held += (uint32_t)t->n_blocks;
    l->reserved_blocks = reserved;
    l->held_blocks = held;
    l->tasks_done = (uint64_t)x.tasks_done;
    l->tokens_out = (uint64_t)x.tokens_out;
    l->kv_bytes = (uint64_t)w->kv_bytes;
    l->spec_proposed = (uint64_t)x.spec_proposed;
    l->spec_accepted = (uint64_t)x.spec_accepted;
    l->steps = (uint64_t)x.steps;
    l->forward_s = x.forward_s;
    l->sample_s = x.sample_s;
    l->sample_threads = (uint32_t)x.sample_threads;
    l->draining = w->draining;
}

static void send_register(worker_t *w)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__REGISTER, w->reg_seq);
    Pd__Register r = PD__REGISTER__INIT;
    r.role = w->o.role == PD_WORKER_PREFILL ? PD__ROLE__PREFILL : PD__ROLE__DECODE;
    r.name = (char *)w->o.name;
    const char *base = strrchr(w->o.model, '/');
    r.model = (char *)(base ? base + 1 : w->o.model);
    r.model_digest.data = w->digest;
    r.model_digest.len = PD_DIGEST_BYTES;
    Pd__KvLayout lay = PD__KV_LAYOUT__INIT;
    const pd_model_config_t *c = pd_model_config(w->model);
    lay.block_size = (uint32_t)w->bs;
    lay.dtype = (uint32_t)pd_kv_pool_dtype(w->kv);
    lay.n_layers = (uint32_t)c->n_layers;
    lay.n_kv_heads = (uint32_t)c->n_kv_heads;
    lay.head_dim = (uint32_t)c->head_dim;
    lay.n_blocks = (uint32_t)pd_kv_pool_n_blocks(w->kv);
    r.layout = &lay;
    r.kv_transport = w->o.transport;
    Pd__UcxSource src = PD__UCX_SOURCE__INIT;
    if (w->ucx) {
        const void *addr = NULL;
        size_t alen = 0;
        if (pd_ucx_address(w->ucx, &addr, &alen) == PD_OK) {
            src.worker_address.data = (uint8_t *)addr;
            src.worker_address.len = alen;
        }
        size_t kl = 0, vl = 0;
        const void *rk = pd_ucx_region_rkey(w->reg_k, &kl),
                   *rv = pd_ucx_region_rkey(w->reg_v, &vl);
        src.rkey_k.data = (uint8_t *)rk;
        src.rkey_k.len = kl;
        src.rkey_v.data = (uint8_t *)rv;
        src.rkey_v.len = vl;
        src.base_k = (uint64_t)(uintptr_t)pd_kv_pool_k(w->kv, 0);
        src.base_v = (uint64_t)(uintptr_t)pd_kv_pool_v(w->kv, 0);
        src.len_k = src.len_v = (uint64_t)w->layer_bytes * (uint64_t)w->n_layers;
        r.ucx = &src;
    }
    r.device = (char *)(w->o.device ? w->o.device : "cpu");
    Pd__DeviceSource ds = PD__DEVICE_SOURCE__INIT;
    if (w->xfer) {
        ds.node = w->node;
        ds.gpu = w->gpu;
        ds.ipc_k.data = w->ipc_k;
        ds.ipc_k.len = PD_IPC_HANDLE_BYTES;
        ds.ipc_v.data = w->ipc_v;
        ds.ipc_v.len = PD_IPC_HANDLE_BYTES;
        ds.len_k = ds.len_v = (uint64_t)w->layer_bytes * (uint64_t)w->n_layers;
        r.device_source = &ds;
    }
    r.max_seq_len = (uint32_t)pd_engine_max_seq_len(w->engine);
    r.vocab = (uint32_t)w->vocab;
    r.pid = (uint32_t)getpid();
    r.can_prefill = w->o.role == PD_WORKER_PREFILL || w->o.local_prefill;
    env.register_ = &r;
    wk_send_env(w, &env, NULL, 0);
    w->next_register = pd_rpc_mono_ms() + REGISTER_RETRY;
}

static void send_heartbeat(worker_t *w)
{
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__HEARTBEAT, w->reg_seq);
    Pd__Heartbeat hb = PD__HEARTBEAT__INIT;
    Pd__WorkerLoad l = PD__WORKER_LOAD__INIT;
    fill_load(w, &l);
    hb.worker_id = w->worker_id;
    hb.load = &l;
    env.heartbeat = &hb;
    wk_send_env(w, &env, NULL, 0);
    w->next_heartbeat = pd_rpc_mono_ms() + w->heartbeat_ms;
}

/* Forgets every task (the router no longer knows this worker): engine requests are
 * cancelled, reads stopped, blocks released. */
static void drop_all(worker_t *w)
{
    while (w->dtasks)
        wk_dtask_abandon(w, w->dtasks);
    while (w->ptasks)
        wk_ptask_drop(w, w->ptasks, true);
}

static void on_register_reply(worker_t *w, uint64_t rid, const Pd__RegisterReply *r,
                              int *exit_code)
{
    if (!r->accepted && rid == 0 && !w->registered)
        return; /* a late task message refused while a registration is in flight */
    if (rid != w->reg_seq && rid != 0)
        return; /* about an earlier registration (e.g. heartbeats queued while stopped) */
    if (r->accepted) {
        if (!w->registered)
            PD_LOG_INFO("worker %s: registered as %llu", w->o.name,
                        (unsigned long long)r->worker_id);
        w->registered = true;
        w->worker_id = r->worker_id;
        w->heartbeat_ms = r->heartbeat_ms ? r->heartbeat_ms : 100;
        w->next_heartbeat = pd_rpc_mono_ms();
        return;
    }
    if (w->registered) {
        PD_LOG_WARN("worker %s: the router no longer knows this worker (%s): dropping "
                    "every task and registering again",
                    w->o.name, r->reason ? r->reason : "");
        w->registered = false;
        drop_all(w);
        w->reg_seq++;
        send_register(w);
        return;
    }
    PD_LOG_ERROR("worker %s: registration refused: %s", w->o.name,
                 r->reason ? r->reason : "(no reason)");
    *exit_code = 1;
}

static void on_task_cancel(worker_t *w, uint64_t task)
{
    ptask_t *p = wk_ptask_find(w, task);
    if (p)
        wk_ptask_drop(w, p, true);
    dtask_t *d = wk_dtask_find(w, task);
    if (d)
        wk_dtask_abandon(w, d);
}

static void on_kv_release(worker_t *w, uint64_t task)
{
    ptask_t *p = wk_ptask_find(w, task);
    if (p && p->prefilled)
        wk_ptask_drop(w, p, false);
}

static void handle(worker_t *w, pd_rpc_msg_t *m, int *exit_code)
{
    if (!m->env) {
        PD_LOG_WARN("worker: a bad frame from the router: %s", m->err_msg);
        return;
    }
    const Pd__Envelope *env = m->env;
    switch (env->method) {
    case PD__METHOD__REGISTER_REPLY:
        on_register_reply(w, env->request_id, env->register_reply, exit_code);
        break;
    case PD__METHOD__PREFILL_TASK:
        wk_on_prefill_task(w, env);
        break;
    case PD__METHOD__DECODE_TASK:
        wk_on_decode_task(w, env);
        break;
    case PD__METHOD__KV_TARGET:
        wk_on_kv_target(w, env->request_id);
        break;
    case PD__METHOD__KV_READY:
        wk_on_kv_ready(w, env);
        break;
    case PD__METHOD__KV_DONE:
        wk_on_kv_done(w, env);
        break;
    case PD__METHOD__KV_DATA:
        wk_on_kv_data(w, m);
        break;
    case PD__METHOD__KV_RELEASE:
        on_kv_release(w, env->request_id);
        break;
    case PD__METHOD__TASK_CANCEL:
        on_task_cancel(w, env->request_id);
        break;
    case PD__METHOD__DRAIN:
        if (!w->draining) {
            PD_LOG_INFO("worker %s: draining (asked by the router)", w->o.name);
            w->draining = true;
            w->drain_deadline = pd_rpc_mono_ms() + (uint64_t)w->o.drain_timeout_s * 1000u;
        }
        break;
    case PD__METHOD__ERROR:
        PD_LOG_WARN("worker: the router answered %s: %s",
                    pd_rpc_error_name(env->error ? env->error->code : 0),
                    env->error && env->error->message ? env->error->message : "");
        break;
    default:
        PD_LOG_WARN("worker: unexpected %s from the router",
                    pd_rpc_method_name(env->method));
        break;
    }
}

static void handle_events(worker_t *w)
{
    uint64_t n;
    ssize_t r = read(w->evfd, &n, sizeof n);
    (void)r;
    pthread_mutex_lock(&w->mu);
    msg_t *m = w->events.head;
    w->events.head = w->events.tail = NULL;
    pthread_mutex_unlock(&w->mu);
    while (m) {
        msg_t *next = m->next;
        switch (m->type) {
        case EV_LAYER:
            wk_on_ev_layer(w, m);
            break;
        case EV_PREFILLED:
            wk_on_ev_prefilled(w, m);
            break;
        case EV_TOKEN:
            wk_on_ev_token(w, m);
            break;
        case EV_FINISH:
            wk_on_ev_finish(w, m);
            break;
        case EV_RESERVED:
            wk_on_ev_reserved(w, m);
            break;
        case EV_FAILED:
            wk_on_ev_failed(w, m);
            break;
        default:
            break;
        }
        wk_msg_free(m);
        m = next;
    }
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->n_out)
            wk_chunk_flush(w, t);
}

static void check_timers(worker_t *w)
{
    uint64_t now = pd_rpc_mono_ms();
    for (dtask_t *t = w->dtasks, *next; t; t = next) {
        next = t->next;
        if (t->state != D_RUNNING && !t->local && now >= t->lease_until) {
            PD_LOG_WARN("worker: task %llu: the KV lease ended before the KV arrived",
                        (unsigned long long)t->task);
            Pd__Envelope env;
            Pd__KvRelease rel = PD__KV_RELEASE__INIT;
            pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
            env.kv_release = &rel;
            wk_send_env(w, &env, NULL, 0);
            wk_send_failed(w, t->task, PD__ERROR_CODE__LEASE_EXPIRED, "KV lease expired");
            wk_dtask_abandon(w, t);
            next = w->dtasks; /* abandoning may have closed a peer: start over */
        }
    }
    for (ptask_t *t = w->ptasks, *next; t; t = next) {
        next = t->next;
        if (t->prefilled && now >= t->hold_until) {
            PD_LOG_WARN("worker: task %llu: no KV_RELEASE within the lease; releasing",
                        (unsigned long long)t->task);
            wk_ptask_drop(w, t, false);
        }
    }
    if (w->o.role == PD_WORKER_DECODE)
        wk_peers_prune(w, now);
    if (!w->registered && now >= w->next_register)
        send_register(w);
    if (w->registered && now >= w->next_heartbeat)
        send_heartbeat(w);
}

/* ---- setup, the loop, the CLI -------------------------------------------- */

static void on_signal(int sig)
{
    (void)sig;
    if (g_worker) {
        char c = 1;
        ssize_t r = write(g_worker->sigpipe[1], &c, 1);
        (void)r;
    }
}

static void usage(FILE *f, pd_worker_role_t role)
{
    const char *n = role == PD_WORKER_PREFILL ? "pd-prefill" : "pd-decode";
    fprintf(
        f,
        "usage: %s --model M [--tokenizer T] [--router ENDPOINT] [--name NAME]\n"
        "         [--threads N] [--max-num-seqs N] [--batch N] [--kv-memory SIZE]\n"
        "         [--kv-blocks N] [--block-size N] [--kv-dtype auto|f32|f16]\n"
        "         [--no-prefix-cache] [--kv-transport ucx|zmq|cuda-ipc]\n"
        "         [--kv-layerwise-min N] [--kv-peer-idle-ms N]\n"
        "         [--drain-timeout S]%s [--log-level L]\n"
        "         [--spec ngram|draft|off] [--spec-k N] [--draft-model D]\n"
        "         [--device cpu|cuda|cuda:N] [--weight-dtype auto|bf16] [--cuda-graphs]\n"
        "         [--sample-threads N]\n"
        "  Joins the router at ENDPOINT (its worker endpoint; default\n"
        "  tcp://127.0.0.1:5556) as a %s worker. Defaults: one thread per CPU,\n"
        "  64 sequences, 512 tokens per step, a KV pool of 1 GiB at most, blocks of\n"
        "  16, the ucx transport, layer-wise KV streaming from 256 prompt tokens,\n"
        "  30 s to drain on SIGTERM. A decode worker closes its connection to (or\n"
        "  mapping of) a prefill worker no task has used for --kv-peer-idle-ms\n"
        "  (60000; 0: never). --spec ngram: speculative decoding of greedy\n"
        "  requests by n-gram prompt lookup, up to --spec-k (4) tokens a step;\n"
        "  --draft-model D (same vocabulary): proposals from D (decode workers).\n"
        "  --device cuda: the engine and its KV pool on the GPU; over ucx and zmq the\n"
        "  KV moves through a pinned host copy of the pool (KV layout and transfers as\n"
        "  on a CPU); --kv-transport cuda-ipc (every worker on GPUs of one node)\n"
        "  copies it from GPU to GPU through CUDA IPC, with no host copy.\n"
        "  --cuda-graphs: repeated decode passes replay as CUDA graphs (off by\n"
        "  default; ignored on the CPU). --sample-threads: host threads that draw\n"
        "  sampled tokens, the same tokens for every N (0, the default: the kernel\n"
        "  threads on the CPU, min(CPUs, 8) with a GPU; 1: the engine thread).\n",
        n, role == PD_WORKER_DECODE ? " [--local-prefill]" : "",
        role == PD_WORKER_PREFILL ? "prefill" : "decode");
}

static int parse_size(const char *s, int64_t *out)
{
    char *end = NULL;
    double v = strtod(s, &end);
    if (!end || end == s || !(v >= 0))
        return -1;
    double mul = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib") || !strcasecmp(end, "kb"))
        mul = 1024.0;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib") || !strcasecmp(end, "mb"))
        mul = 1024.0 * 1024;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib") || !strcasecmp(end, "gb"))
        mul = 1024.0 * 1024 * 1024;
    else if (*end)
        return -1;
    if (v * mul > 1e15)
        return -1;
    *out = (int64_t)(v * mul);
    return 0;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* One option with a value: 0, 1 for a bad value, -1 for an unknown option. */
static int parse_value(wopts_t *o, const char *a, const char *v)
{
    long n = 0;
    int64_t sz = 0;
    int bad = 0;
    if (!strcmp(a, "--model"))
        o->model = v;
    else if (!strcmp(a, "--tokenizer"))
        o->tokenizer = v;
    else if (!strcmp(a, "--router"))
        o->router = v;
    else if (!strcmp(a, "--name"))
        o->name = v;
    else if (!strcmp(a, "--threads"))
        bad = parse_int(v, 1, 1024, &n) || !(o->threads = (int)n);
    else if (!strcmp(a, "--sample-threads"))
        bad = parse_int(v, 0, 256, &n) || ((o->eo.sample_threads = (int32_t)n), 0);
    else if (!strcmp(a, "--max-num-seqs"))
        bad = parse_int(v, 1, 4096, &n) || !(o->eo.max_num_seqs = (int32_t)n);
    else if (!strcmp(a, "--batch"))
        bad = parse_int(v, 1, 1 << 20, &n) || !(o->eo.max_batch_tokens = (int32_t)n);
    else if (!strcmp(a, "--kv-blocks"))
        bad = parse_int(v, 1, 1 << 28, &n) || !(o->eo.kv_blocks = (int32_t)n);
    else if (!strcmp(a, "--block-size"))
        bad = parse_int(v, 1, 1024, &n) || !(o->eo.block_size = (int32_t)n);
    else if (!strcmp(a, "--kv-layerwise-min"))
        bad = parse_int(v, 0, INT_MAX, &n) || ((o->layerwise_min = (int32_t)n), 0);
    else if (!strcmp(a, "--kv-peer-idle-ms"))
        bad = parse_int(v, 0, INT_MAX, &n) || ((o->peer_idle_ms = (int)n), 0);
    else if (!strcmp(a, "--drain-timeout"))
        bad = parse_int(v, 0, 86400, &n) || ((o->drain_timeout_s = (int)n), 0);
    else if (!strcmp(a, "--kv-memory"))
        bad = parse_size(v, &sz) || sz <= 0 || ((o->eo.kv_memory = sz), 0);
    else if (!strcmp(a, "--kv-dtype")) {
        if (!strcmp(v, "auto"))
            o->eo.kv_type = PD_KV_AUTO;
        else if (!strcmp(v, "f32"))
            o->eo.kv_type = PD_KV_F32;
        else if (!strcmp(v, "f16"))
            o->eo.kv_type = PD_KV_F16;
        else
            bad = 1;
    } else if (!strcmp(a, "--spec")) {
        if (!strcmp(v, "ngram") || !strcmp(v, "draft"))
            o->spec_on = !strcmp(v, "ngram") ? 1 : 2;
        else if (!strcmp(v, "off"))
            o->spec_on = -1;
        else
            bad = 1;
    } else if (!strcmp(a, "--draft-model")) {
        o->draft_model = v;
    } else if (!strcmp(a, "--device")) {
        o->device = v;
    } else if (!strcmp(a, "--weight-dtype")) {
        if (!strcmp(v, "auto") || !strcmp(v, "bf16"))
            o->bf16_weights = !strcmp(v, "bf16");
        else
            bad = 1;
    } else if (!strcmp(a, "--spec-k")) {
        bad = parse_int(v, 0, 64, &n) || ((o->spec_k = (int32_t)n), 0);
    } else if (!strcmp(a, "--kv-transport")) {
        if (!strcmp(v, "ucx"))
            o->transport = PD__KV_TRANSPORT__UCX;
        else if (!strcmp(v, "zmq"))
            o->transport = PD__KV_TRANSPORT__ZMQ;
        else if (!strcmp(v, "cuda-ipc"))
            o->transport = PD__KV_TRANSPORT__CUDA_IPC;
        else
            bad = 1;
    } else if (!strcmp(a, "--log-level")) {
        int lv = pd_log_level_parse(v);
        if (lv < 0)
            bad = 1;
        else
            pd_log_set_level((pd_log_level_t)lv);
    } else {
        return -1;
    }
    return bad;
}

static int parse_args(int argc, char **argv, pd_worker_role_t role, wopts_t *o)
{
    memset(o, 0, sizeof *o);
    o->role = role;
    o->router = "tcp://127.0.0.1:5556";
    o->transport = PD__KV_TRANSPORT__UCX;
    o->layerwise_min = 256;
    o->peer_idle_ms = 60000;
    o->drain_timeout_s = 30;
    o->eo.eos = o->eo.bos = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout, role);
            return 1;
        }
        if (!strcmp(a, "--no-prefix-cache")) {
            o->eo.no_prefix_cache = true;
            continue;
        }
        if (!strcmp(a, "--local-prefill") && role == PD_WORKER_DECODE) {
            o->local_prefill = true;
            continue;
        }
        if (!strcmp(a, "--cuda-graphs")) {
            o->eo.cuda_graphs = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value (or is unknown)\n", argv[0], a);
            return -1;
        }
        const char *v = argv[++i];
        int bad = parse_value(o, a, v);
        if (bad < 0) {
            fprintf(stderr, "%s: unknown option %s\n", argv[0], a);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "%s: bad value for %s: %s\n", argv[0], a, v);
            return -1;
        }
    }
    if (o->draft_model && o->spec_on == 0)
        o->spec_on = 2; /* a draft model implies --spec draft */
    if (o->spec_on == 2 && !o->draft_model) {
        fprintf(stderr, "%s: --spec draft needs --draft-model\n", argv[0]);
        return -1;
    }
    o->eo.spec_k = o->spec_on > 0 ? (o->spec_k > 0 ? o->spec_k : 4) : 0;
    if (o->transport == PD__KV_TRANSPORT__CUDA_IPC && pd_device_index(o->device) < 0) {
        fprintf(stderr,
                "%s: --kv-transport cuda-ipc needs --device cuda or cuda:N (it copies "
                "the KV between GPU memories)\n",
                argv[0]);
        return -1;
    }
    if (!o->model) {
        fprintf(stderr, "%s: --model is required\n", argv[0]);
        return -1;
    }
    return 0;
}

/* The CUDA IPC transport: a copy stream for each thread that touches the KV outside
 * the engine (the I/O thread copies and checks, the engine thread checksums the
 * prefill's rows), the pool's handles for readers, and this node's id. */
static int setup_ipc(worker_t *w)
{
    int dev = pd_device_index(w->o.device);
    pd_kernels_t *pk = pd_kv_pool_device(w->kv);
    if (!pk || dev < 0) {
        PD_LOG_ERROR("worker: the cuda-ipc transport needs the KV pool on a GPU");
        return -1;
    }
    if (pd_devxfer_new(dev, &w->xfer) != PD_OK ||
        pd_devxfer_new(dev, &w->xfer_eng) != PD_OK)
        return -1;
    if (pd_devxfer_export(w->xfer, pd_kv_pool_compute_k(w->kv, 0), w->ipc_k) != PD_OK ||
        pd_devxfer_export(w->xfer, pd_kv_pool_compute_v(w->kv, 0), w->ipc_v) != PD_OK)
        return -1;
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f || !fgets(w->node, sizeof w->node, f)) {
        PD_LOG_ERROR("worker: cannot read this node's boot id "
                     "(/proc/sys/kernel/random/boot_id), which names the node to the "
                     "router for the cuda-ipc transport");
        if (f)
            fclose(f);
        return -1;
    }
    fclose(f);
    w->node[strcspn(w->node, "\n")] = 0;
    snprintf(w->gpu, sizeof w->gpu, "%s", w->o.device);
    return 0;
}

static int setup(worker_t *w)
{
    if (pd_model_open(w->o.model, w->o.tokenizer, &w->model) != PD_OK)
        return -1;
    pd_model_digest(w->model, w->digest);
    const pd_tokenizer_t *tok = pd_model_tokenizer(w->model);
    w->o.eo.eos = pd_tokenizer_eos(tok);
    w->o.eo.bos = pd_tokenizer_bos(tok);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = w->o.threads > 0 ? w->o.threads : (int)(ncpu > 0 ? ncpu : 1);
    if (pd_kernels_new_device(w->o.device, threads, NULL, w->o.bf16_weights,
                              &w->kernels) != PD_OK)
        return -1;
    /* on a GPU the pool keeps a pinned host copy that the transfers read (prefill:
     * every layer mirrored as it finishes) or write (decode: moved to the device when
     * the request is admitted) */
    w->o.eo.kv_host =
        w->o.role == PD_WORKER_PREFILL ? PD_KV_HOST_MIRROR : PD_KV_HOST_STAGING;
    /* ... except with CUDA IPC, where the decode worker copies from GPU to GPU */
    if (w->o.transport == PD__KV_TRANSPORT__CUDA_IPC)
        w->o.eo.kv_host = PD_KV_HOST_NONE;
    /* layer-wise announcements are the prefill side's; a decode worker sets no hook,
     * which also leaves its decode passes free to replay as CUDA graphs */
    if (w->o.role == PD_WORKER_PREFILL) {
        w->o.eo.on_layer.fn = wk_on_layer;
        w->o.eo.on_layer.user = w;
    }
    if (w->o.spec_on == 2 && w->o.role == PD_WORKER_DECODE) {
        /* the decode worker computes the draft's KV of each prompt itself: the draft
         * is small, and its prompt pass is the first catch-up (docs/architecture.md) */
        if (pd_model_open(w->o.draft_model, w->o.tokenizer, &w->draft) != PD_OK)
            return -1;
        w->o.eo.draft_model = w->draft;
    }
    if (pd_engine_new(w->model, w->kernels, &w->o.eo, &w->engine) != PD_OK)
        return -1;
    w->kv = pd_engine_kv(w->engine);
    w->bs = pd_kv_pool_block_size(w->kv);
    w->n_layers = pd_kv_pool_n_layers(w->kv);
    w->vocab = pd_model_config(w->model)->vocab_size;
    w->row_bytes = pd_kv_pool_row_bytes(w->kv);
    w->layer_bytes = pd_kv_pool_layer_bytes(w->kv);
    if (w->o.transport == PD__KV_TRANSPORT__UCX) {
        size_t total = w->layer_bytes * (size_t)w->n_layers;
        if (pd_ucx_new(&w->ucx) != PD_OK ||
            pd_ucx_region_new(w->ucx, pd_kv_pool_k(w->kv, 0), total, &w->reg_k) !=
                PD_OK ||
            pd_ucx_region_new(w->ucx, pd_kv_pool_v(w->kv, 0), total, &w->reg_v) != PD_OK)
            return -1;
    }
    if (w->o.transport == PD__KV_TRANSPORT__CUDA_IPC && setup_ipc(w) != 0)
        return -1;
    w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->evfd < 0 || pipe(w->sigpipe) != 0) {
        PD_LOG_ERROR("worker: eventfd/pipe: %s", strerror(errno));
        return -1;
    }
    w->zctx = zmq_ctx_new();
    w->sock = w->zctx ? zmq_socket(w->zctx, ZMQ_DEALER) : NULL;
    if (!w->sock) {
        PD_LOG_ERROR("worker: zmq socket: %s", zmq_strerror(errno));
        return -1;
    }
    int zero = 0, linger = 2000;
    int64_t maxmsg = (int64_t)MAX_DATA_FRAME + (1 << 20);
    zmq_setsockopt(w->sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(w->sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(w->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(w->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_connect(w->sock, w->o.router) != 0) {
        PD_LOG_ERROR("worker: cannot connect to %s: %s", w->o.router,
                     zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static void teardown(worker_t *w)
{
    if (w->engine_thread) {
        pthread_mutex_lock(&w->mu);
        w->quit = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->engine_thread, NULL);
    }
    if (w->engine && w->o.eo.cuda_graphs) {
        pd_llm_graph_stats_t g;
        pd_engine_graph_stats(w->engine, &g);
        PD_LOG_INFO("worker %s: cuda graphs: %lld recorded, %lld replayed, %lld failed, "
                    "%lld passes op by op, %lld dropped",
                    w->o.name, (long long)g.captures, (long long)g.replays,
                    (long long)g.fallbacks, (long long)g.eager, (long long)g.dropped);
    }
    /* the engine is gone: drop the I/O side without commands */
    while (w->dtasks) {
        dtask_t *t = w->dtasks;
        if (t->outstanding > 0)
            wk_peer_close(w, t->peer);
        w->dtasks = t->next;
        wk_dtask_free(t);
    }
    while (w->ptasks) {
        ptask_t *t = w->ptasks;
        w->ptasks = t->next;
        free(t->blocks);
        free(t->sent);
        free(t->ready);
        free(t->cur);
        free(t);
    }
    while (w->peers) {
        peer_t *p = w->peers;
        w->peers = p->next;
        if (p->p)
            pd_ucx_peer_destroy(&p->p);
        wk_peer_free_desc(w, p);
        free(p);
    }
    pthread_mutex_lock(&w->mu);
    msg_t *q[2] = {w->cmds.head, w->events.head};
    w->cmds.head = w->cmds.tail = w->events.head = w->events.tail = NULL;
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < 2; i++)
        while (q[i]) {
            msg_t *n = q[i]->next;
            wk_msg_free(q[i]);
            q[i] = n;
        }
    if (w->reg_k)
        pd_ucx_region_destroy(&w->reg_k);
    if (w->reg_v)
        pd_ucx_region_destroy(&w->reg_v);
    if (w->ucx)
        pd_ucx_destroy(&w->ucx);
    pd_devxfer_destroy(&w->xfer);
    pd_devxfer_destroy(&w->xfer_eng);
    if (w->sock)
        zmq_close(w->sock);
    if (w->zctx)
        zmq_ctx_term(w->zctx);
    if (w->evfd > 0)
        close(w->evfd);
    if (w->sigpipe[0] > 0) {
        close(w->sigpipe[0]);
        close(w->sigpipe[1]);
    }
    pd_engine_destroy(&w->engine);
    pd_kernels_destroy(&w->kernels);
    pd_model_destroy(&w->draft);
    pd_model_destroy(&w->model);
}

/* Draining: true once nothing is left (or the drain timeout handed it back) and the
 * worker has deregistered. */
static bool drained(worker_t *w)
{
    bool idle = !w->dtasks && !w->ptasks;
    if (!idle && pd_rpc_mono_ms() < w->drain_deadline)
        return false;
    if (!idle) {
        PD_LOG_WARN("worker %s: drain timeout: handing back the tasks left", w->o.name);
        for (dtask_t *t = w->dtasks; t; t = t->next)
            wk_send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "worker drained");
        for (ptask_t *t = w->ptasks; t; t = t->next)
            wk_send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "worker drained");
        drop_all(w);
    }
    if (w->registered) {
        Pd__Envelope env;
        pd_rpc_envelope_init(&env, PD__METHOD__DEREGISTER, 0);
        Pd__Deregister d = PD__DEREGISTER__INIT;
        d.worker_id = w->worker_id;
        env.deregister = &d;
        wk_send_env(w, &env, NULL, 0);
    }
    PD_LOG_INFO("worker %s: drained", w->o.name);
    return true;
}

/* After UCX completions: checks the decode tasks whose reads are all done. A check
 * that changes a task may remove others (a closed peer), so it starts over after one. */
static void check_reads(worker_t *w)
{
    for (int guard = 0; guard < 100000; guard++) {
        dtask_t *t = w->dtasks;
        while (t && !(t->state == D_PULLING && t->outstanding == 0 &&
                      (t->done_rcvd || t->get_failed) && wk_dtask_check(w, t)))
            t = t->next;
        if (!t)
            break;
    }
}

static int run(worker_t *w)
{
    int exit_code = -1;
    w->reg_seq = 1;
    send_register(w);
    double t_iter = now_s();
    while (exit_code < 0) {
        double t_now = now_s();
        if (t_now - t_iter > 0.25) /* the heartbeats stop while the loop is stuck */
            PD_LOG_WARN("worker %s: the I/O loop was stuck for %.0f ms", w->o.name,
                        (t_now - t_iter) * 1e3);
        t_iter = t_now;
        bool ucx_busy = false;
        if (w->ucx) {
            double t0 = now_s();
            for (int i = 0; i < 64 && pd_ucx_progress(w->ucx); i++)
                ;
            if (now_s() - t0 > 0.25)
                PD_LOG_WARN("worker %s: UCX progress took %.0f ms", w->o.name,
                            (now_s() - t0) * 1e3);
            ucx_busy = !pd_ucx_arm(w->ucx);
        }
        zmq_pollitem_t items[4] = {
            {.socket = w->sock, .events = ZMQ_POLLIN},
            {.fd = w->evfd, .events = ZMQ_POLLIN},
            {.fd = w->sigpipe[0], .events = ZMQ_POLLIN},
            {.fd = w->ucx ? pd_ucx_fd(w->ucx) : -1, .events = ZMQ_POLLIN},
        };
        int n_items = w->ucx ? 4 : 3;
        long timeout = ucx_busy ? 0 : 20;
        if (zmq_poll(items, n_items, timeout) < 0 && errno != EINTR) {
            PD_LOG_ERROR("worker: zmq_poll: %s", zmq_strerror(errno));
            exit_code = 1;
            break;
        }
        if (items[2].revents & ZMQ_POLLIN) {
            char buf[16];
            ssize_t r = read(w->sigpipe[0], buf, sizeof buf);
            (void)r;
            if (!w->draining) {
                PD_LOG_INFO("worker %s: draining (signal)", w->o.name);
                w->draining = true;
                w->drain_deadline =
                    pd_rpc_mono_ms() + (uint64_t)w->o.drain_timeout_s * 1000u;
                if (w->registered)
                    send_heartbeat(w);
            }
        }
        for (int i = 0; i < 256; i++) {
            pd_rpc_msg_t m;
            int r = pd_rpc_recv(w->sock, false, 0, MAX_DATA_FRAME, &m);
            if (r <= 0)
                break;
            handle(w, &m, &exit_code);
            pd_rpc_msg_clear(&m);
        }
        handle_events(w);
        if (w->ucx) {
            pd_ucx_progress(w->ucx);
            check_reads(w);
        }
        check_timers(w);
        if (w->draining && drained(w))
            exit_code = 0;
    }
    return exit_code;
}

int pd_worker_main(int argc, char **argv, pd_worker_role_t role)
{
    worker_t *w = calloc(1, sizeof *w);
    if (!w)
        return 1;
    pd_log_set_level(
        PD_LOG_LEVEL_INFO); /* a service logs its life; --log-level overrides */
    int pr = parse_args(argc, argv, role, &w->o);
    if (pr != 0) {
        if (pr < 0)
            usage(stderr, role);
        free(w);
        return pr < 0 ? 2 : 0;
    }
    char name[128];
    if (!w->o.name) {
        char host[64] = "host";
        gethostname(host, sizeof host - 1);
        snprintf(name, sizeof name, "%s:%d-%s", host, (int)getpid(),
                 role == PD_WORKER_PREFILL ? "prefill" : "decode");
        w->o.name = name;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->evfd = -1;
    int code = 1;
    if (setup(w) == 0) {
        g_worker = w;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        /* the first heartbeat may go before the engine thread has run at all */
        wk_publish_load(w);
        if (pthread_create(&w->engine_thread, NULL, wk_engine_main, w) != 0) {
            PD_LOG_ERROR("worker: cannot start the engine thread");
        } else {
            PD_LOG_INFO("worker %s: %s, %d KV blocks of %d, transport %s, router %s",
                        w->o.name, role == PD_WORKER_PREFILL ? "prefill" : "decode",
                        pd_kv_pool_n_blocks(w->kv), w->bs,
                        w->o.transport == PD__KV_TRANSPORT__UCX        ? "ucx"
                        : w->o.transport == PD__KV_TRANSPORT__CUDA_IPC ? "cuda-ipc"
                                                                       : "zmq",
                        w->o.router);
            code = run(w);
        }
        g_worker = NULL;
    }
    teardown(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    free(w);
    return code;
}
