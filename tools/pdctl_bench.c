/* pdctl_bench.c - `pdctl bench`: a load generator for a running router with the
 * metrics of vLLM's `bench serve`: TTFT, TPOT, ITL and end-to-end latency (mean,
 * median, p90, p99), request and token throughput, and goodput under SLOs.
 *
 * Design: synthetic prompts of random token ids (a shared prefix, then a uniform
 * length around --input-len) sent with ignore_eos so output lengths are exact.
 * Arrivals follow a Poisson process (or fixed intervals) at --request-rate, capped by
 * --max-concurrency. All requests share one client socket and are driven by one
 * single-threaded pdc_poll loop; times are the client's (CLOCK_MONOTONIC), from the
 * moment a request is submitted. Built only with the service (PD_HAVE_SERVICE). */
#ifdef PD_HAVE_SERVICE
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/pdclient.h"
#include "tools/pdctl.h"
#include "tools/pdctl_generate.h"

typedef struct bench_args {
    const char *router, *json_path, *arrival;
    int32_t num_prompts, max_concurrency, input_len, output_len, prefix_len, vocab;
    double request_rate; /* requests/s; INFINITY: all at once */
    double input_range, output_range, slo_ttft_ms, slo_tpot_ms, timeout_s;
    double temperature;
    uint64_t seed;
} bench_args_t;

typedef struct breq {
    int32_t *ids; /* the prompt */
    int32_t n_ids, max_tokens;
    double t_arrive, t_submit, t_first, t_last, t_done; /* s, from the start */
    int32_t n_out;
    bool submitted, done, ok;
    pdc_code_t err;
} breq_t;

typedef struct bench {
    const bench_args_t *a;
    breq_t *reqs;
    double t0;
    int32_t in_flight, n_done, n_ok;
    double *itl; /* ms, every gap between two chunks of a request */
    size_t n_itl, cap_itl;
    int32_t err_count[128]; /* by pdc_code_t */
    char first_err[320];
} bench_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pdctl bench --router ENDPOINT [--num-prompts N]\n"
            "         [--request-rate R|inf] [--arrival poisson|fixed] "
            "[--max-concurrency C]\n"
            "         [--input-len L] [--input-len-range F] [--output-len L]\n"
            "         [--output-len-range F] [--prefix-len P] [--vocab N] [--seed S]\n"
            "         [--temperature X] [--slo-ttft-ms MS] [--slo-tpot-ms MS]\n"
            "         [--timeout S] [--json FILE]\n"
            "  Sends N synthetic prompts (default 100) of random token ids from [3, N)\n"
            "  (--vocab, default 512): a shared prefix of P ids (default 0), then\n"
            "  L (default 128) ids, uniform in L*(1-F)..L*(1+F); each asks for\n"
            "  --output-len tokens (default 64, same range rule) with ignore_eos.\n"
            "  Arrivals: Poisson at R requests/s (default inf: all at once) or fixed\n"
            "  intervals; at most C in flight (default 0: no cap). Reports TTFT, TPOT,\n"
            "  ITL and E2E latency (mean, median, p90, p99), throughput and goodput\n"
            "  (requests meeting every SLO given); --json writes the same as JSON.\n"
            "  Exit status 1 when a request failed.\n");
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *v_p)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "pdctl bench: bad value '%s' for %s (expected %g..%g)\n", s, opt,
                lo, hi);
        return -1;
    }
    *v_p = v;
    return 0;
}

