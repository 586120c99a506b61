/* pdctl_generate_batch.c - `pdctl generate --prompts FILE.jsonl --parallel N`: every
 * prompt of the file through one batching engine (common/engine.h), arriving at
 * staggered steps, one JSON line per prompt in input order and a summary line.
 * A line that cannot be parsed, or a request the engine refuses, gives that line an
 * "error" and the others still run; the exit status is then 1.
 * Single-threaded front end; the kernels fan out over their thread pool. */
#include <ctype.h>
#include <errno.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/engine.h"
#include "common/log.h"
#include "common/tokenizer.h"
#include "tools/pdctl_generate.h"

int pd_parse_size(const char *s, int64_t *bytes_p)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0))
        return -1;
    while (isspace((unsigned char)*end))
        end++;
    struct {
        const char *suffix;
        double mul;
    } units[] = {{"", 1},
                 {"b", 1},
                 {"k", 1024.0},
                 {"kib", 1024.0},
                 {"kb", 1e3},
                 {"m", 1048576.0},
                 {"mib", 1048576.0},
                 {"mb", 1e6},
                 {"g", 1073741824.0},
                 {"gib", 1073741824.0},
                 {"gb", 1e9},
                 {"t", 1099511627776.0},
                 {"tib", 1099511627776.0},
                 {"tb", 1e12}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (!strcasecmp(end, units[i].suffix)) {
            double b = v * units[i].mul;
            if (b > 9.0e18)
                return -1;
            *bytes_p = (int64_t)b;
            return 0;
        }
    return -1;
}

typedef struct item {
    int32_t index, line;
    char *prompt; /* NULL when given as prompt_ids */
    int32_t *prompt_ids;
    int32_t n_prompt;
    int32_t max_tokens;
    bool ignore_eos;
    pd_sampler_params_t sp;
    int64_t arrival_step;
    char error[256];
    /* the outcome */
    bool done;
    uint64_t id;
    int32_t *ids;
    pd_engine_result_t res;
} item_t;

typedef struct run {
    item_t *items;
    int32_t n, cap;
} run_t;

static void item_error(item_t *it, const char *fmt, const char *detail)
{
    snprintf(it->error, sizeof it->error, fmt, detail);
}

static int get_num(json_object *o, const char *key, double lo, double hi, double *v)
{
    json_object *j;
    if (!json_object_object_get_ex(o, key, &j))
        return 0;
    if (!json_object_is_type(j, json_type_int) &&
        !json_object_is_type(j, json_type_double))
        return -1;
    double x = json_object_get_double(j);
    if (!(x >= lo && x <= hi))
        return -1;
    *v = x;
    return 1;
}

