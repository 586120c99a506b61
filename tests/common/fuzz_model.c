/* fuzz_model.c - libFuzzer target: pd_model_open on arbitrary bytes (GGUF, or a
 * llama2.c checkpoint without its tokenizer, which must fail cleanly), then, for a
 * model the loader accepts, tokenizing and detokenizing a fixed text and every piece,
 * and for a small one a few greedy and top-p tokens through pd_generate. A crash, a
 * sanitizer report or a leak is a finding; any status the loader returns is fine.
 * The bytes live in a memfd, opened by its /proc path (pd_model_open wants a path). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/generate.h"
#include "common/log.h"
#include "common/model.h"
#include "common/tokenizer.h"
#include "kernels/ops.h"

static void quiet(pd_log_level_t l, const char *file, int line, const char *msg, void *u)
{
    (void)l, (void)file, (void)line, (void)msg, (void)u;
}

static pd_kernels_t *kernels;

static void detok_all(const pd_tokenizer_t *tok, const int32_t *ids, size_t n)
{
    size_t cap = pd_tokenizer_max_piece_len(tok) + 16;
    char *out = malloc(cap);
    if (!out)
        return;
    pd_detok_t d;
    pd_detok_init(&d, tok);
    for (size_t i = 0; i < n; i++)
        pd_detok_feed(&d, ids[i], out, cap);
    pd_detok_flush(&d, out, cap);
    pd_detok_init(&d, tok);
    for (int32_t id = -1; id <= pd_tokenizer_n_vocab(tok) && id < 4096; id++)
        pd_detok_feed(&d, id, out, cap);
    free(out);
}

static void generate(const pd_model_t *m, const int32_t *ids, size_t n)
{
    const pd_model_config_t *c = pd_model_config(m);
    if ((int64_t)c->dim * c->n_layers > 8192 || c->hidden_dim > 4096 ||
        c->vocab_size > 4096)
        return; /* keep each input fast */
    const pd_tokenizer_t *tok = pd_model_tokenizer(m);
    pd_llm_opts_t o = {.max_ctx = 16, .max_batch_tokens = 4};
    for (int sampled = 0; sampled < 2; sampled++) {
        pd_sampler_params_t sp = pd_sampler_params_default();
        if (sampled) {
            sp.temperature = 0.8f;
            sp.top_p = 0.9f;
            sp.top_k = 5;
            sp.seed = 3;
        }
        pd_sampler_t *s = NULL;
        pd_llm_t *llm = NULL;
        if (pd_sampler_new(pd_tokenizer_n_vocab(tok), &sp, &s) == PD_OK &&
            pd_llm_new(m, kernels, &o, &llm) == PD_OK) {
            pd_gen_opts_t go = {.max_tokens = 4, .ignore_eos = true};
            int32_t out[4];
            pd_gen_stats_t st;
            pd_generate(llm, s, ids, (int32_t)n, pd_tokenizer_eos(tok),
                        pd_tokenizer_bos(tok), &go, NULL, NULL, out, &st);
        }
        pd_llm_destroy(&llm);
        pd_sampler_destroy(&s);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!kernels) {
        pd_log_set_callback(quiet, NULL);
        if (pd_kernels_cpu_new(1, "auto", &kernels) != PD_OK)
            abort();
    }
    int fd = memfd_create("fuzz_model", 0);
    if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size))
        abort();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    pd_model_t *m = NULL;
    if (pd_model_open(path, NULL, &m) == PD_OK) {
        const pd_tokenizer_t *tok = pd_model_tokenizer(m);
        static const char text[] =
            "Once upon a time, \xe2\x82\xac there\x80 was <0x41> \n\n 12";
        int32_t ids[12];
        size_t n = 0;
        pd_status_t st =
            pd_tokenizer_encode(tok, text, sizeof text - 1, true, ids, 12, &n);
        if (st == PD_OK || st == PD_ERR_RANGE) {
            n = n > 12 ? 12 : n;
            detok_all(tok, ids, n);
            if (n > 0)
                generate(m, ids, n);
        }
        pd_model_destroy(&m);
    }
    close(fd);
    return 0;
}
