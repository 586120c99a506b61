/* pdclient_probe.c - drives one libpdclient scenario against a router (the fake one
 * of tests/client/test_pdclient.py) and prints what it saw as one JSON object on
 * stdout, for the Python test to check. Not a Check suite: it needs a live peer.
 *
 *   pdclient_probe ENDPOINT health | stats
 *   pdclient_probe ENDPOINT generate PROMPT MAX_TOKENS TIMEOUT_MS
 *   pdclient_probe ENDPOINT cbcancel PROMPT          (on_chunk returns 1 at chunk 2)
 *   pdclient_probe ENDPOINT cancel                   (async: pdc_cancel at token 2)
 *   pdclient_probe ENDPOINT async N MAX_TOKENS       (N requests on one socket)
 *   pdclient_probe ENDPOINT mixed                    (health while async in flight)
 * Exit status 0 when the scenario ran (its outcome is in the JSON), 1 otherwise.
 * Single-threaded. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/pdclient.h"
#include "common/rpc.h"

static void print_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void print_ids(const int32_t *ids, size_t n)
{
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf("%s%d", i ? "," : "", ids[i]);
    putchar(']');
}

typedef struct seen {
    uint32_t index[4096];
    size_t n;
    int cancel_at; /* on_chunk returns 1 at this chunk (-1: never) */
} seen_t;

static int on_chunk(void *user, const pdc_chunk_t *ch)
{
    seen_t *s = user;
    if (s->n < 4096)
        s->index[s->n] = ch->index;
    s->n++;
    return s->cancel_at >= 0 && (int)s->n == s->cancel_at;
}

static void print_result(pd_status_t st, const pdc_result_t *r, const seen_t *s,
                         double ms)
{
    printf("{\"status\":%d,\"code\":%d,\"code_name\":", (int)st, (int)r->error.code);
    print_str(pdc_code_name(r->error.code));
    printf(",\"message\":");
    print_str(r->error.message);
    printf(",\"request_id\":%llu,\"elapsed_ms\":%.1f,\"text\":",
           (unsigned long long)r->request_id, ms);
    print_str(r->text ? r->text : "");
    printf(",\"ids\":");
    print_ids(r->ids, r->n_ids);
    printf(",\"chunk_index\":[");
    for (size_t i = 0; i < s->n && i < 4096; i++)
        printf("%s%u", i ? "," : "", s->index[i]);
    printf("],\"finish_reason\":");
    print_str(r->finish_reason);
    printf(",\"has_usage\":%s", r->has_usage ? "true" : "false");
    if (r->has_usage) {
        const pdc_usage_t *u = &r->usage;
        printf(",\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,"
               "\"cached_tokens\":%u,\"seed\":%llu,\"ttft_ms\":%.3f,\"e2e_ms\":%.3f,"
               "\"retries\":%u,\"prefill_worker\":",
               u->prompt_tokens, u->completion_tokens, u->cached_tokens,
               (unsigned long long)u->seed, u->ttft_ms, u->e2e_ms, u->retries);
        print_str(u->prefill_worker);
        printf(",\"decode_worker\":");
        print_str(u->decode_worker);
        printf(",\"prompt_ids\":");
        print_ids(u->prompt_ids, u->n_prompt_ids);
        putchar('}');
    }
    printf(",\"client_ttft_ms\":%.1f,\"client_e2e_ms\":%.1f}\n", r->ttft_ms, r->e2e_ms);
}

static int do_generate(pdc_client_t *c, const char *prompt, int max_tokens,
                       uint32_t timeout_ms, int cancel_at)
{
    pdc_request_t req = {.prompt = prompt,
                         .max_tokens = max_tokens,
                         .timeout_ms = timeout_ms,
                         .seed = 7,
                         .has_seed = true};
    seen_t *s = calloc(1, sizeof *s);
    if (!s)
        return 1;
    s->cancel_at = cancel_at;
    pdc_result_t res;
    uint64_t t0 = pd_rpc_mono_ms();
    pd_status_t st = pdc_generate(c, &req, on_chunk, s, &res);
    print_result(st, &res, s, (double)(pd_rpc_mono_ms() - t0));
    pdc_result_fini(&res);
    free(s);
    return 0;
}

