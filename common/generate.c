/* generate.c - see generate.h. Single-threaded loop over pd_llm_forward. */
#include "common/generate.h"

#include <time.h>

#include "common/log.h"

const char *pd_finish_str(pd_finish_t f)
{
    switch (f) {
    case PD_FINISH_STOP:
        return "stop";
    case PD_FINISH_LENGTH:
        return "length";
    case PD_FINISH_NONE:
        break;
    }
    return "none";
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Runs the prompt in chunks; returns the logits of its last token. */
static pd_status_t prefill(pd_llm_t *llm, const int32_t *prompt, int32_t n,
                           const float **logits_p)
{
    int32_t chunk = pd_llm_max_batch_tokens(llm);
    int32_t pos[chunk];
    for (int32_t start = 0; start < n; start += chunk) {
        int32_t T = n - start < chunk ? n - start : chunk;
        for (int32_t t = 0; t < T; t++)
            pos[t] = start + t;
        int32_t last = T - 1;
        int last_chunk = start + T == n;
        pd_status_t st = pd_llm_forward(llm, prompt + start, pos, T, &last,
                                        last_chunk ? 1 : 0, logits_p);
        if (st != PD_OK)
            return st;
    }
    return PD_OK;
}

pd_status_t pd_generate(pd_llm_t *llm, pd_sampler_t *sampler, const int32_t *prompt,
                        int32_t n_prompt, int32_t eos, int32_t bos,
                        const pd_gen_opts_t *opts, pd_gen_token_fn on_token, void *user,
                        int32_t *out_ids, pd_gen_stats_t *stats)
{
    *stats = (pd_gen_stats_t){.n_prompt = n_prompt};
    int32_t max_ctx = pd_llm_max_ctx(llm);
    if (n_prompt < 1 || n_prompt >= max_ctx) {
        PD_LOG_ERROR("prompt of %d tokens does not fit the context of %d", n_prompt,
                     max_ctx);
        return PD_ERR_RANGE;
    }
    if (opts->max_tokens <= 0) {
        stats->finish = PD_FINISH_LENGTH;
        return PD_OK;
    }
    double t0 = now_s();
    const float *logits;
    pd_status_t st = prefill(llm, prompt, n_prompt, &logits);
    if (st != PD_OK)
        return st;
    int32_t pos = n_prompt;
    int32_t id = pd_sampler_sample(sampler, logits);
    double t1 = now_s();
    stats->prompt_s = t1 - t0;
    for (;;) {
        out_ids[stats->n_gen++] = id;
        if (on_token && on_token(user, id)) {
            stats->finish = PD_FINISH_STOP;
            break;
        }
        if (!opts->ignore_eos && (id == eos || id == bos)) {
            stats->finish = PD_FINISH_STOP;
            break;
        }
        if (stats->n_gen >= opts->max_tokens || pos >= max_ctx) {
            stats->finish = PD_FINISH_LENGTH;
            break;
        }
        int32_t row = 0;
        st = pd_llm_forward(llm, &id, &pos, 1, &row, 1, &logits);
        if (st != PD_OK)
            break;
        stats->n_decode_steps++;
        pos++;
        id = pd_sampler_sample(sampler, logits);
    }
    stats->decode_s = now_s() - t1;
    return st;
}
