/* pdctl_generate.c - `pdctl generate`: load a model, run one prompt through the
 * engine in this process, stream the text or print one JSON object.
 * Single-threaded front end; the kernels fan out over their thread pool. */
#include <errno.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "common/generate.h"
#include "common/llm.h"
#include "common/log.h"
#include "common/model.h"
#include "common/sampler.h"
#include "common/utf8.h"
#include "kernels/ops.h"
#include "tools/pdctl.h"
#include "tools/pdctl_generate.h"

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: pdctl generate --model M [--tokenizer T] --prompt P [--max-tokens N]\n"
        "         [--temperature X] [--top-p X] [--top-k N] [--min-p X] [--seed N]\n"
        "         [--threads N] [--ignore-eos] [--format text|json]\n"
        "         [--ctx N] [--batch N] [--isa auto|scalar|avx2|avx512]\n"
        "         [--kv-dtype auto|f32|f16] [--load copy|mmap]\n"
        "         [--device cpu|cuda|cuda:N] [--weight-dtype auto|bf16] [--cuda-graphs]\n"
        "  M is a .gguf file, or a llama2.c checkpoint with its tokenizer.bin as T.\n"
        "  Defaults: --max-tokens 256, --temperature 0 (greedy), top-p 1, top-k 0 "
        "(off),\n"
        "  min-p 0 (off), a random seed (printed in json), one thread per CPU,\n"
        "  --ctx the model's context, --batch 512 (prompt tokens per forward pass),\n"
        "  --kv-dtype auto (f32 for f32 models, else f16), --load copy (read the "
        "weights\n"
        "  into memory on transparent huge pages; mmap maps the file instead).\n"
        "  --device: where the model runs (cpu; cuda = GPU 0); --weight-dtype bf16\n"
        "  converts F32 matrices to BF16 as they are uploaded to the GPU; --cuda-graphs\n"
        "  replays decode passes whose shape repeats as CUDA graphs (same results,\n"
        "  fewer launches; off by default; accepted and ignored on the CPU).\n"
        "\n"
        "       pdctl generate --model M --prompts FILE.jsonl [--parallel N]\n"
        "         [--kv-memory SIZE] [--block-size N] [--arrival-steps K]\n"
        "         [--no-prefix-cache] [--spec ngram|draft|off] [--spec-k N]\n"
        "         [--draft-model D] [--sample-threads N]\n"
        "         [and the options above]\n"
        "  Runs every prompt of FILE (one JSON object a line: \"prompt\" or "
        "\"prompt_ids\",\n"
        "  optional \"max_tokens\", \"temperature\", \"top_p\", \"top_k\", "
        "\"min_p\", \"seed\",\n"
        "  \"ignore_eos\", \"arrival_step\") through one batching engine with up "
        "to N\n"
        "  sequences in flight (default 16), request i arriving at step i*K (default "
        "1),\n"
        "  and prints one JSON line per prompt in input order, then a summary line.\n"
        "  --kv-memory: the KV cache budget, e.g. 64MiB or 2GiB (default: room for N "
        "full\n"
        "  contexts, at most 1GiB); --block-size: positions per KV block (16);\n"
        "  --batch: the token budget of one step (512); --spec ngram: speculative\n"
        "  decoding of greedy requests by n-gram prompt lookup, up to --spec-k (4)\n"
        "  proposed tokens per step, verified in the same pass (output unchanged);\n"
        "  --draft-model D (same vocabulary; implies --spec draft): proposals from D;\n"
        "  --spec-fixed: always --spec-k proposals (k is adaptive otherwise);\n"
        "  --sample-threads N: host threads that draw sampled tokens, each request's\n"
        "  draws on one of them (same tokens for every N; default 0: the kernel\n"
        "  threads on the CPU, min(CPUs, 8) with a GPU; 1: the engine thread).\n");
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *v_p)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "pdctl generate: bad value '%s' for %s (expected %g..%g)\n", s,
                opt, lo, hi);
        return -1;
    }
    *v_p = v;
    return 0;
}