/* One line into it (index/line set); errors go to it->error. */
static void parse_item(const gen_args_t *a, const pd_tokenizer_t *tok, const char *line,
                       item_t *it)
{
    it->max_tokens = a->max_tokens;
    it->ignore_eos = a->ignore_eos;
    it->sp = a->sp;
    it->sp.seed = a->sp.seed + (uint64_t)it->index; /* distinct streams per request */
    it->arrival_step = (int64_t)it->index * a->arrival_steps;
    enum json_tokener_error jerr;
    json_object *o = json_tokener_parse_verbose(line, &jerr);
    if (!o || !json_object_is_type(o, json_type_object)) {
        item_error(it, "not a JSON object: %s",
                   o ? "another JSON value" : json_tokener_error_desc(jerr));
        json_object_put(o);
        return;
    }
    json_object *p, *pid;
    bool has_p = json_object_object_get_ex(o, "prompt", &p);
    bool has_ids = json_object_object_get_ex(o, "prompt_ids", &pid);
    if (has_p && json_object_is_type(p, json_type_string)) {
        const char *s = json_object_get_string(p);
        size_t len = (size_t)json_object_get_string_len(p), n = 0;
        it->prompt = strdup(s);
        it->prompt_ids = malloc((len + 2) * sizeof *it->prompt_ids);
        if (!it->prompt || !it->prompt_ids ||
            pd_tokenizer_encode(tok, s, len, true, it->prompt_ids, len + 2, &n) != PD_OK)
            item_error(it, "%s", "the prompt cannot be tokenized");
        it->n_prompt = (int32_t)n;
    } else if (has_ids && json_object_is_type(pid, json_type_array)) {
        size_t n = json_object_array_length(pid);
        it->prompt_ids = malloc((n + 1) * sizeof *it->prompt_ids);
        for (size_t i = 0; it->prompt_ids && i < n; i++) {
            json_object *e = json_object_array_get_idx(pid, i);
            if (!json_object_is_type(e, json_type_int)) {
                item_error(it, "%s", "prompt_ids must be integers");
                break;
            }
            it->prompt_ids[i] = (int32_t)json_object_get_int(e);
        }
        it->n_prompt = (int32_t)n;
    } else {
        item_error(it, "%s", "needs \"prompt\" (a string) or \"prompt_ids\" (integers)");
    }
    double v;
    int r;
    if ((r = get_num(o, "max_tokens", 0, 1 << 24, &v)) > 0)
        it->max_tokens = (int32_t)v;
    else if (r < 0)
        item_error(it, "%s", "bad max_tokens");
    if ((r = get_num(o, "temperature", 0, 1e6, &v)) > 0)
        it->sp.temperature = (float)v;
    else if (r < 0)
        item_error(it, "%s", "bad temperature");
    if ((r = get_num(o, "top_p", 1e-9, 1, &v)) > 0)
        it->sp.top_p = (float)v;
    else if (r < 0)
        item_error(it, "%s", "bad top_p");
    if ((r = get_num(o, "top_k", 0, 1 << 30, &v)) > 0)
        it->sp.top_k = (int32_t)v;
    else if (r < 0)
        item_error(it, "%s", "bad top_k");
    if ((r = get_num(o, "min_p", 0, 1, &v)) > 0)
        it->sp.min_p = (float)v;
    else if (r < 0)
        item_error(it, "%s", "bad min_p");
    if ((r = get_num(o, "seed", 0, 9007199254740992.0, &v)) > 0) {
        json_object *j;
        json_object_object_get_ex(o, "seed", &j);
        it->sp.seed = (uint64_t)json_object_get_int64(j);
    } else if (r < 0)
        item_error(it, "%s", "bad seed");
    if ((r = get_num(o, "arrival_step", 0, 1e12, &v)) > 0)
        it->arrival_step = (int64_t)v;
    else if (r < 0)
        item_error(it, "%s", "bad arrival_step");
    json_object *ie;
    if (json_object_object_get_ex(o, "ignore_eos", &ie))
        it->ignore_eos = json_object_get_boolean(ie);
    json_object_put(o);
}