static int do_health(pdc_client_t *c)
{
    pdc_health_t h;
    pdc_error_t e = {0};
    pd_status_t st = pdc_health(c, 2000, &h, &e);
    printf("{\"status\":%d,\"code_name\":", (int)st);
    print_str(pdc_code_name(e.code));
    printf(",\"ok\":%s,\"draining\":%s,\"prefill_workers\":%u,\"decode_workers\":%u,"
           "\"model\":",
           h.ok ? "true" : "false", h.draining ? "true" : "false", h.prefill_workers,
           h.decode_workers);
    print_str(h.model);
    printf("}\n");
    return 0;
}

static int do_stats(pdc_client_t *c)
{
    pdc_stats_t s;
    pdc_error_t e = {0};
    pd_status_t st = pdc_stats(c, 2000, &s, &e);
    printf("{\"status\":%d,\"requests_total\":%llu,\"requests_in_flight\":%llu,"
           "\"requests_failed\":%llu,\"retries\":%llu,\"tokens_out\":%llu,"
           "\"bad_frames\":%llu,\"workers\":[",
           (int)st, (unsigned long long)s.requests_total,
           (unsigned long long)s.requests_in_flight,
           (unsigned long long)s.requests_failed, (unsigned long long)s.retries,
           (unsigned long long)s.tokens_out, (unsigned long long)s.bad_frames);
    for (size_t i = 0; i < s.n_workers; i++) {
        const pdc_worker_stats_t *w = &s.workers[i];
        printf("%s{\"worker_id\":%llu,\"name\":", i ? "," : "",
               (unsigned long long)w->worker_id);
        print_str(w->name);
        printf(",\"role\":%d,\"alive\":%s,\"draining\":%s,\"free_blocks\":%u,"
               "\"total_blocks\":%u,\"running\":%u,\"waiting\":%u,\"reserved_blocks\":%u,"
               "\"held_blocks\":%u,\"queued_prefill_tokens\":%llu,\"kv_bytes\":%llu,"
               "\"steps\":%llu,\"forward_s\":%.3f,\"sample_s\":%.3f,"
               "\"sample_threads\":%u,"
               "\"last_heartbeat_ms_ago\":%.1f}",
               (int)w->role, w->alive ? "true" : "false", w->draining ? "true" : "false",
               w->free_blocks, w->total_blocks, w->running, w->waiting,
               w->reserved_blocks, w->held_blocks,
               (unsigned long long)w->queued_prefill_tokens,
               (unsigned long long)w->kv_bytes, (unsigned long long)w->steps,
               w->forward_s, w->sample_s, w->sample_threads, w->last_heartbeat_ms_ago);
    }
    printf("]}\n");
    pdc_stats_fini(&s);
    return 0;
}

typedef struct async_state {
    pdc_client_t *c;
    uint32_t *next;   /* [n] next expected index per request */
    int *done, *errs; /* [n] */
    int n_done, n_bad_order, n_events, n_cancel_replies, cancel_found;
    int cancel_at; /* pdc_cancel at this chunk of request 0 (-1: never) */
    char finish0[16];
    uint64_t id0;
} async_state_t;

static int on_event(void *user, const pdc_event_t *ev)
{
    async_state_t *a = user;
    a->n_events++;
    if (ev->kind == PDC_EVENT_CANCEL_REPLY) {
        a->n_cancel_replies++;
        a->cancel_found = ev->found;
        return 0;
    }
    int i = (int)(intptr_t)ev->req_user;
    if (ev->kind == PDC_EVENT_CHUNK) {
        if (ev->chunk->index != a->next[i])
            a->n_bad_order++;
        a->next[i] = ev->chunk->index + (uint32_t)ev->chunk->n_ids;
        if (i == 0 && a->cancel_at >= 0 && (int)a->next[0] == a->cancel_at) {
            pdc_error_t e;
            if (pdc_cancel(a->c, ev->request_id, &e) != PD_OK)
                fprintf(stderr, "cancel failed: %s\n", e.message);
        }
        if (ev->done && i == 0)
            snprintf(a->finish0, sizeof a->finish0, "%s", ev->chunk->finish_reason);
    } else {
        a->errs[i]++;
    }
    if (ev->done) {
        a->done[i]++;
        a->n_done++;
    }
    return 0;
}

