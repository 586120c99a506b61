/* pdctl_complete.c - `pdctl complete`: one completion from a running pdserve router,
 * through libpdclient (client/pdclient.h). Text mode streams each chunk's text as it
 * arrives; json mode prints one object with the fields of `pdctl generate --format
 * json` that apply to a remote run, plus the router's usage and the client's timings.
 * Single-threaded. Built only with the service (PD_HAVE_SERVICE). */
#ifdef PD_HAVE_SERVICE
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/pdclient.h"
#include "common/utf8.h"
#include "tools/pdctl.h"
#include "tools/pdctl_generate.h"

typedef struct complete_args {
    const char *router, *prompt, *format;
    int32_t *ids; /* --prompt-ids */
    size_t n_ids;
    int32_t *stop_ids;
    size_t n_stop_ids;
    double timeout_s;
    pdc_request_t req;
} complete_args_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pdctl complete --router ENDPOINT (--prompt P | --prompt-ids 1,2,3)\n"
            "         [--max-tokens N] [--temperature X] [--top-p X] [--top-k N]\n"
            "         [--min-p X] [--seed N] [--ignore-eos] [--stop-ids 2,13]\n"
            "         [--spec-k N (speculation: -1 off, 0 the worker's)]\n"
            "         [--timeout S] [--format text|json]\n"
            "  Runs one completion on the router's client endpoint (default\n"
            "  tcp://127.0.0.1:5555). Defaults as pdctl generate: --max-tokens 256,\n"
            "  greedy, a seed picked by the router (printed in json); --timeout 600 s.\n"
            "  text streams the generated text as it arrives; json prints one object.\n");
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *v_p)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "pdctl complete: bad value '%s' for %s (expected %g..%g)\n", s,
                opt, lo, hi);
        return -1;
    }
    *v_p = v;
    return 0;
}

/* "1,2,3" into a new array; -1 on a bad list. */
static int parse_ids(const char *opt, const char *s, int32_t **ids_p, size_t *n_p)
{
    size_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids)
        return -1;
    size_t n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            fprintf(stderr, "pdctl complete: bad id list '%s' for %s\n", s, opt);
            free(ids);
            return -1;
        }
        ids[n++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!n) {
        fprintf(stderr, "pdctl complete: empty id list for %s\n", opt);
        free(ids);
        return -1;
    }
    free(*ids_p);
    *ids_p = ids;
    *n_p = n;
    return 0;
}

static int parse_value(complete_args_t *a, const char *o, const char *val)
{
    double v;
    pdc_request_t *r = &a->req;
    if (!strcmp(o, "--router"))
        a->router = val;
    else if (!strcmp(o, "--prompt"))
        a->prompt = val;
    else if (!strcmp(o, "--prompt-ids"))
        return parse_ids(o, val, &a->ids, &a->n_ids);
    else if (!strcmp(o, "--stop-ids"))
        return parse_ids(o, val, &a->stop_ids, &a->n_stop_ids);
    else if (!strcmp(o, "--format"))
        a->format = val;
    else if (!strcmp(o, "--max-tokens") && !parse_num(o, val, -1, 1 << 24, &v))
        r->max_tokens = (int32_t)v;
    else if (!strcmp(o, "--temperature") && !parse_num(o, val, 0, 1e6, &v))
        r->temperature = (float)v;
    else if (!strcmp(o, "--top-p") && !parse_num(o, val, 1e-9, 1, &v))
        r->top_p = (float)v;
    else if (!strcmp(o, "--top-k") && !parse_num(o, val, 0, 1 << 30, &v))
        r->top_k = (int32_t)v;
    else if (!strcmp(o, "--min-p") && !parse_num(o, val, 0, 1, &v))
        r->min_p = (float)v;
    else if (!strcmp(o, "--spec-k") && !parse_num(o, val, -1, 64, &v))
        r->spec_k = (int32_t)v;
    else if (!strcmp(o, "--timeout") && !parse_num(o, val, 0.001, 86400.0 * 30, &v))
        a->timeout_s = v;
    else if (!strcmp(o, "--seed") && !parse_num(o, val, 0, 18446744073709551615.0, &v)) {
        r->seed = strtoull(val, NULL, 10);
        r->has_seed = true;
    } else {
        if (strncmp(o, "--", 2) ||
            !strstr(" --router --prompt --prompt-ids --stop-ids --format --max-tokens "
                    "--temperature --top-p --top-k --min-p --timeout --seed --spec-k ",
                    o))
            fprintf(stderr, "pdctl complete: unknown option '%s'\n", o);
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, complete_args_t *a)
{
    a->router = "tcp://127.0.0.1:5555";
    a->format = "text";
    a->timeout_s = 600;
    a->req.max_tokens = 256;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(o, "--ignore-eos")) {
            a->req.ignore_eos = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "pdctl complete: %s needs a value\n", o);
            return -1;
        }
        if (parse_value(a, o, argv[++i]))
            return -1;
    }
    if (!a->prompt == !a->n_ids) {
        fprintf(stderr, "pdctl complete: one of --prompt and --prompt-ids is required\n");
        usage(stderr);
        return -1;
    }
    if (strcmp(a->format, "text") && strcmp(a->format, "json")) {
        fprintf(stderr, "pdctl complete: --format must be text or json\n");
        return -1;
    }
    a->req.prompt = a->prompt;
    a->req.prompt_ids = a->ids;
    a->req.n_prompt_ids = a->n_ids;
    a->req.stop_ids = a->stop_ids;
    a->req.n_stop_ids = a->n_stop_ids;
    a->req.timeout_ms = (uint32_t)ceil(a->timeout_s * 1e3);
    return 0;
}

