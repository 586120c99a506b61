/* sampler.c - see sampler.h. Candidates are (id, prob) pairs in scratch sized at
 * creation; top-k uses a partial selection so k << vocab costs O(vocab), and the
 * survivors of the cheap filters are ordered only as far as top-p and the draw reach
 * (a heap). One thread per sampler. */
#include "common/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/rng.h"

typedef struct cand {
    float p;
    int32_t id;
} cand_t;

struct pd_sampler {
    int32_t n_vocab;
    pd_sampler_params_t params;
    pd_rng_t rng;
    cand_t *cands; /* [n_vocab] */
};

pd_sampler_params_t pd_sampler_params_default(void)
{
    pd_sampler_params_t p = {
        .temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f, .seed = 0};
    return p;
}

pd_status_t pd_sampler_params_check(const pd_sampler_params_t *p)
{
    if (!isfinite(p->temperature) || p->temperature < 0.0f) {
        PD_LOG_ERROR("temperature must be a finite number >= 0, got %g", p->temperature);
        return PD_ERR_INVALID;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        PD_LOG_ERROR("top_p must be in (0, 1], got %g", p->top_p);
        return PD_ERR_INVALID;
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        PD_LOG_ERROR("min_p must be in [0, 1], got %g", p->min_p);
        return PD_ERR_INVALID;
    }
    return PD_OK;
}

void pd_sampler_reseed(pd_sampler_t *s, uint64_t seed)
{
    pd_rng_seed(&s->rng, seed);
    s->params.seed = seed;
}

pd_status_t pd_sampler_new(int32_t n_vocab, const pd_sampler_params_t *params,
                           pd_sampler_t **sampler_p)
{
    if (n_vocab <= 0 || pd_sampler_params_check(params) != PD_OK)
        return PD_ERR_INVALID;
    pd_sampler_t *s = calloc(1, sizeof *s);
    if (!s)
        return PD_ERR_NOMEM;
    s->cands = malloc((size_t)n_vocab * sizeof *s->cands);
    if (!s->cands) {
        free(s);
        return PD_ERR_NOMEM;
    }
    s->n_vocab = n_vocab;
    s->params = *params;
    pd_sampler_reseed(s, params->seed);
    *sampler_p = s;
    return PD_OK;
}

void pd_sampler_destroy(pd_sampler_t **sampler_p)
{
    if (!sampler_p || !*sampler_p)
        return;
    free((*sampler_p)->cands);
    free(*sampler_p);
    *sampler_p = NULL;
}

int32_t pd_argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* Descending by probability, ties by id, so the order is total and portable. */
static int cand_before(const cand_t *x, const cand_t *y)
{
    return x->p > y->p || (x->p == y->p && x->id < y->id);
}

/* A binary heap over c[0..n) with the candidate first in order (most likely, lowest
 * id on ties) at the root. The draw below needs the candidates in that order only as
 * far as the drawn mass reaches (usually a few), so it pops them one at a time:
 * O(n + k log n) instead of sorting the whole vocabulary. No allocation (glibc's
 * qsort may allocate a merge buffer). */
static void sift_down(cand_t *c, int32_t i, int32_t n)
{
    for (;;) {
        int32_t l = 2 * i + 1, first = i;
        if (l < n && cand_before(&c[l], &c[first]))
            first = l;
        if (l + 1 < n && cand_before(&c[l + 1], &c[first]))
            first = l + 1;
        if (first == i)
            return;
        cand_t t = c[i];
        c[i] = c[first];
        c[first] = t;
        i = first;
    }
}

static void heapify(cand_t *c, int32_t n)
{
    for (int32_t i = n / 2 - 1; i >= 0; i--)
        sift_down(c, i, n);
}

/* Moves the root of the heap c[0..n) to c[n - 1]; the heap is then c[0..n - 1). */
static void heap_pop(cand_t *c, int32_t n)
{
    cand_t t = c[0];
    c[0] = c[n - 1];
    c[n - 1] = t;
    sift_down(c, 0, n - 1);
}

/* Moves the k best candidates of c[0..n) to the front (unordered): quickselect. */
static void select_top_k(cand_t *c, int32_t n, int32_t k)
{
    int32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        cand_t pivot = c[lo + (hi - lo) / 2];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (cand_before(&c[i], &pivot))
                i++;
            while (cand_before(&pivot, &c[j]))
                j--;
            if (i <= j) {
                cand_t t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            return;
    }
}

/* The candidates before top-p: softmax(logits / T) into s->cands, top-k, min-p.
 * Returns how many (in c[0..m)) and their total mass in *total_p. */