static int parse_value(bench_args_t *a, const char *o, const char *val)
{
    double v;
    if (!strcmp(o, "--router"))
        a->router = val;
    else if (!strcmp(o, "--json"))
        a->json_path = val;
    else if (!strcmp(o, "--arrival"))
        a->arrival = val;
    else if (!strcmp(o, "--request-rate") && !strcmp(val, "inf"))
        a->request_rate = INFINITY;
    else if (!strcmp(o, "--request-rate") && !parse_num(o, val, 1e-6, 1e9, &v))
        a->request_rate = v;
    else if (!strcmp(o, "--num-prompts") && !parse_num(o, val, 1, 1e7, &v))
        a->num_prompts = (int32_t)v;
    else if (!strcmp(o, "--max-concurrency") && !parse_num(o, val, 0, 1e7, &v))
        a->max_concurrency = (int32_t)v;
    else if (!strcmp(o, "--input-len") && !parse_num(o, val, 0, 1 << 24, &v))
        a->input_len = (int32_t)v;
    else if (!strcmp(o, "--output-len") && !parse_num(o, val, 1, 1 << 24, &v))
        a->output_len = (int32_t)v;
    else if (!strcmp(o, "--prefix-len") && !parse_num(o, val, 0, 1 << 24, &v))
        a->prefix_len = (int32_t)v;
    else if (!strcmp(o, "--vocab") && !parse_num(o, val, 4, 1 << 30, &v))
        a->vocab = (int32_t)v;
    else if (!strcmp(o, "--input-len-range") && !parse_num(o, val, 0, 1, &v))
        a->input_range = v;
    else if (!strcmp(o, "--output-len-range") && !parse_num(o, val, 0, 1, &v))
        a->output_range = v;
    else if (!strcmp(o, "--slo-ttft-ms") && !parse_num(o, val, 0, 1e9, &v))
        a->slo_ttft_ms = v;
    else if (!strcmp(o, "--slo-tpot-ms") && !parse_num(o, val, 0, 1e9, &v))
        a->slo_tpot_ms = v;
    else if (!strcmp(o, "--timeout") && !parse_num(o, val, 0.001, 86400.0 * 30, &v))
        a->timeout_s = v;
    else if (!strcmp(o, "--temperature") && !parse_num(o, val, 0, 1e6, &v))
        a->temperature = v;
    else if (!strcmp(o, "--seed") && !parse_num(o, val, 0, 18446744073709551615.0, &v))
        a->seed = strtoull(val, NULL, 10);
    else {
        if (strncmp(o, "--", 2) ||
            !strstr(" --router --json --arrival --request-rate --num-prompts "
                    "--max-concurrency --input-len --output-len --prefix-len --vocab "
                    "--input-len-range --output-len-range --slo-ttft-ms --slo-tpot-ms "
                    "--timeout --temperature --seed ",
                    o))
            fprintf(stderr, "pdctl bench: unknown option '%s'\n", o);
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, bench_args_t *a)
{
    *a = (bench_args_t){.router = "tcp://127.0.0.1:5555",
                        .arrival = "poisson",
                        .num_prompts = 100,
                        .input_len = 128,
                        .output_len = 64,
                        .vocab = 512,
                        .request_rate = INFINITY,
                        .slo_ttft_ms = -1,
                        .slo_tpot_ms = -1,
                        .timeout_s = 600};
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "pdctl bench: %s needs a value\n", o);
            return -1;
        }
        if (parse_value(a, o, argv[++i]))
            return -1;
    }
    if (strcmp(a->arrival, "poisson") && strcmp(a->arrival, "fixed")) {
        fprintf(stderr, "pdctl bench: --arrival must be poisson or fixed\n");
        return -1;
    }
    if (a->prefix_len + a->input_len < 1) {
        fprintf(stderr, "pdctl bench: a prompt needs at least one token\n");
        return -1;
    }
    return 0;
}

/* ---- synthetic requests ---- */