/* Writes a chunk's text. pd-router sends whole UTF-8 characters only; from another
 * router, bytes that are not UTF-8 print as U+FFFD, as pdctl generate's never do. */
static int on_chunk(void *user, const pdc_chunk_t *ch)
{
    (void)user;
    if (ch->text_len) {
        char *clean = malloc(3 * ch->text_len + 1);
        if (clean)
            fwrite(clean, 1, pd_utf8_sanitize(ch->text, ch->text_len, clean), stdout);
        else
            fwrite(ch->text, 1, ch->text_len, stdout);
        free(clean);
        fflush(stdout);
    }
    return 0;
}

static void print_json(const complete_args_t *a, const pdc_result_t *r)
{
    json_object *o = json_object_new_object(), *t = json_object_new_object();
    const pdc_usage_t *u = r->has_usage ? &r->usage : NULL;
    json_object_object_add(o, "router", pd_json_string_utf8(a->router));
    json_object_object_add(o, "request_id", json_object_new_uint64(r->request_id));
    json_object_object_add(o, "prompt",
                           a->prompt ? pd_json_string_utf8(a->prompt) : NULL);
    if (u && u->n_prompt_ids)
        json_object_object_add(o, "prompt_ids",
                               pd_json_ids(u->prompt_ids, (int32_t)u->n_prompt_ids));
    else
        json_object_object_add(o, "prompt_ids", pd_json_ids(a->ids, (int32_t)a->n_ids));
    json_object_object_add(o, "ids", pd_json_ids(r->ids, (int32_t)r->n_ids));
    json_object_object_add(o, "text", pd_json_string_utf8(r->text ? r->text : ""));
    json_object_object_add(o, "finish_reason", pd_json_string_utf8(r->finish_reason));
    json_object_object_add(o, "seed", json_object_new_uint64(u ? u->seed : a->req.seed));
    json_object_object_add(o, "cached_tokens",
                           json_object_new_int64(u ? u->cached_tokens : 0));
    json_object_object_add(o, "prompt_tokens",
                           json_object_new_int64(u ? u->prompt_tokens : 0));
    json_object_object_add(
        o, "completion_tokens",
        json_object_new_int64(u ? u->completion_tokens : (int64_t)r->n_ids));
    json_object_object_add(o, "retries", json_object_new_int64(u ? u->retries : 0));
    json_object *sp = json_object_new_object();
    json_object_object_add(sp, "proposed", json_object_new_int64(u ? (int64_t)u->spec_proposed : 0));
    json_object_object_add(sp, "accepted", json_object_new_int64(u ? (int64_t)u->spec_accepted : 0));
    json_object_object_add(o, "spec", sp);
    json_object_object_add(o, "prefill_worker",
                           pd_json_string_utf8(u ? u->prefill_worker : ""));
    json_object_object_add(o, "decode_worker",
                           pd_json_string_utf8(u ? u->decode_worker : ""));
    json_object_object_add(t, "ttft_ms", json_object_new_double(r->ttft_ms));
    json_object_object_add(t, "e2e_ms", json_object_new_double(r->e2e_ms));
    double decode_ms = r->e2e_ms - r->ttft_ms;
    json_object_object_add(
        t, "gen_tokens_per_s",
        json_object_new_double(r->n_ids > 1 && decode_ms > 0
                                   ? (double)(r->n_ids - 1) / (decode_ms * 1e-3)
                                   : 0));
    json_object_object_add(t, "router_queue_ms",
                           json_object_new_double(u ? u->queue_ms : 0));
    json_object_object_add(t, "router_ttft_ms",
                           json_object_new_double(u ? u->ttft_ms : 0));
    json_object_object_add(t, "router_e2e_ms", json_object_new_double(u ? u->e2e_ms : 0));
    json_object_object_add(o, "timings", t);
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                                         JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
}

int pd_cmd_complete(int argc, char **argv)
{
    complete_args_t a = {0};
    int rc = parse_args(argc, argv, &a);
    if (rc) {
        free(a.ids);
        free(a.stop_ids);
        return rc > 0 ? 0 : 2;
    }
    bool json = !strcmp(a.format, "json");
    pdc_client_t *c = NULL;
    pdc_result_t res = {0};
    rc = 1;
    if (pdc_client_new(a.router, NULL, &c) != PD_OK) {
        fprintf(stderr, "pdctl complete: cannot connect to '%s'\n", a.router);
        goto out;
    }
    pd_status_t st = pdc_generate(c, &a.req, json ? NULL : on_chunk, NULL, &res);
    if (st != PD_OK) {
        if (!json && res.text_len)
            printf("\n");
        fprintf(stderr, "pdctl complete: %s: %s\n", pdc_code_name(res.error.code),
                res.error.message);
        goto out;
    }
    if (json) {
        print_json(&a, &res);
    } else {
        printf("\n");
        fflush(stdout);
        fprintf(stderr, "[%zu tokens, %s, ttft %.1f ms, e2e %.1f ms, seed %llu]\n",
                res.n_ids, res.finish_reason, res.ttft_ms, res.e2e_ms,
                (unsigned long long)(res.has_usage ? res.usage.seed : 0));
    }
    rc = 0;
out:
    pdc_result_fini(&res);
    pdc_client_destroy(&c);
    free(a.ids);
    free(a.stop_ids);
    return rc;
}
#endif /* PD_HAVE_SERVICE */