static int read_items(const gen_args_t *a, const pd_tokenizer_t *tok, run_t *run)
{
    FILE *f = strcmp(a->prompts, "-") ? fopen(a->prompts, "r") : stdin;
    if (!f) {
        fprintf(stderr, "pdctl generate: cannot open '%s': %s\n", a->prompts,
                strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int32_t lineno = 0;
    int rc = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        bool blank = true;
        for (ssize_t i = 0; i < len; i++)
            blank = blank && isspace((unsigned char)line[i]);
        if (blank)
            continue;
        if (run->n == run->cap) {
            int32_t nc = run->cap ? run->cap * 2 : 64;
            item_t *ni = realloc(run->items, (size_t)nc * sizeof *ni);
            if (!ni) {
                rc = -1;
                break;
            }
            run->items = ni;
            run->cap = nc;
        }
        item_t *it = &run->items[run->n];
        memset(it, 0, sizeof *it);
        it->index = run->n++;
        it->line = lineno;
        parse_item(a, tok, line, it);
    }
    free(line);
    if (f != stdin)
        fclose(f);
    return rc;
}

static void on_finish(void *user, const pd_engine_result_t *r)
{
    item_t *it = user;
    it->done = true;
    it->res = *r;
    it->res.ids = NULL;
    it->ids = malloc(((size_t)r->n_gen + 1) * sizeof *it->ids);
    if (it->ids)
        memcpy(it->ids, r->ids, (size_t)r->n_gen * sizeof *it->ids);
    else
        it->res.n_gen = 0;
    if (r->finish == PD_ENGINE_FINISH_ERROR)
        item_error(it, "generation failed: %s", pd_status_str(r->status));
}

/* The generated text, decoded after the prompt (so the first piece keeps its space;
 * a character the prompt leaves incomplete belongs to the prompt). */
static json_object *text_json(const pd_tokenizer_t *tok, const item_t *it)
{
    size_t piece_cap = pd_tokenizer_max_piece_len(tok) + 16, len = 0, cap = 256;
    char *piece = malloc(piece_cap), *text = malloc(cap);
    if (!piece || !text) {
        free(piece);
        free(text);
        return json_object_new_string("");
    }
    pd_detok_t d;
    pd_detok_init(&d, tok);
    for (int32_t i = 0; i < it->n_prompt; i++)
        pd_detok_feed(&d, it->prompt_ids[i], piece, piece_cap);
    pd_detok_flush(&d, piece, piece_cap);
    for (int32_t i = 0; i <= it->res.n_gen; i++) {
        size_t n = i < it->res.n_gen ? pd_detok_feed(&d, it->ids[i], piece, piece_cap)
                                     : pd_detok_flush(&d, piece, piece_cap);
        if (len + n + 1 > cap) {
            cap = (cap + n) * 2;
            char *t = realloc(text, cap);
            if (!t)
                break;
            text = t;
        }
        memcpy(text + len, piece, n);
        len += n;
    }
    json_object *j = json_object_new_string_len(text, (int)len);
    free(piece);
    free(text);
    return j;
}

static void print_item(const pd_tokenizer_t *tok, const item_t *it, bool json)
{
    if (!json) {
        if (it->error[0])
            printf("[%d] error: %s\n", it->index, it->error);
        else {
            json_object *t = text_json(tok, it);
            printf("[%d] %s%s\n", it->index, it->prompt ? it->prompt : "",
                   json_object_get_string(t));
            json_object_put(t);
        }
        return;
    }
    json_object *o = json_object_new_object();
    json_object_object_add(o, "index", json_object_new_int(it->index));
    if (it->prompt)
        json_object_object_add(o, "prompt", pd_json_string_utf8(it->prompt));
    json_object_object_add(o, "prompt_ids", pd_json_ids(it->prompt_ids, it->n_prompt));
    if (it->error[0] && !it->done) {
        json_object_object_add(o, "error", json_object_new_string(it->error));
        json_object_object_add(o, "finish_reason", json_object_new_string("error"));
    } else {
        if (it->error[0])
            json_object_object_add(o, "error", json_object_new_string(it->error));
        json_object_object_add(o, "ids", pd_json_ids(it->ids, it->res.n_gen));
        json_object_object_add(o, "text", text_json(tok, it));
        json_object_object_add(
            o, "finish_reason",
            json_object_new_string(pd_engine_finish_str(it->res.finish)));
        json_object_object_add(o, "seed", json_object_new_uint64(it->sp.seed));
        json_object_object_add(o, "cached_tokens",
                               json_object_new_int(it->res.cached_tokens));
        json_object_object_add(o, "preemptions",
                               json_object_new_int(it->res.preemptions));
        json_object *sp = json_object_new_object();
        json_object_object_add(sp, "proposed", json_object_new_int64(it->res.spec_proposed));
        json_object_object_add(sp, "accepted", json_object_new_int64(it->res.spec_accepted));
        json_object_object_add(o, "spec", sp);
        json_object *t = json_object_new_object();
        const pd_engine_result_t *r = &it->res;
        json_object_object_add(t, "arrival_ms",
                               json_object_new_double(r->arrival_s * 1e3));
        json_object_object_add(
            t, "first_token_ms",
            json_object_new_double(
                r->first_token_s > 0 ? (r->first_token_s - r->arrival_s) * 1e3 : 0));
        json_object_object_add(
            t, "finish_ms", json_object_new_double((r->finish_s - r->arrival_s) * 1e3));
        json_object_object_add(o, "timings", t);
    }
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                                         JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
}

static void print_summary(const gen_args_t *a, pd_engine_t *e, const pd_kernels_t *k,
                          const run_t *run, double wall_s, double load_s,
                          int32_t free_start, bool json)
{
    pd_engine_stats_t st = pd_engine_stats(e);
    pd_kv_pool_t *kv = pd_engine_kv(e);
    int64_t prompt_tokens = 0, gen_tokens = 0;
    int32_t errors = 0;
    for (int32_t i = 0; i < run->n; i++) {
        const item_t *it = &run->items[i];
        errors += it->error[0] != 0;
        if (it->done) {
            prompt_tokens += it->n_prompt;
            gen_tokens += it->res.n_gen;
        }
    }
    double hit_rate = st.query_tokens ? (double)st.cached_tokens / st.query_tokens : 0;
    double mean_batch = st.steps ? (double)st.seqs_in_steps / st.steps : 0;
    if (!json) {
        fprintf(
            stderr,
            "[%d requests (%d errors), %lld prompt + %lld generated tokens in %.2f s: "
            "%.1f gen tok/s; batch mean %.1f max %lld; %lld preemptions; prefix hit "
            "rate %.1f%%]\n",
            run->n, errors, (long long)prompt_tokens, (long long)gen_tokens, wall_s,
            wall_s > 0 ? gen_tokens / wall_s : 0, mean_batch,
            (long long)st.max_batch_seqs, (long long)st.preemptions, 100 * hit_rate);
        return;
    }
    json_object *o = json_object_new_object(), *s = json_object_new_object();
    json_object_object_add(s, "requests", json_object_new_int(run->n));
    json_object_object_add(s, "errors", json_object_new_int(errors));
    json_object_object_add(s, "prompt_tokens", json_object_new_int64(prompt_tokens));
    json_object_object_add(s, "computed_prompt_tokens",
                           json_object_new_int64(st.prompt_tokens));
    json_object_object_add(s, "gen_tokens", json_object_new_int64(gen_tokens));
    json_object_object_add(s, "wall_s", json_object_new_double(wall_s));
    json_object_object_add(s, "load_s", json_object_new_double(load_s));
    json_object_object_add(s, "gen_tokens_per_s",
                           json_object_new_double(wall_s > 0 ? gen_tokens / wall_s : 0));
    json_object_object_add(
        s, "prompt_tokens_per_s",
        json_object_new_double(wall_s > 0 ? prompt_tokens / wall_s : 0));
    json_object_object_add(s, "decode_steps", json_object_new_int64(st.steps));
    json_object_object_add(s, "forward_s", json_object_new_double(st.forward_s));
    json_object_object_add(s, "sample_s", json_object_new_double(st.sample_s));
    json_object_object_add(s, "sample_threads",
                           json_object_new_int(pd_engine_sample_threads(e)));
    json_object_object_add(s, "sample_parallel_steps",
                           json_object_new_int64(st.sample_parallel_steps));
    json_object *b = json_object_new_object(), *h = json_object_new_object();
    json_object_object_add(b, "mean", json_object_new_double(mean_batch));
    json_object_object_add(b, "max", json_object_new_int64(st.max_batch_seqs));
    static const char *const names[8] = {"1",     "2-3",   "4-7",    "8-15",
                                         "16-31", "32-63", "64-127", "128+"};
    for (int i = 0; i < 8; i++)
        if (st.hist[i])
            json_object_object_add(h, names[i], json_object_new_int64(st.hist[i]));
    json_object_object_add(b, "histogram", h);
    json_object_object_add(s, "batch_size", b);
    json_object_object_add(s, "preemptions", json_object_new_int64(st.preemptions));
    json_object *spj = json_object_new_object();
    json_object_object_add(spj, "mode",
                           json_object_new_string(a->draft_model ? "draft"
                                                  : a->spec     ? a->spec
                                                                : "off"));
    json_object_object_add(spj, "proposed", json_object_new_int64(st.spec_proposed));
    json_object_object_add(spj, "accepted", json_object_new_int64(st.spec_accepted));
    json_object_object_add(spj, "verify_steps", json_object_new_int64(st.spec_steps));
    json_object_object_add(spj, "draft_s", json_object_new_double(st.spec_draft_s));
    json_object_object_add(spj, "acceptance_rate",
                           json_object_new_double(st.spec_proposed ? (double)st.spec_accepted /
                                                                         (double)st.spec_proposed
                                                                   : 0.0));
    json_object_object_add(spj, "mean_accepted_length",
                           json_object_new_double(st.spec_steps ? (double)st.spec_accepted /
                                                                      (double)st.spec_steps
                                                                : 0.0));
    json_object_object_add(s, "spec", spj);
    json_object *pc = json_object_new_object();
    json_object_object_add(pc, "enabled", json_object_new_boolean(!a->no_prefix_cache));
    json_object_object_add(pc, "query_tokens", json_object_new_int64(st.query_tokens));
    json_object_object_add(pc, "hit_tokens", json_object_new_int64(st.cached_tokens));
    json_object_object_add(pc, "hit_rate", json_object_new_double(hit_rate));
    json_object_object_add(s, "prefix_cache", pc);
    json_object *kj = json_object_new_object();
    json_object_object_add(kj, "blocks", json_object_new_int(pd_kv_pool_n_blocks(kv)));
    json_object_object_add(kj, "block_size",
                           json_object_new_int(pd_kv_pool_block_size(kv)));
    json_object_object_add(kj, "capacity_tokens",
                           json_object_new_int64((int64_t)pd_kv_pool_n_blocks(kv) *
                                                 pd_kv_pool_block_size(kv)));
    json_object_object_add(kj, "dtype",
                           json_object_new_string(pd_dtype_name(pd_kv_pool_dtype(kv))));
    json_object_object_add(kj, "free_blocks_start", json_object_new_int(free_start));
    json_object_object_add(kj, "free_blocks_end",
                           json_object_new_int(pd_kv_pool_n_free(kv)));
    json_object_object_add(s, "kv", kj);
    json_object_object_add(s, "parallel", json_object_new_int(a->parallel));
    json_object_object_add(s, "threads", json_object_new_int(k->n_threads));
    json_object_object_add(s, "isa", json_object_new_string(k->name));
    json_object_object_add(s, "cuda_graphs", json_object_new_boolean(a->cuda_graphs));
    json_object_object_add(o, "summary", s);
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
    json_object_put(o);
}

/* What pd_engine_add checks, for a request that never reaches it (max_tokens 0). */
static bool prompt_fits(const pd_engine_t *e, const pd_model_t *m, item_t *it)
{
    if (it->n_prompt < 1 || it->n_prompt >= pd_engine_max_seq_len(e)) {
        snprintf(it->error, sizeof it->error,
                 "request refused: a prompt of %d tokens leaves no room for output in "
                 "the longest sequence of %d tokens",
                 it->n_prompt, pd_engine_max_seq_len(e));
        return false;
    }
    for (int32_t i = 0; i < it->n_prompt; i++)
        if (it->prompt_ids[i] < 0 ||
            it->prompt_ids[i] >= pd_model_config(m)->vocab_size) {
            snprintf(it->error, sizeof it->error,
                     "request refused: token %d outside the vocabulary",
                     it->prompt_ids[i]);
            return false;
        }
    return true;
}

static int cmp_arrival(const void *pa, const void *pb)
{
    const item_t *a = *(const item_t *const *)pa, *b = *(const item_t *const *)pb;
    if (a->arrival_step != b->arrival_step)
        return a->arrival_step < b->arrival_step ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

int pd_generate_batch(const gen_args_t *a, const pd_model_t *m, pd_kernels_t *k,
                      double load_s)
{
    const pd_tokenizer_t *tok = pd_model_tokenizer(m);
    bool json = !strcmp(a->format, "json");
    run_t run = {0};
    item_t **order = NULL;
    pd_engine_t *e = NULL;
    pd_model_t *draft = NULL;
    int rc = 1;
    if (read_items(a, tok, &run) != 0)
        goto out;
    bool use_draft = a->draft_model && (!a->spec || !strcmp(a->spec, "draft"));
    if (a->spec && !strcmp(a->spec, "draft") && !a->draft_model) {
        fprintf(stderr, "pdctl generate: --spec draft needs --draft-model\n");
        goto out;
    }
    if (use_draft && pd_model_open_ex(a->draft_model, a->tokenizer,
                                      pd_gen_load_mmap(a) ? PD_MODEL_LOAD_MMAP
                                                          : PD_MODEL_LOAD_COPY,
                                      &draft) != PD_OK) {
        fprintf(stderr, "pdctl generate: cannot load the draft model %s\n", a->draft_model);
        goto out;
    }
    pd_engine_opts_t eo = {.max_num_seqs = a->parallel,
                           .max_batch_tokens = a->batch,
                           .max_ctx = a->ctx,
                           .kv_memory = a->kv_memory,
                           .block_size = a->block_size,
                           .no_prefix_cache = a->no_prefix_cache,
                           .spec_k = a->spec || use_draft ? (a->spec_k > 0 ? a->spec_k : 4)
                                                          : 0,
                           .draft_model = draft,
                           .spec_fixed_k = a->spec_fixed,
                           .cuda_graphs = a->cuda_graphs,
                           .sample_threads = a->sample_threads,
                           .eos = pd_tokenizer_eos(tok),
                           .bos = pd_tokenizer_bos(tok)};
    if (a->kv_dtype && strcmp(a->kv_dtype, "auto"))
        eo.kv_type = strcmp(a->kv_dtype, "f16") ? PD_KV_F32 : PD_KV_F16;
    if (pd_engine_new(m, k, &eo, &e) != PD_OK) {
        fprintf(stderr, "pdctl generate: cannot create the engine (see above)\n");
        goto out;
    }
    pd_kv_pool_t *kv = pd_engine_kv(e);
    int32_t free_start = pd_kv_pool_n_free(kv);
    fprintf(stderr,
            "pdctl generate: kv cache %d blocks of %d tokens = %lld tokens (%.1f MiB, "
            "%s); longest sequence %d; %d prompts, up to %d in flight\n",
            pd_kv_pool_n_blocks(kv), pd_kv_pool_block_size(kv),
            (long long)pd_kv_pool_n_blocks(kv) * pd_kv_pool_block_size(kv),
            (double)pd_kv_pool_n_blocks(kv) * (double)pd_kv_pool_block_bytes(kv) /
                1048576.0,
            pd_dtype_name(pd_kv_pool_dtype(kv)), pd_engine_max_seq_len(e), run.n,
            a->parallel);

    order = malloc(((size_t)run.n + 1) * sizeof *order);
    if (!order)
        goto out;
    for (int32_t i = 0; i < run.n; i++)
        order[i] = &run.items[i];
    qsort(order, (size_t)run.n, sizeof *order, cmp_arrival);
    double t0 = pd_now_s();
    int64_t step = 0;
    int32_t next = 0;
    pd_status_t st = PD_OK;
    while (next < run.n || pd_engine_n_pending(e) > 0) {
        if (pd_engine_n_pending(e) == 0 && order[next]->arrival_step > step)
            step = order[next]->arrival_step; /* idle: skip to the next arrival */
        for (; next < run.n && order[next]->arrival_step <= step; next++) {
            item_t *it = order[next];
            if (it->error[0])
                continue;
            if (it->max_tokens == 0) { /* as the one-prompt path: nothing to generate */
                if (prompt_fits(e, m, it)) {
                    it->done = true;
                    it->res.finish = PD_ENGINE_FINISH_LENGTH;
                    it->res.n_prompt = it->n_prompt;
                }
                continue;
            }
            pd_engine_request_t q = {.prompt = it->prompt_ids,
                                     .n_prompt = it->n_prompt,
                                     .max_tokens = it->max_tokens,
                                     .ignore_eos = it->ignore_eos,
                                     .sampling = it->sp,
                                     .on_finish = on_finish,
                                     .user = it};
            pd_status_t ast = pd_engine_add(e, &q, &it->id);
            if (ast != PD_OK)
                snprintf(it->error, sizeof it->error,
                         "request refused (%s): see the log; the longest sequence is %d "
                         "tokens",
                         pd_status_str(ast), pd_engine_max_seq_len(e));
        }
        if (pd_engine_n_pending(e) == 0)
            continue;
        st = pd_engine_step(e, NULL);
        if (st != PD_OK && st != PD_ERR_RANGE)
            fprintf(stderr, "pdctl generate: step failed: %s\n", pd_status_str(st));
        step++;
    }
    double wall_s = pd_now_s() - t0;
    int32_t errors = 0;
    for (int32_t i = 0; i < run.n; i++) {
        print_item(tok, &run.items[i], json);
        errors += run.items[i].error[0] != 0;
    }
    print_summary(a, e, k, &run, wall_s, load_s, free_start, json);
    fflush(stdout);
    if (pd_kv_pool_n_free(kv) != free_start)
        fprintf(stderr, "pdctl generate: %d kv blocks leaked\n",
                free_start - pd_kv_pool_n_free(kv));
    rc = errors || pd_kv_pool_n_free(kv) != free_start ? 1 : 0;
out:
    pd_engine_destroy(&e);
    pd_model_destroy(&draft);
    for (int32_t i = 0; i < run.n; i++) {
        free(run.items[i].prompt);
        free(run.items[i].prompt_ids);
        free(run.items[i].ids);
    }
    free(run.items);
    free(order);
    return rc;
}