static int parse_args(int argc, char **argv, gen_args_t *a)
{
    *a = (gen_args_t){.format = "text",
                      .max_tokens = 256,
                      .sp = pd_sampler_params_default(),
                      .parallel = 16,
                      .arrival_steps = 1};
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        double v;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(o, "--ignore-eos")) {
            a->ignore_eos = true;
            continue;
        }
        if (!strcmp(o, "--no-prefix-cache")) {
            a->no_prefix_cache = true;
            continue;
        }
        if (!strcmp(o, "--spec-fixed")) {
            a->spec_fixed = true;
            continue;
        }
        if (!strcmp(o, "--cuda-graphs")) {
            a->cuda_graphs = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "pdctl generate: %s needs a value\n", o);
            return -1;
        }
        const char *val = argv[++i];
        if (!strcmp(o, "--model"))
            a->model = val;
        else if (!strcmp(o, "--tokenizer"))
            a->tokenizer = val;
        else if (!strcmp(o, "--prompt"))
            a->prompt = val;
        else if (!strcmp(o, "--prompts"))
            a->prompts = val;
        else if (!strcmp(o, "--kv-memory")) {
            if (pd_parse_size(val, &a->kv_memory) != 0) {
                fprintf(stderr,
                        "pdctl generate: bad size '%s' for --kv-memory (e.g. 64MiB, "
                        "2GiB)\n",
                        val);
                return -1;
            }
        } else if (!strcmp(o, "--parallel") && !parse_num(o, val, 1, 4096, &v))
            a->parallel = (int32_t)v;
        else if (!strcmp(o, "--block-size") && !parse_num(o, val, 1, 4096, &v))
            a->block_size = (int32_t)v;
        else if (!strcmp(o, "--arrival-steps") && !parse_num(o, val, 0, 1 << 20, &v))
            a->arrival_steps = (int32_t)v;
        else if (!strcmp(o, "--spec-k") && !parse_num(o, val, 0, 64, &v))
            a->spec_k = (int32_t)v;
        else if (!strcmp(o, "--spec")) {
            if (strcmp(val, "ngram") && strcmp(val, "draft") && strcmp(val, "off")) {
                fprintf(stderr, "pdctl generate: --spec takes ngram, draft or off\n");
                return -1;
            }
            a->spec = strcmp(val, "off") ? val : NULL;
        } else if (!strcmp(o, "--draft-model"))
            a->draft_model = val;
        else if (!strcmp(o, "--format"))
            a->format = val;
        else if (!strcmp(o, "--isa"))
            a->isa = val;
        else if (!strcmp(o, "--device"))
            a->device = val;
        else if (!strcmp(o, "--weight-dtype")) {
            if (strcmp(val, "auto") && strcmp(val, "bf16")) {
                fprintf(stderr, "pdctl generate: --weight-dtype takes auto or bf16\n");
                return -1;
            }
            a->bf16_weights = !strcmp(val, "bf16");
        } else if (!strcmp(o, "--kv-dtype"))
            a->kv_dtype = val;
        else if (!strcmp(o, "--load"))
            a->load = val;
        else if (!strcmp(o, "--max-tokens") && !parse_num(o, val, 0, 1 << 24, &v))
            a->max_tokens = (int32_t)v;
        else if (!strcmp(o, "--threads") && !parse_num(o, val, 0, 1024, &v))
            a->threads = (int32_t)v;
        else if (!strcmp(o, "--sample-threads") && !parse_num(o, val, 0, 256, &v))
            a->sample_threads = (int32_t)v;
        else if (!strcmp(o, "--ctx") && !parse_num(o, val, 0, 1 << 24, &v))
            a->ctx = (int32_t)v;
        else if (!strcmp(o, "--batch") && !parse_num(o, val, 1, 1 << 16, &v))
            a->batch = (int32_t)v;
        else if (!strcmp(o, "--temperature") && !parse_num(o, val, 0, 1e6, &v))
            a->sp.temperature = (float)v;
        else if (!strcmp(o, "--top-p") && !parse_num(o, val, 1e-9, 1, &v))
            a->sp.top_p = (float)v;
        else if (!strcmp(o, "--top-k") && !parse_num(o, val, 0, 1 << 30, &v))
            a->sp.top_k = (int32_t)v;
        else if (!strcmp(o, "--min-p") && !parse_num(o, val, 0, 1, &v))
            a->sp.min_p = (float)v;
        else if (!strcmp(o, "--seed") &&
                 !parse_num(o, val, 0, 18446744073709551615.0, &v)) {
            a->sp.seed = strtoull(val, NULL, 10);
            a->seed_given = true;
        } else {
            if (strncmp(o, "--", 2) ||
                !strstr(" --model --tokenizer --prompt --format --isa --device "
                        "--max-tokens --threads --ctx --batch --kv-dtype --load "
                        "--temperature --top-p --top-k --min-p --seed --prompts "
                        "--parallel --block-size --arrival-steps --kv-memory "
                        "--sample-threads ",
                        o))
                fprintf(stderr, "pdctl generate: unknown option '%s'\n", o);
            return -1;
        }
    }
    if (!a->model || (!a->prompt == !a->prompts)) {
        fprintf(stderr, "pdctl generate: --model and one of --prompt and --prompts are "
                        "required\n");
        usage(stderr);
        return -1;
    }
    if (a->kv_dtype && strcmp(a->kv_dtype, "auto") && strcmp(a->kv_dtype, "f32") &&
        strcmp(a->kv_dtype, "f16")) {
        fprintf(stderr, "pdctl generate: --kv-dtype must be auto, f32 or f16\n");
        return -1;
    }
    if (a->load && strcmp(a->load, "copy") && strcmp(a->load, "mmap")) {
        fprintf(stderr, "pdctl generate: --load must be copy or mmap\n");
        return -1;
    }
    if (strcmp(a->format, "text") && strcmp(a->format, "json")) {
        fprintf(stderr, "pdctl generate: --format must be text or json\n");
        return -1;
    }
    if (!a->seed_given) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        a->sp.seed =
            (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid();
    }
    return 0;
}