static int do_async(pdc_client_t *c, int n, int max_tokens, int cancel_at, bool mixed)
{
    async_state_t a = {.c = c, .cancel_at = cancel_at};
    a.next = calloc((size_t)n, sizeof *a.next);
    a.done = calloc((size_t)n, sizeof *a.done);
    a.errs = calloc((size_t)n, sizeof *a.errs);
    if (!a.next || !a.done || !a.errs)
        return 1;
    for (int i = 0; i < n; i++) {
        char prompt[64];
        snprintf(prompt, sizeof prompt, "async prompt %d", i);
        pdc_request_t req = {
            .prompt = prompt, .max_tokens = max_tokens, .timeout_ms = 10000};
        uint64_t id;
        pdc_error_t e;
        if (pdc_submit(c, &req, (void *)(intptr_t)i, &id, &e) != PD_OK) {
            fprintf(stderr, "submit failed: %s\n", e.message);
            return 1;
        }
        if (i == 0)
            a.id0 = id;
    }
    int health_ok = -1;
    if (mixed) { /* a blocking call while the streams run: their replies are kept */
        pdc_health_t h;
        health_ok = pdc_health(c, 2000, &h, NULL) == PD_OK && h.ok;
    }
    uint64_t until = pd_rpc_mono_ms() + 20000;
    while (a.n_done < n && pd_rpc_mono_ms() < until)
        if (pdc_poll(c, 200, on_event, &a) < 0)
            break;
    /* a cancel reply may trail the last chunk */
    if (cancel_at >= 0 && !a.n_cancel_replies)
        pdc_poll(c, 500, on_event, &a);
    int multi = 0, errs = 0;
    for (int i = 0; i < n; i++) {
        multi += a.done[i] != 1;
        errs += a.errs[i];
    }
    printf("{\"n\":%d,\"n_done\":%d,\"not_done_once\":%d,\"errors\":%d,\"bad_order\":%d,"
           "\"in_flight\":%zu,\"cancel_replies\":%d,\"cancel_found\":%s,\"id0\":%llu,"
           "\"next0\":%u,\"health_ok\":%d,\"finish0\":",
           n, a.n_done, multi, errs, a.n_bad_order, pdc_in_flight(c), a.n_cancel_replies,
           a.cancel_found ? "true" : "false", (unsigned long long)a.id0, a.next[0],
           health_ok);
    print_str(a.finish0);
    printf("}\n");
    free(a.next);
    free(a.done);
    free(a.errs);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: pdclient_probe ENDPOINT SCENARIO [ARGS]\n");
        return 1;
    }
    pdc_client_t *c = NULL;
    if (pdc_client_new(argv[1], NULL, &c) != PD_OK)
        return 1;
    const char *what = argv[2];
    int rc = 1;
    if (!strcmp(what, "health"))
        rc = do_health(c);
    else if (!strcmp(what, "stats"))
        rc = do_stats(c);
    else if (!strcmp(what, "generate") && argc == 6)
        rc = do_generate(c, argv[3], atoi(argv[4]), (uint32_t)atoi(argv[5]), -1);
    else if (!strcmp(what, "cbcancel") && argc == 4)
        rc = do_generate(c, argv[3], 1000, 10000, 2);
    else if (!strcmp(what, "cancel"))
        rc = do_async(c, 1, 1000, 2, false);
    else if (!strcmp(what, "async") && argc == 5)
        rc = do_async(c, atoi(argv[3]), atoi(argv[4]), -1, false);
    else if (!strcmp(what, "mixed"))
        rc = do_async(c, 8, 10, -1, true);
    else
        fprintf(stderr, "pdclient_probe: bad scenario '%s'\n", what);
    pdc_client_destroy(&c);
    return rc;
}