static uint64_t rng_next(uint64_t *s) /* splitmix64 */
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s) /* [0, 1) */
{
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

/* Uniform in [len*(1-f), len*(1+f)] (vLLM's random dataset), at least lo. */
static int32_t pick_len(uint64_t *s, int32_t len, double f, int32_t lo)
{
    int64_t a = (int64_t)(len * (1 - f)), b = (int64_t)(len * (1 + f));
    int64_t v = a + (int64_t)(rng_unit(s) * (double)(b - a + 1));
    if (v > b)
        v = b;
    return v < lo ? lo : (int32_t)v;
}

static int make_requests(bench_t *b)
{
    const bench_args_t *a = b->a;
    uint64_t s = a->seed ^ 0x5eedull;
    int32_t span = a->vocab - 3;
    int32_t *prefix = malloc(((size_t)a->prefix_len + 1) * sizeof *prefix);
    b->reqs = calloc((size_t)a->num_prompts, sizeof *b->reqs);
    if (!prefix || !b->reqs) {
        free(prefix);
        return -1;
    }
    for (int32_t j = 0; j < a->prefix_len; j++)
        prefix[j] = 3 + (int32_t)(rng_next(&s) % (uint64_t)span);
    double t = 0;
    for (int32_t i = 0; i < a->num_prompts; i++) {
        breq_t *r = &b->reqs[i];
        int32_t in = pick_len(&s, a->input_len, a->input_range, a->prefix_len ? 0 : 1);
        r->max_tokens = pick_len(&s, a->output_len, a->output_range, 1);
        r->n_ids = a->prefix_len + in;
        r->ids = malloc((size_t)r->n_ids * sizeof *r->ids);
        if (!r->ids) {
            free(prefix);
            return -1;
        }
        memcpy(r->ids, prefix, (size_t)a->prefix_len * sizeof *prefix);
        for (int32_t j = a->prefix_len; j < r->n_ids; j++)
            r->ids[j] = 3 + (int32_t)(rng_next(&s) % (uint64_t)span);
        if (i > 0 && isfinite(a->request_rate)) {
            if (!strcmp(a->arrival, "fixed"))
                t += 1.0 / a->request_rate;
            else
                t += -log(1.0 - rng_unit(&s)) / a->request_rate;
        }
        r->t_arrive = t;
    }
    free(prefix);
    return 0;
}

/* ---- the run ---- */

static int on_event(void *user, const pdc_event_t *ev)
{
    bench_t *b = user;
    breq_t *r = ev->req_user;
    if (!r || ev->kind == PDC_EVENT_CANCEL_REPLY)
        return 0;
    double now = pd_now_s() - b->t0;
    if (ev->kind == PDC_EVENT_CHUNK && ev->chunk->n_ids) {
        if (!r->n_out) {
            r->t_first = now;
        } else {
            if (b->n_itl == b->cap_itl) {
                size_t cap = b->cap_itl ? b->cap_itl * 2 : 4096;
                double *p = realloc(b->itl, cap * sizeof *p);
                if (!p)
                    return 0; /* an ITL sample lost is no reason to stop */
                b->itl = p;
                b->cap_itl = cap;
            }
            b->itl[b->n_itl++] = (now - r->t_last) * 1e3;
        }
        r->t_last = now;
        r->n_out += (int32_t)ev->chunk->n_ids;
    }
    if (!ev->done)
        return 0;
    r->done = true;
    r->t_done = now;
    b->in_flight--;
    b->n_done++;
    if (ev->kind == PDC_EVENT_CHUNK && strcmp(ev->chunk->finish_reason, "cancelled")) {
        r->ok = true;
        b->n_ok++;
        return 0;
    }
    r->err = ev->kind == PDC_EVENT_ERROR ? ev->error->code : PDC_CANCELLED;
    b->err_count[(unsigned)r->err < 128 ? r->err : 127]++;
    if (!b->first_err[0])
        snprintf(b->first_err, sizeof b->first_err, "%s: %s", pdc_code_name(r->err),
                 ev->kind == PDC_EVENT_ERROR ? ev->error->message : "cancelled");
    return 0;
}

static int run(bench_t *b, pdc_client_t *c)
{
    const bench_args_t *a = b->a;
    int32_t next = 0, n = a->num_prompts;
    b->t0 = pd_now_s();
    while (b->n_done < n) {
        double now = pd_now_s() - b->t0;
        while (next < n && b->reqs[next].t_arrive <= now &&
               (!a->max_concurrency || b->in_flight < a->max_concurrency)) {
            breq_t *r = &b->reqs[next++];
            pdc_request_t req = {.prompt_ids = r->ids,
                                 .n_prompt_ids = (size_t)r->n_ids,
                                 .max_tokens = r->max_tokens,
                                 .temperature = (float)a->temperature,
                                 .ignore_eos = true,
                                 .no_text = true,
                                 .timeout_ms = (uint32_t)ceil(a->timeout_s * 1e3)};
            pdc_error_t err;
            r->t_submit = pd_now_s() - b->t0;
            if (pdc_submit(c, &req, r, NULL, &err) != PD_OK) {
                fprintf(stderr, "pdctl bench: submit failed: %s: %s\n",
                        pdc_code_name(err.code), err.message);
                return -1;
            }
            r->submitted = true;
            b->in_flight++;
            now = pd_now_s() - b->t0;
        }
        int wait = 1000;
        if (next < n && (!a->max_concurrency || b->in_flight < a->max_concurrency)) {
            double dt = b->reqs[next].t_arrive - now;
            wait = dt <= 0 ? 0 : (int)ceil(dt * 1e3);
            if (wait > 1000)
                wait = 1000;
        }
        if (pdc_poll(c, wait, on_event, b) < 0) {
            fprintf(stderr, "pdctl bench: the client socket failed\n");
            return -1;
        }
    }
    return 0;
}

/* ---- metrics ---- */

typedef struct dist {
    double mean, std, median, p90, p99;
    size_t n;
} dist_t;

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double pct(const double *sorted, size_t n, double p) /* linear, like numpy */
{
    double pos = p / 100.0 * (double)(n - 1);
    size_t i = (size_t)pos;
    if (i + 1 >= n)
        return sorted[n - 1];
    return sorted[i] + (sorted[i + 1] - sorted[i]) * (pos - (double)i);
}

static dist_t summarize(double *v, size_t n) /* sorts v */
{
    dist_t d = {.n = n};
    if (!n)
        return d;
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0, sq = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    d.mean = sum / (double)n;
    for (size_t i = 0; i < n; i++)
        sq += (v[i] - d.mean) * (v[i] - d.mean);
    d.std = sqrt(sq / (double)n);
    d.median = pct(v, n, 50);
    d.p90 = pct(v, n, 90);
    d.p99 = pct(v, n, 99);
    return d;
}

typedef struct report {
    double duration;
    int64_t in_tokens, out_tokens;
    int32_t good;
    dist_t ttft, tpot, itl, e2el;
} report_t;

static int compute(bench_t *b, report_t *rp)
{
    const bench_args_t *a = b->a;
    size_t n = (size_t)a->num_prompts;
    double *ttft = malloc((n + 1) * sizeof *ttft), *tpot = malloc((n + 1) * sizeof *tpot),
           *e2el = malloc((n + 1) * sizeof *e2el);
    if (!ttft || !tpot || !e2el) {
        free(ttft);
        free(tpot);
        free(e2el);
        return -1;
    }
    size_t nt = 0, np = 0;
    double t_end = 0;
    memset(rp, 0, sizeof *rp);
    for (size_t i = 0; i < n; i++) {
        const breq_t *r = &b->reqs[i];
        if (r->t_done > t_end)
            t_end = r->t_done;
        if (!r->ok)
            continue;
        rp->in_tokens += r->n_ids;
        rp->out_tokens += r->n_out;
        double ft = (r->t_first - r->t_submit) * 1e3,
               e2e = (r->t_done - r->t_submit) * 1e3;
        double tp = r->n_out > 1 ? (e2e - ft) / (r->n_out - 1) : 0;
        ttft[nt] = ft;
        e2el[nt++] = e2e;
        if (r->n_out > 1)
            tpot[np++] = tp;
        bool good = (a->slo_ttft_ms < 0 || ft <= a->slo_ttft_ms) &&
                    (a->slo_tpot_ms < 0 || tp <= a->slo_tpot_ms);
        rp->good += good;
    }
    rp->duration = t_end;
    rp->ttft = summarize(ttft, nt);
    rp->tpot = summarize(tpot, np);
    rp->e2el = summarize(e2el, nt);
    rp->itl = summarize(b->itl, b->n_itl);
    free(ttft);
    free(tpot);
    free(e2el);
    return 0;
}

static void print_dist(const char *title, const dist_t *d)
{
    printf("%s\n", title);
    printf("%-40s %-10.2f\n", "Mean", d->mean);
    printf("%-40s %-10.2f\n", "Median", d->median);
    printf("%-40s %-10.2f\n", "P90", d->p90);
    printf("%-40s %-10.2f\n", "P99", d->p99);
}

static double per_s(double x, double dur)
{
    return dur > 0 ? x / dur : 0;
}

static bool has_slo(const bench_args_t *a)
{
    return a->slo_ttft_ms >= 0 || a->slo_tpot_ms >= 0;
}

static void print_table(const bench_t *b, const report_t *r)
{
    const bench_args_t *a = b->a;
    printf("============ Serving Benchmark Result ============\n");
    printf("%-40s %-10d\n", "Successful requests:", b->n_ok);
    printf("%-40s %-10d\n", "Failed requests:", b->n_done - b->n_ok);
    printf("%-40s %-10.2f\n", "Benchmark duration (s):", r->duration);
    printf("%-40s %-10lld\n", "Total input tokens:", (long long)r->in_tokens);
    printf("%-40s %-10lld\n", "Total generated tokens:", (long long)r->out_tokens);
    printf("%-40s %-10.2f\n", "Request throughput (req/s):", per_s(b->n_ok, r->duration));
    if (has_slo(a))
        printf("%-40s %-10.2f\n",
               "Request goodput (req/s):", per_s(r->good, r->duration));
    printf("%-40s %-10.2f\n",
           "Output token throughput (tok/s):", per_s((double)r->out_tokens, r->duration));
    printf("%-40s %-10.2f\n", "Total token throughput (tok/s):",
           per_s((double)(r->in_tokens + r->out_tokens), r->duration));
    print_dist("---------------Time to First Token (ms)-----------", &r->ttft);
    print_dist("-----Time per Output Token, excl. 1st (ms)--------", &r->tpot);
    print_dist("---------------Inter-token Latency (ms)-----------", &r->itl);
    print_dist("----------------End-to-end Latency (ms)-----------", &r->e2el);
    printf("==================================================\n");
    if (b->first_err[0])
        printf("first error: %s\n", b->first_err);
    fflush(stdout);
}

static void json_dist(json_object *o, const char *name, const dist_t *d)
{
    static const char *const stat[] = {"mean", "median", "std", "p90", "p99"};
    double v[] = {d->mean, d->median, d->std, d->p90, d->p99};
    char key[64];
    for (int i = 0; i < 5; i++) {
        snprintf(key, sizeof key, "%s_%s_ms", stat[i], name);
        json_object_object_add(o, key, json_object_new_double(v[i]));
    }
}

static int write_json(const bench_t *b, const report_t *r)
{
    const bench_args_t *a = b->a;
    json_object *o = json_object_new_object(), *errs = json_object_new_object();
    json_object_object_add(o, "router", json_object_new_string(a->router));
    json_object_object_add(o, "num_prompts", json_object_new_int(a->num_prompts));
    json_object_object_add(o, "request_rate",
                           isfinite(a->request_rate)
                               ? json_object_new_double(a->request_rate)
                               : json_object_new_string("inf"));
    json_object_object_add(o, "arrival", json_object_new_string(a->arrival));
    json_object_object_add(o, "max_concurrency", json_object_new_int(a->max_concurrency));
    json_object_object_add(o, "input_len", json_object_new_int(a->input_len));
    json_object_object_add(o, "input_len_range", json_object_new_double(a->input_range));
    json_object_object_add(o, "output_len", json_object_new_int(a->output_len));
    json_object_object_add(o, "output_len_range",
                           json_object_new_double(a->output_range));
    json_object_object_add(o, "prefix_len", json_object_new_int(a->prefix_len));
    json_object_object_add(o, "vocab", json_object_new_int(a->vocab));
    json_object_object_add(o, "seed", json_object_new_uint64(a->seed));
    json_object_object_add(o, "completed", json_object_new_int(b->n_ok));
    json_object_object_add(o, "failed", json_object_new_int(b->n_done - b->n_ok));
    json_object_object_add(o, "duration", json_object_new_double(r->duration));
    json_object_object_add(o, "total_input_tokens", json_object_new_int64(r->in_tokens));
    json_object_object_add(o, "total_output_tokens",
                           json_object_new_int64(r->out_tokens));
    json_object_object_add(o, "request_throughput",
                           json_object_new_double(per_s(b->n_ok, r->duration)));
    json_object_object_add(
        o, "output_throughput",
        json_object_new_double(per_s((double)r->out_tokens, r->duration)));
    json_object_object_add(o, "total_token_throughput",
                           json_object_new_double(per_s(
                               (double)(r->in_tokens + r->out_tokens), r->duration)));
    json_object_object_add(o, "slo_ttft_ms",
                           a->slo_ttft_ms >= 0 ? json_object_new_double(a->slo_ttft_ms)
                                               : NULL);
    json_object_object_add(o, "slo_tpot_ms",
                           a->slo_tpot_ms >= 0 ? json_object_new_double(a->slo_tpot_ms)
                                               : NULL);
    json_object_object_add(o, "good_requests", json_object_new_int(r->good));
    json_object_object_add(
        o, "request_goodput",
        has_slo(a) ? json_object_new_double(per_s(r->good, r->duration)) : NULL);
    json_dist(o, "ttft", &r->ttft);
    json_dist(o, "tpot", &r->tpot);
    json_dist(o, "itl", &r->itl);
    json_dist(o, "e2el", &r->e2el);
    json_object_object_add(o, "itl_samples", json_object_new_int64((int64_t)r->itl.n));
    for (int i = 0; i < 128; i++)
        if (b->err_count[i])
            json_object_object_add(errs, pdc_code_name((pdc_code_t)i),
                                   json_object_new_int(b->err_count[i]));
    json_object_object_add(o, "errors", errs);
    json_object_object_add(o, "first_error",
                           b->first_err[0] ? json_object_new_string(b->first_err) : NULL);
    int rc = json_object_to_file_ext(
        a->json_path, o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE);
    json_object_put(o);
    if (rc) {
        fprintf(stderr, "pdctl bench: cannot write '%s': %s\n", a->json_path,
                json_util_get_last_err());
        return -1;
    }
    return 0;
}

int pd_cmd_bench(int argc, char **argv)
{
    bench_args_t a;
    int rc = parse_args(argc, argv, &a);
    if (rc)
        return rc > 0 ? 0 : 2;
    bench_t b = {.a = &a};
    pdc_client_t *c = NULL;
    report_t rep;
    rc = 1;
    if (make_requests(&b)) {
        fprintf(stderr, "pdctl bench: no memory for %d prompts\n", a.num_prompts);
        goto out;
    }
    if (pdc_client_new(a.router, NULL, &c) != PD_OK) {
        fprintf(stderr, "pdctl bench: cannot connect to '%s'\n", a.router);
        goto out;
    }
    if (run(&b, c) || compute(&b, &rep)) {
        fprintf(stderr, "pdctl bench: the run failed\n");
        goto out;
    }
    print_table(&b, &rep);
    if (a.json_path && write_json(&b, &rep))
        goto out;
    rc = b.n_ok == a.num_prompts ? 0 : 1;
out:
    pdc_client_destroy(&c);
    if (b.reqs)
        for (int32_t i = 0; i < a.num_prompts; i++)
            free(b.reqs[i].ids);
    free(b.reqs);
    free(b.itl);
    return rc;
}
#endif /* PD_HAVE_SERVICE */