bool pd_gen_load_mmap(const gen_args_t *a)
{
    return a->load && !strcmp(a->load, "mmap");
}

/* Streams text as tokens arrive, into stdout (text mode) and/or a growing buffer. */
typedef struct stream {
    pd_detok_t detok;
    bool to_stdout;
    char *text;
    size_t len, cap;
    char *piece; /* scratch for one token's text */
    size_t piece_cap;
} stream_t;

static int stream_append(stream_t *s, const char *p, size_t n)
{
    if (s->to_stdout) {
        fwrite(p, 1, n, stdout);
        fflush(stdout);
    }
    if (s->len + n + 1 > s->cap) {
        size_t cap = (s->cap ? s->cap * 2 : 4096) + n;
        char *t = realloc(s->text, cap);
        if (!t)
            return -1;
        s->text = t;
        s->cap = cap;
    }
    memcpy(s->text + s->len, p, n);
    s->len += n;
    s->text[s->len] = 0;
    return 0;
}

static int on_token(void *user, int32_t id)
{
    stream_t *s = user;
    size_t n = pd_detok_feed(&s->detok, id, s->piece, s->piece_cap);
    return n ? stream_append(s, s->piece, n) : 0;
}

json_object *pd_json_ids(const int32_t *ids, int32_t n)
{
    json_object *a = json_object_new_array_ext(n);
    for (int32_t i = 0; i < n; i++)
        json_object_array_add(a, json_object_new_int(ids[i]));
    return a;
}

/* JSON strings must be UTF-8: a prompt or path from the command line may not be. */
json_object *pd_json_string_utf8(const char *s)
{
    size_t n = strlen(s);
    char *clean = malloc(3 * n + 1);
    if (!clean)
        return json_object_new_string("");
    size_t len = pd_utf8_sanitize(s, n, clean);
    json_object *j = json_object_new_string_len(clean, (int)len);
    free(clean);
    return j;
}

