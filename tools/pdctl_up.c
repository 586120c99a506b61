/* pdctl_up.c - `pdctl up`: a whole local cluster on this machine. Starts pd-router
 * (client endpoint tcp://127.0.0.1:PORT, worker endpoint on a free port) and the prefill
 * and decode workers as child processes, waits until every worker has registered (the
 * router's HEALTH), prints the client endpoint, and on SIGINT or SIGTERM drains the
 * workers (SIGTERM, then SIGKILL after the drain timeout) and stops the router.
 * The binaries are taken from beside pdctl (or --bin-dir); each child's log goes to
 * --log-dir (default: a fresh directory under $TMPDIR), whose path is printed.
 * Single-threaded; signals are taken synchronously (sigtimedwait). */
#ifdef PD_HAVE_SERVICE
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/rpc.h"
#include "tools/pdctl.h"

#define MAX_CHILDREN 130

typedef struct child {
    pid_t pid;
    char name[32];
    bool is_router, exited;
    int status;
} child_t;

typedef struct up {
    const char *model, *tokenizer, *transport, *policy, *kv_memory, *bin_dir, *log_dir;
    const char *spec, *spec_k, *draft_model;
    const char *device, *weight_dtype; /* passed to every worker */
    bool cuda_graphs;                  /* --cuda-graphs, passed to every worker */
    const char *layerwise_min;         /* --kv-layerwise-min, to every worker */
    const char *sample_threads;        /* --sample-threads, to every worker */
    int n_prefill, n_decode, port, threads, local_prefill_max, drain_s, ready_s;
    child_t kids[MAX_CHILDREN];
    int n_kids;
    char client_ep[128], worker_ep[128], bindir[PATH_MAX], logdir[PATH_MAX];
} up_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pdctl up --model M [--tokenizer T] [--draft-model D] [--prefill N]\n"
            "                [--decode N]\n"
            "                [--port P] [--kv-transport ucx|zmq|cuda-ipc]\n"
            "                [--threads N]\n"
            "                [--policy prefix-aware|least-loaded|round-robin]\n"
            "                [--local-prefill-max N] [--kv-memory SIZE]\n"
            "                [--kv-layerwise-min N] [--bin-dir DIR]\n"
            "                [--log-dir DIR] [--drain-timeout S] [--ready-timeout S]\n"
            "                [--spec ngram|draft|off] [--spec-k N]\n"
            "                [--device cpu|cuda|cuda:N] [--weight-dtype auto|bf16]\n"
            "                [--cuda-graphs] [--sample-threads N]\n"
            "  Starts pd-router (clients on tcp://127.0.0.1:P, default 5555), N prefill\n"
            "  and N decode workers (default 1 each) on this machine, waits until all\n"
            "  have registered, prints the client endpoint, and runs until Ctrl-C or\n"
            "  SIGTERM, which drains the decode workers, then the prefill workers, and\n"
            "  stops the router. --threads: kernel threads per worker (default: the\n"
            "  CPUs divided among the workers).\n"
            "  --device: where every worker runs its engine (cuda: all on GPU 0).\n"
            "  --cuda-graphs: the workers replay repeated decode passes as CUDA graphs\n"
            "  (off by default; accepted and ignored on the CPU).\n"
            "  --kv-memory, --kv-layerwise-min, --device, --weight-dtype,\n"
            "  --sample-threads and --kv-transport go to every worker as the workers'\n"
            "  flags.\n");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_int(const char *s, long lo, long hi, int *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || end == s || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

/* Starts argv with stdout to out_fd (-1: the log) and stderr to the child's log. */
static child_t *spawn(up_t *u, const char *name, char **argv, int out_fd, bool router)
{
    if (u->n_kids >= MAX_CHILDREN)
        return NULL;
    char log[PATH_MAX + 64];
    snprintf(log, sizeof log, "%s/%s.log", u->logdir, name);
    int lfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (lfd < 0) {
        fprintf(stderr, "pdctl up: cannot write %s: %s\n", log, strerror(errno));
        return NULL;
    }
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "pdctl up: fork: %s\n", strerror(errno));
        close(lfd);
        return NULL;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setpgid(0, 0); /* Ctrl-C reaches pdctl only; it stops the children in order */
        dup2(out_fd >= 0 ? out_fd : lfd, 1);
        dup2(lfd, 2);
        execv(argv[0], argv);
        fprintf(stderr, "pdctl up: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(lfd);
    child_t *c = &u->kids[u->n_kids++];
    memset(c, 0, sizeof *c);
    c->pid = pid;
    c->is_router = router;
    snprintf(c->name, sizeof c->name, "%s", name);
    return c;
}

static void reap(up_t *u)
{
    for (;;) {
        int st = 0;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0)
            return;
        for (int i = 0; i < u->n_kids; i++)
            if (u->kids[i].pid == pid) {
                u->kids[i].exited = true;
                u->kids[i].status = st;
            }
    }
}