static int32_t candidates(pd_sampler_t *s, const float *logits, float *total_p)
{
    const pd_sampler_params_t *p = &s->params;
    int32_t n = s->n_vocab;
    float max = logits[0];
    for (int32_t i = 1; i < n; i++)
        max = logits[i] > max ? logits[i] : max;
    float inv_t = 1.0f / p->temperature;
    for (int32_t i = 0; i < n; i++) {
        float e = expf((logits[i] - max) * inv_t);
        s->cands[i].p = e;
        s->cands[i].id = i;
    }
    int32_t m = n;
    if (p->top_k > 0 && p->top_k < m) {
        select_top_k(s->cands, m, p->top_k);
        m = p->top_k;
    }
    /* min-p: keep p >= min_p * p_max (p_max is the unnormalised max, 1.0 here) */
    if (p->min_p > 0.0f) {
        int32_t w = 0;
        for (int32_t i = 0; i < m; i++)
            if (s->cands[i].p >= p->min_p)
                s->cands[w++] = s->cands[i];
        m = w; /* the argmax has p == 1 and always survives */
    }
    float total = 0.0f; /* summed in candidate order */
    for (int32_t i = 0; i < m; i++)
        total += s->cands[i].p;
    *total_p = total;
    return m;
}

bool pd_sampler_is_greedy(const pd_sampler_t *s)
{
    return s->params.temperature <= 0.0f || s->params.top_k == 1;
}

int32_t pd_sampler_sample(pd_sampler_t *s, const float *logits)
{
    const pd_sampler_params_t *p = &s->params;
    if (p->temperature <= 0.0f || p->top_k == 1)
        return pd_argmax(logits, s->n_vocab);
    /* The candidates in descending order, popped from a heap as far as the nucleus
     * (top-p) and the draw need them: the i-th in order lands in c[m - 1 - i]. */
    cand_t *c = s->cands;
    float total = 0.0f;
    int32_t m = candidates(s, logits, &total);
    heapify(c, m);
    int32_t popped = 0, n_draw = m;
    if (p->top_p < 1.0f) {
        float cum = 0.0f, limit = p->top_p * total;
        while (popped < m && cum < limit) {
            heap_pop(c, m - popped);
            cum += c[m - 1 - popped].p;
            popped++;
        }
        n_draw = popped; /* the nucleus */
        total = cum < total ? cum : total;
    }
    float r = pd_rng_float(&s->rng) * total, acc = 0.0f;
    for (int32_t i = 0; i < n_draw; i++) {
        if (i == popped) {
            heap_pop(c, m - popped);
            popped++;
        }
        acc += c[m - 1 - i].p;
        if (r < acc)
            return c[m - 1 - i].id;
    }
    return c[m - n_draw].id; /* rounding left r at the very top: the last one */
}

int32_t pd_sampler_sample_spec(pd_sampler_t *s, const float *logits, int32_t proposed,
                               bool *accepted)
{
    const pd_sampler_params_t *p = &s->params;
    int32_t n = s->n_vocab;
    if (p->temperature <= 0.0f || p->top_k == 1) {
        int32_t t = pd_argmax(logits, n);
        *accepted = t == proposed;
        return t;
    }
    /* the same distribution as pd_sampler_sample */
    cand_t *c = s->cands;
    float total = 0.0f;
    int32_t m = candidates(s, logits, &total);
    int32_t lo = 0; /* the candidates drawn from: c[lo .. m) */
    if (p->top_p < 1.0f) {
        heapify(c, m);
        float cum = 0.0f, limit = p->top_p * total;
        int32_t popped = 0;
        while (popped < m && cum < limit) {
            heap_pop(c, m - popped);
            cum += c[m - 1 - popped].p;
            popped++;
        }
        lo = m - popped;
        total = cum < total ? cum : total;
    }
    float q = 0.0f; /* the proposal's mass in the set */
    for (int32_t i = lo; i < m; i++)
        if (c[i].id == proposed)
            q = c[i].p;
    if (q > 0.0f && pd_rng_float(&s->rng) * total < q) {
        *accepted = true;
        return proposed;
    }
    *accepted = false;
    float rest = total - q, r = pd_rng_float(&s->rng) * rest, acc = 0.0f;
    int32_t last = -1;
    for (int32_t i = lo; i < m; i++) {
        if (c[i].id == proposed)
            continue;
        last = c[i].id;
        acc += c[i].p;
        if (r < acc)
            return last;
    }
    return last >= 0 ? last : proposed; /* rounding; or nothing but the proposal */
}

void pd_sampler_get_state(const pd_sampler_t *s, uint64_t out[4])
{
    memcpy(out, s->rng.s, sizeof s->rng.s);
}

void pd_sampler_set_state(pd_sampler_t *s, const uint64_t in[4])
{
    memcpy(s->rng.s, in, sizeof s->rng.s);
}