static void print_json(const gen_args_t *a, const pd_model_t *m, const pd_kernels_t *k,
                       const pd_llm_t *llm, const int32_t *prompt_ids, const int32_t *ids,
                       const pd_gen_stats_t *st, const stream_t *s, double load_s)
{
    json_object *o = json_object_new_object(), *t = json_object_new_object();
    json_object_object_add(o, "model", pd_json_string_utf8(a->model));
    json_object_object_add(o, "dtype", json_object_new_string(pd_model_dtype_name(m)));
    json_object_object_add(o, "prompt", pd_json_string_utf8(a->prompt));
    json_object_object_add(o, "prompt_ids", pd_json_ids(prompt_ids, st->n_prompt));
    json_object_object_add(o, "ids", pd_json_ids(ids, st->n_gen));
    json_object_object_add(
        o, "text", json_object_new_string_len(s->text ? s->text : "", (int)s->len));
    json_object_object_add(o, "finish_reason",
                           json_object_new_string(pd_finish_str(st->finish)));
    json_object_object_add(o, "seed", json_object_new_uint64(a->sp.seed));
    json_object_object_add(o, "threads", json_object_new_int(k->n_threads));
    json_object_object_add(o, "isa", json_object_new_string(k->name));
    json_object_object_add(o, "kv_dtype",
                           json_object_new_string(pd_dtype_name(pd_llm_kv_dtype(llm))));
    json_object_object_add(o, "load",
                           json_object_new_string(pd_gen_load_mmap(a) ? "mmap" : "copy"));
    json_object_object_add(t, "load_ms", json_object_new_double(load_s * 1e3));
    json_object_object_add(t, "prompt_ms", json_object_new_double(st->prompt_s * 1e3));
    json_object_object_add(t, "decode_ms", json_object_new_double(st->decode_s * 1e3));
    json_object_object_add(
        t, "prompt_tokens_per_s",
        json_object_new_double(st->prompt_s > 0 ? st->n_prompt / st->prompt_s : 0));
    json_object_object_add(
        t, "gen_tokens_per_s",
        json_object_new_double(st->decode_s > 0 ? st->n_decode_steps / st->decode_s : 0));
    json_object_object_add(o, "timings", t);
    struct rusage ru;
    json_object *mem = json_object_new_object();
    getrusage(RUSAGE_SELF, &ru);
    json_object_object_add(mem, "max_rss_bytes",
                           json_object_new_int64((int64_t)ru.ru_maxrss * 1024));
    json_object_object_add(mem, "model_file_bytes",
                           json_object_new_int64((int64_t)pd_model_file_bytes(m)));
    json_object_object_add(o, "memory", mem);
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                                         JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
}