static int n_alive(up_t *u, bool routers)
{
    int n = 0;
    for (int i = 0; i < u->n_kids; i++)
        if (!u->kids[i].exited && u->kids[i].is_router == routers)
            n++;
    return n;
}

/* Prints the last error line (else the last line) of every exited child's log, so a
 * start that fails says why without opening the logs (a worker asked for a GPU this
 * machine lacks, a model it cannot read). */
static void report_exits(const up_t *u)
{
    for (int i = 0; i < u->n_kids; i++) {
        const child_t *c = &u->kids[i];
        if (!c->exited)
            continue;
        char path[PATH_MAX + 40], line[512], last[512] = "", err[512] = "";
        snprintf(path, sizeof path, "%s/%s.log", u->logdir, c->name);
        FILE *f = fopen(path, "r");
        while (f && fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            if (!line[0])
                continue;
            snprintf(last, sizeof last, "%s", line);
            if (strstr(line, "error"))
                snprintf(err, sizeof err, "%s", line);
        }
        if (f)
            fclose(f);
        if (err[0] || last[0])
            fprintf(stderr, "pdctl up: %s: %s\n", c->name, err[0] ? err : last);
    }
}

/* A live child of this kind: the router, or the workers whose name starts with
 * prefix ("prefill", "decode"). */
static bool of_kind(const child_t *c, bool router, const char *prefix)
{
    return !c->exited && c->is_router == router &&
           (router || !strncmp(c->name, prefix, strlen(prefix)));
}

/* Signals every live child of one kind and waits up to timeout_s for them. */
static void stop_kind(up_t *u, bool router, const char *prefix, int sig, double timeout_s)
{
    for (int i = 0; i < u->n_kids; i++)
        if (of_kind(&u->kids[i], router, prefix))
            kill(u->kids[i].pid, sig);
    double end = now_s() + timeout_s;
    for (;;) {
        int n = 0;
        for (int i = 0; i < u->n_kids; i++)
            n += of_kind(&u->kids[i], router, prefix);
        if (!n || now_s() >= end)
            break;
        usleep(20000);
        reap(u);
    }
}

/* Decode workers first: while they drain, the prefill workers still serve the KV of
 * the tasks being pulled, and with cuda-ipc a prefill worker frees its exported pool
 * only after every reader has closed its mapping (CUDA leaves a free before the
 * importer's close undefined). Then the prefill workers, then the router. */
static void stop_all(up_t *u, int drain_s)
{
    stop_kind(u, false, "decode", SIGTERM, drain_s);
    stop_kind(u, false, "decode", SIGKILL, 5);
    stop_kind(u, false, "prefill", SIGTERM, drain_s);
    stop_kind(u, false, "prefill", SIGKILL, 5);
    stop_kind(u, true, "", SIGTERM, 10);
    stop_kind(u, true, "", SIGKILL, 5);
}

/* Reads the router's "pd-router: client EP worker EP" line. */
static int read_endpoints(up_t *u, int fd, child_t *router)
{
    char buf[1024];
    size_t len = 0;
    double end = now_s() + 30;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    while (now_s() < end) {
        ssize_t r = read(fd, buf + len, sizeof buf - 1 - len);
        if (r > 0) {
            len += (size_t)r;
            buf[len] = 0;
            char *line = strstr(buf, "pd-router: client ");
            if (line && strchr(line, '\n')) {
                if (sscanf(line, "pd-router: client %127s worker %127s", u->client_ep,
                           u->worker_ep) == 2)
                    return 0;
                break;
            }
            if (len >= sizeof buf - 1)
                break;
        } else {
            reap(u);
            if (router->exited)
                break;
            usleep(20000);
        }
    }
    fprintf(stderr, "pdctl up: pd-router did not start (see %s/router.log)\n", u->logdir);
    return -1;
}

/* HEALTH until the workers are in, or the timeout. */
static int wait_ready(up_t *u)
{
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0, rc = -1;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(s, u->client_ep) != 0) {
        fprintf(stderr, "pdctl up: cannot connect to %s\n", u->client_ep);
        goto out;
    }
    double end = now_s() + u->ready_s, next_ask = 0;
    uint64_t rid = 1;
    while (now_s() < end) {
        reap(u);
        if (n_alive(u, true) == 0 || n_alive(u, false) < u->n_prefill + u->n_decode) {
            fprintf(stderr, "pdctl up: a process exited while starting (logs in %s)\n",
                    u->logdir);
            report_exits(u);
            goto out;
        }
        if (now_s() >= next_ask) {
            Pd__Envelope env;
            pd_rpc_envelope_init(&env, PD__METHOD__HEALTH, ++rid);
            Pd__HealthRequest h = PD__HEALTH_REQUEST__INIT;
            env.health = &h;
            pd_rpc_send(s, NULL, 0, &env, NULL, 0);
            next_ask = now_s() + 0.2;
        }
        zmq_pollitem_t it = {.socket = s, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 50) > 0) {
            pd_rpc_msg_t m;
            while (pd_rpc_recv(s, false, 0, 0, &m) == 1) {
                bool ready = m.env && m.env->method == PD__METHOD__HEALTH_REPLY &&
                             m.env->health_reply &&
                             (int)m.env->health_reply->prefill_workers >= u->n_prefill &&
                             (int)m.env->health_reply->decode_workers >= u->n_decode;
                pd_rpc_msg_clear(&m);
                if (ready) {
                    rc = 0;
                    goto out;
                }
            }
        }
    }
    fprintf(stderr, "pdctl up: the workers did not register within %d s (logs in %s)\n",
            u->ready_s, u->logdir);
out:
    zmq_close(s);
    zmq_ctx_term(ctx);
    return rc;
}

static int parse(up_t *u, int argc, char **argv)
{
    u->n_prefill = u->n_decode = 1;
    u->port = 5555;
    u->transport = "ucx";
    u->drain_s = 30;
    u->ready_s = 120;
    u->local_prefill_max = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(a, "--cuda-graphs")) { /* the one flag without a value */
            u->cuda_graphs = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "pdctl up: %s needs a value (or is unknown)\n", a);
            return -1;
        }
        const char *v = argv[++i];
        int bad = 0;
        if (!strcmp(a, "--model"))
            u->model = v;
        else if (!strcmp(a, "--tokenizer"))
            u->tokenizer = v;
        else if (!strcmp(a, "--prefill"))
            bad = parse_int(v, 0, 64, &u->n_prefill);
        else if (!strcmp(a, "--decode"))
            bad = parse_int(v, 1, 64, &u->n_decode);
        else if (!strcmp(a, "--port"))
            bad = parse_int(v, 0, 65535, &u->port);
        else if (!strcmp(a, "--threads"))
            bad = parse_int(v, 1, 1024, &u->threads);
        else if (!strcmp(a, "--local-prefill-max"))
            bad = parse_int(v, 0, INT_MAX, &u->local_prefill_max);
        else if (!strcmp(a, "--drain-timeout"))
            bad = parse_int(v, 0, 3600, &u->drain_s);
        else if (!strcmp(a, "--ready-timeout"))
            bad = parse_int(v, 1, 3600, &u->ready_s);
        else if (!strcmp(a, "--kv-transport"))
            bad = strcmp(v, "ucx") && strcmp(v, "zmq") && strcmp(v, "cuda-ipc")
                      ? -1
                      : ((u->transport = v), 0);
        else if (!strcmp(a, "--policy"))
            u->policy = v;
        else if (!strcmp(a, "--kv-memory"))
            u->kv_memory = v;
        else if (!strcmp(a, "--kv-layerwise-min")) {
            int k = 0;
            bad = parse_int(v, 0, 1 << 30, &k);
            u->layerwise_min = v;
        } else if (!strcmp(a, "--sample-threads")) {
            int k = 0;
            bad = parse_int(v, 0, 256, &k);
            u->sample_threads = v;
        } else if (!strcmp(a, "--spec"))
            bad = strcmp(v, "ngram") && strcmp(v, "draft") && strcmp(v, "off")
                      ? -1
                      : ((u->spec = v), 0);
        else if (!strcmp(a, "--draft-model"))
            u->draft_model = v;
        else if (!strcmp(a, "--device"))
            u->device = v;
        else if (!strcmp(a, "--weight-dtype"))
            bad =
                strcmp(v, "auto") && strcmp(v, "bf16") ? -1 : ((u->weight_dtype = v), 0);
        else if (!strcmp(a, "--spec-k")) {
            int k = 0;
            bad = parse_int(v, 0, 64, &k);
            u->spec_k = v;
        } else if (!strcmp(a, "--bin-dir"))
            u->bin_dir = v;
        else if (!strcmp(a, "--log-dir"))
            u->log_dir = v;
        else {
            fprintf(stderr, "pdctl up: unknown option %s\n", a);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "pdctl up: bad value for %s: %s\n", a, v);
            return -1;
        }
    }
    if (!u->model) {
        fprintf(stderr, "pdctl up: --model is required\n");
        return -1;
    }
    if (u->transport && !strcmp(u->transport, "cuda-ipc") &&
        (!u->device || strncmp(u->device, "cuda", 4))) {
        fprintf(stderr, "pdctl up: --kv-transport cuda-ipc needs --device cuda or cuda:N "
                        "(it copies the KV between GPU memories)\n");
        return -1;
    }
    if (u->n_prefill == 0 && u->local_prefill_max < 0)
        u->local_prefill_max =
            INT_MAX / 2; /* no prefill worker: decode workers prefill */
    return 0;
}