double pd_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int pd_cmd_generate(int argc, char **argv)
{
    gen_args_t a;
    int rc = parse_args(argc, argv, &a);
    if (rc)
        return rc > 0 ? 0 : 2;
    bool json = !strcmp(a.format, "json");
    pd_model_t *m = NULL;
    pd_kernels_t *k = NULL;
    pd_llm_t *llm = NULL;
    pd_sampler_t *smp = NULL;
    int32_t *prompt_ids = NULL, *ids = NULL;
    stream_t s = {.to_stdout = !json};
    rc = 1;

    double t0 = pd_now_s();
    if (pd_model_open_ex(a.model, a.tokenizer,
                         pd_gen_load_mmap(&a) ? PD_MODEL_LOAD_MMAP : PD_MODEL_LOAD_COPY,
                         &m) != PD_OK) {
        fprintf(stderr, "pdctl generate: cannot load model '%s' (see the error above)\n",
                a.model);
        goto out;
    }
    const pd_model_config_t *cfg = pd_model_config(m);
    const pd_tokenizer_t *tok = pd_model_tokenizer(m);
    if (pd_kernels_new_device(a.device, a.threads, a.isa, a.bf16_weights, &k) != PD_OK) {
        fprintf(stderr, "pdctl generate: cannot use --device %s (see the error above)\n",
                a.device ? a.device : "cpu");
        goto out;
    }
    if (a.prompts) {
        rc = pd_generate_batch(&a, m, k, pd_now_s() - t0);
        goto out;
    }
    int32_t ctx = a.ctx > 0 ? a.ctx : cfg->ctx_len;
    pd_llm_opts_t lo = {.max_ctx = ctx,
                        .max_batch_tokens = a.batch > 0 ? a.batch : 512,
                        .cuda_graphs = a.cuda_graphs};
    if (a.kv_dtype && strcmp(a.kv_dtype, "auto"))
        lo.kv_type = strcmp(a.kv_dtype, "f16") ? PD_KV_F32 : PD_KV_F16;
    if (pd_llm_new(m, k, &lo, &llm) != PD_OK ||
        pd_sampler_new(cfg->vocab_size, &a.sp, &smp) != PD_OK)
        goto out;
    double load_s = pd_now_s() - t0;

    size_t n_prompt = 0, plen = strlen(a.prompt), cap = plen + 2;
    prompt_ids = malloc(cap * sizeof *prompt_ids);
    ids = malloc(((size_t)a.max_tokens + 1) * sizeof *ids);
    s.piece_cap = pd_tokenizer_max_piece_len(tok) + 16;
    s.piece = malloc(s.piece_cap);
    if (!prompt_ids || !ids || !s.piece)
        goto out;
    if (pd_tokenizer_encode(tok, a.prompt, plen, true, prompt_ids, cap, &n_prompt) !=
        PD_OK)
        goto out;
    if ((int64_t)n_prompt >= ctx) {
        fprintf(stderr,
                "pdctl generate: the prompt has %zu tokens; the context holds %d\n",
                n_prompt, ctx);
        goto out;
    }
    pd_detok_init(&s.detok, tok);
    if (!json) { /* echo the prompt, as llama.cpp and llama2.c do */
        fputs(a.prompt, stdout);
        fflush(stdout);
    }
    /* Prime the decoder with the prompt (so the first generated piece keeps its
     * space), then drop what it holds back: an incomplete character at the end of
     * the prompt belongs to the prompt, not to the generated text. */
    for (size_t i = 0; i < n_prompt; i++)
        pd_detok_feed(&s.detok, prompt_ids[i], s.piece, s.piece_cap);
    pd_detok_flush(&s.detok, s.piece, s.piece_cap);
    pd_gen_opts_t go = {.max_tokens = a.max_tokens, .ignore_eos = a.ignore_eos};
    pd_gen_stats_t st;
    pd_gen_spec_counts_t sc = {0};
    bool spec = a.spec || a.draft_model;
    pd_status_t gst =
        spec ? pd_generate_spec(&a, m, k, prompt_ids, (int32_t)n_prompt, on_token, &s,
                                ids, &st, &sc)
             : pd_generate(llm, smp, prompt_ids, (int32_t)n_prompt, pd_tokenizer_eos(tok),
                           pd_tokenizer_bos(tok), &go, on_token, &s, ids, &st);
    size_t n = pd_detok_flush(&s.detok, s.piece, s.piece_cap);
    if (n)
        stream_append(&s, s.piece, n);
    if (gst != PD_OK) {
        fprintf(stderr, "\npdctl generate: generation failed: %s\n", pd_status_str(gst));
        goto out;
    }
    if (json) {
        print_json(&a, m, k, llm, prompt_ids, ids, &st, &s, load_s);
    } else {
        printf("\n");
        fflush(stdout);
        fprintf(stderr,
                "[%d prompt tokens %.1f tok/s, %d generated %.1f tok/s, %s, %d threads, "
                "%s]\n",
                st.n_prompt, st.prompt_s > 0 ? st.n_prompt / st.prompt_s : 0.0, st.n_gen,
                st.decode_s > 0 ? st.n_decode_steps / st.decode_s : 0.0, k->name,
                k->n_threads, pd_finish_str(st.finish));
        if (spec)
            fprintf(stderr, "[speculation: %lld proposed, %lld accepted]\n",
                    (long long)sc.proposed, (long long)sc.accepted);
    }
    rc = 0;
out:
    free(s.text);
    free(s.piece);
    free(prompt_ids);
    free(ids);
    pd_sampler_destroy(&smp);
    pd_llm_destroy(&llm);
    pd_kernels_destroy(&k);
    pd_model_destroy(&m);
    return rc;
}