/* The directories: binaries beside pdctl (or --bin-dir), logs in --log-dir or a new
 * temporary one; and the threads per worker. */
static int resolve_dirs(up_t *u)
{
    if (u->bin_dir) {
        snprintf(u->bindir, sizeof u->bindir, "%s", u->bin_dir);
    } else {
        ssize_t n = readlink("/proc/self/exe", u->bindir, sizeof u->bindir - 1);
        if (n <= 0) {
            fprintf(stderr, "pdctl up: cannot find pdctl's directory; give --bin-dir\n");
            return -1;
        }
        u->bindir[n] = 0;
        char *slash = strrchr(u->bindir, '/');
        if (slash)
            *slash = 0;
    }
    if (u->log_dir) {
        snprintf(u->logdir, sizeof u->logdir, "%s", u->log_dir);
        mkdir(u->logdir, 0755);
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(u->logdir, sizeof u->logdir, "%s/pdctl-up-XXXXXX",
                 tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(u->logdir)) {
            fprintf(stderr, "pdctl up: cannot create a log directory: %s\n",
                    strerror(errno));
            return -1;
        }
    }
    int n_workers = u->n_prefill + u->n_decode;
    if (u->threads <= 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        u->threads = ncpu > n_workers ? (int)(ncpu / n_workers) : 1;
    }
    return 0;
}

/* Starts pd-router and reads its endpoints from its stdout. */
static int start_router(up_t *u)
{
    char bin[PATH_MAX + 16], cep[64], lpm[16];
    snprintf(bin, sizeof bin, "%s/pd-router", u->bindir);
    snprintf(cep, sizeof cep, "tcp://127.0.0.1:%d", u->port);
    snprintf(lpm, sizeof lpm, "%d", u->local_prefill_max);
    char *argv[32];
    int n = 0;
    argv[n++] = bin;
    argv[n++] = "--model";
    argv[n++] = (char *)u->model;
    if (u->tokenizer) {
        argv[n++] = "--tokenizer";
        argv[n++] = (char *)u->tokenizer;
    }
    argv[n++] = "--client-endpoint";
    argv[n++] = cep;
    argv[n++] = "--worker-endpoint";
    argv[n++] = "tcp://127.0.0.1:0";
    argv[n++] = "--kv-transport";
    argv[n++] = (char *)u->transport;
    if (u->policy) {
        argv[n++] = "--policy";
        argv[n++] = (char *)u->policy;
    }
    if (u->local_prefill_max >= 0) {
        argv[n++] = "--local-prefill-max";
        argv[n++] = lpm;
    }
    argv[n] = NULL;
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        fprintf(stderr, "pdctl up: pipe: %s\n", strerror(errno));
        return -1;
    }
    child_t *router = spawn(u, "router", argv, pipefd[1], true);
    close(pipefd[1]);
    int rc = router ? read_endpoints(u, pipefd[0], router) : -1;
    close(pipefd[0]);
    return rc;
}

/* Starts the prefill then the decode workers on the router's worker endpoint. */
static int start_workers(up_t *u)
{
    char prefill_bin[PATH_MAX + 16], decode_bin[PATH_MAX + 16], threads[16];
    snprintf(prefill_bin, sizeof prefill_bin, "%s/pd-prefill", u->bindir);
    snprintf(decode_bin, sizeof decode_bin, "%s/pd-decode", u->bindir);
    snprintf(threads, sizeof threads, "%d", u->threads);
    for (int i = 0; i < u->n_prefill + u->n_decode; i++) {
        bool prefill = i < u->n_prefill;
        char name[32];
        snprintf(name, sizeof name, "%s%d", prefill ? "prefill" : "decode",
                 prefill ? i : i - u->n_prefill);
        char *argv[40]; /* 32 at most */
        int n = 0;
        argv[n++] = prefill ? prefill_bin : decode_bin;
        argv[n++] = "--model";
        argv[n++] = (char *)u->model;
        if (u->tokenizer) {
            argv[n++] = "--tokenizer";
            argv[n++] = (char *)u->tokenizer;
        }
        argv[n++] = "--router";
        argv[n++] = u->worker_ep;
        argv[n++] = "--name";
        argv[n++] = name;
        argv[n++] = "--threads";
        argv[n++] = threads;
        argv[n++] = "--kv-transport";
        argv[n++] = (char *)u->transport;
        if (u->kv_memory) {
            argv[n++] = "--kv-memory";
            argv[n++] = (char *)u->kv_memory;
        }
        if (u->layerwise_min) {
            argv[n++] = "--kv-layerwise-min";
            argv[n++] = (char *)u->layerwise_min;
        }
        if (u->device) {
            argv[n++] = "--device";
            argv[n++] = (char *)u->device;
        }
        if (u->weight_dtype) {
            argv[n++] = "--weight-dtype";
            argv[n++] = (char *)u->weight_dtype;
        }
        if (u->cuda_graphs)
            argv[n++] = "--cuda-graphs";
        if (u->sample_threads) {
            argv[n++] = "--sample-threads";
            argv[n++] = (char *)u->sample_threads;
        }
        if (!prefill && u->local_prefill_max >= 0)
            argv[n++] = "--local-prefill";
        if (!prefill && u->spec) {
            argv[n++] = "--spec";
            argv[n++] = (char *)u->spec;
        }
        if (!prefill && u->draft_model) {
            argv[n++] = "--draft-model";
            argv[n++] = (char *)u->draft_model;
        }
        if (!prefill && u->spec_k) {
            argv[n++] = "--spec-k";
            argv[n++] = (char *)u->spec_k;
        }
        argv[n] = NULL;
        if (!spawn(u, name, argv, -1, false))
            return -1;
    }
    return 0;
}

/* Until Ctrl-C or SIGTERM (0) or the router's end (1), reporting children that exit. */
static int supervise(up_t *u, const sigset_t *set)
{
    for (;;) {
        struct timespec ts = {.tv_sec = 1};
        int sig = sigtimedwait(set, NULL, &ts);
        reap(u);
        if (sig == SIGINT || sig == SIGTERM) {
            fprintf(stderr, "pdctl up: stopping (draining the workers)\n");
            return 0;
        }
        for (int i = 0; i < u->n_kids; i++) {
            child_t *c = &u->kids[i];
            if (c->exited && c->pid > 0) {
                fprintf(stderr, "pdctl up: %s exited (%s %d); see %s/%s.log\n", c->name,
                        WIFSIGNALED(c->status) ? "signal" : "status",
                        WIFSIGNALED(c->status) ? WTERMSIG(c->status)
                                               : WEXITSTATUS(c->status),
                        u->logdir, c->name);
                c->pid = -c->pid; /* reported */
            }
        }
        if (n_alive(u, true) == 0) {
            fprintf(stderr, "pdctl up: the router is gone; stopping\n");
            return 1;
        }
    }
}

int pd_cmd_up(int argc, char **argv)
{
    static up_t u; /* large; one per process */
    memset(&u, 0, sizeof u);
    int pr = parse(&u, argc, argv);
    if (pr)
        return pr < 0 ? 2 : 0;
    if (resolve_dirs(&u) != 0)
        return 1;
    /* signals are taken synchronously from here on */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    if (start_router(&u) != 0 || start_workers(&u) != 0 || wait_ready(&u) != 0) {
        stop_all(&u, 0);
        return 1;
    }
    printf("pdctl up: ready: %d prefill + %d decode workers; client endpoint %s\n"
           "pdctl up: logs in %s; Ctrl-C stops the cluster\n",
           u.n_prefill, u.n_decode, u.client_ep, u.logdir);
    fflush(stdout);
    int rc = supervise(&u, &set);
    stop_all(&u, u.drain_s);
    return rc;
}
#endif
