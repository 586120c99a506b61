/* sampler.c - see sampler.h. Candidates are (id, prob) pairs in scratch sized at
 * creation (for a sampler that draws); top-k uses a partial selection so k << vocab
 * costs O(vocab), and the survivors of the cheap filters are ordered only as far as
 * top-p and the draw reach (buckets by probability, each sorted when first reached).
 * One thread per sampler. */
#include "common/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/rng.h"

/* Buckets of the ordering below: a candidate's key is its probability's float bits
 * >> KEY_SHIFT (8 exponent bits, 5 of the mantissa). */
#define KEY_SHIFT 18
#define N_KEYS    ((0x3f800000u >> KEY_SHIFT) + 1) /* keys of [0, 1]; larger (NaN) clamp */
/* A bucket of more than BIG_BUCKET candidates is spread once more, over the next
 * SUB_BITS bits of the probability, before its parts are sorted: nearly uniform logits
 * (a random model's, or a high temperature) put thousands of candidates in a bucket. */
#define BIG_BUCKET 512
#define SUB_BITS   12
#define N_SUBS     (1u << SUB_BITS)

typedef struct cand {
    float p;
    int32_t id;
} cand_t;

struct pd_sampler {
    int32_t n_vocab;
    pd_sampler_params_t params;
    pd_rng_t rng;
    /* Scratch of a sampler that draws (NULL for a greedy one): */
    /* [n_vocab] the candidates (candidates()); once ordered_begin has spread them
     * into ord, scratch for ordered_at */
    cand_t *cands;
    cand_t *ord;         /* [n_vocab] them by bucket, sorted up to n_sorted */
    int32_t *bucket_end; /* [N_KEYS] where each bucket ends in ord */
    int32_t *sub_end;    /* [N_SUBS] the same inside a big bucket (sort_bucket) */
    int32_t n_sorted;
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
    s->n_vocab = n_vocab;
    s->params = *params;
    pd_sampler_reseed(s, params->seed);
    if (!pd_sampler_is_greedy(s)) { /* the params never change: greedy needs no scratch */
        s->cands = malloc((size_t)n_vocab * sizeof *s->cands);
        s->ord = malloc((size_t)n_vocab * sizeof *s->ord);
        s->bucket_end = malloc(N_KEYS * sizeof *s->bucket_end);
        s->sub_end = malloc(N_SUBS * sizeof *s->sub_end);
        if (!s->cands || !s->ord || !s->bucket_end || !s->sub_end) {
            pd_sampler_destroy(&s);
            return PD_ERR_NOMEM;
        }
    }
    *sampler_p = s;
    return PD_OK;
}

void pd_sampler_destroy(pd_sampler_t **sampler_p)
{
    if (!sampler_p || !*sampler_p)
        return;
    free((*sampler_p)->cands);
    free((*sampler_p)->ord);
    free((*sampler_p)->bucket_end);
    free((*sampler_p)->sub_end);
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

/* ---- the candidates in order, as far as they are needed ----
 * The draw and top-p need the candidates in that order only as far as the drawn mass
 * reaches. ordered_begin spreads them over buckets of their probability's float bits
 * (a counting sort: the bits of positive floats order like their values, and a bucket
 * spans a factor of 2^(1/32)), most likely bucket first; ordered_at sorts a bucket the
 * first time an index reaches it (a big one spread once more by the next bits).
 * Globally that is the order cand_before gives, so the sums and the draw below are the
 * same float operations in the same order as a full sort's. O(n) plus the buckets
 * reached, no allocation (glibc's qsort may allocate). */

/* p's float bits >> shift, masked, at most max. */
static inline uint32_t bits_key(float p, unsigned shift, uint32_t mask, uint32_t max)
{
    uint32_t b;
    memcpy(&b, &p, sizeof b);
    b = (b >> shift) & mask;
    return b < max ? b : max;
}

/* p's bucket; NaN (or a negative) lands in the top one. */
static uint32_t cand_key(float p)
{
    return bits_key(p, KEY_SHIFT, UINT32_MAX >> KEY_SHIFT, N_KEYS - 1);
}

/* A stable counting sort of c[0..n) into out by bits_key(p, shift, mask, n_keys - 1),
 * largest key first: end[0..n_keys) gets where each key's candidates end in out,
 * *lo_p and *hi_p the smallest and largest key present (n >= 1). */
static inline __attribute__((always_inline)) void
spread(const cand_t *c, int32_t n, cand_t *out, int32_t *end, uint32_t n_keys,
       unsigned shift, uint32_t mask, uint32_t *lo_p, uint32_t *hi_p)
{
    memset(end, 0, n_keys * sizeof *end);
    uint32_t lo = n_keys - 1, hi = 0;
    for (int32_t i = 0; i < n; i++) {
        uint32_t k = bits_key(c[i].p, shift, mask, n_keys - 1);
        end[k]++;
        lo = k < lo ? k : lo;
        hi = k > hi ? k : hi;
    }
    /* end[k]: first the key's start, then (after the spread) its end */
    int32_t at = 0;
    for (uint32_t k = hi + 1; k-- > lo;) {
        int32_t cnt = end[k];
        end[k] = at;
        at += cnt;
    }
    for (int32_t i = 0; i < n; i++)
        out[end[bits_key(c[i].p, shift, mask, n_keys - 1)]++] = c[i];
    *lo_p = lo;
    *hi_p = hi;
}

/* A heap over c[0..n) with the candidate last in order at the root: heapsort with it
 * leaves c[0..n) in order. */
static void sift_down_last(cand_t *c, int32_t i, int32_t n)
{
    for (;;) {
        int32_t l = 2 * i + 1, last = i;
        if (l < n && cand_before(&c[last], &c[l]))
            last = l;
        if (l + 1 < n && cand_before(&c[last], &c[l + 1]))
            last = l + 1;
        if (last == i)
            return;
        cand_t t = c[i];
        c[i] = c[last];
        c[last] = t;
        i = last;
    }
}

static void sort_cands(cand_t *c, int32_t n)
{
    if (n <= 24) { /* insertion sort: most buckets hold a few */
        for (int32_t i = 1; i < n; i++) {
            cand_t x = c[i];
            int32_t j = i;
            for (; j > 0 && cand_before(&x, &c[j - 1]); j--)
                c[j] = c[j - 1];
            c[j] = x;
        }
        return;
    }
    for (int32_t i = n / 2 - 1; i >= 0; i--)
        sift_down_last(c, i, n);
    for (int32_t m = n - 1; m > 0; m--) {
        cand_t t = c[0];
        c[0] = c[m];
        c[m] = t;
        sift_down_last(c, 0, m);
    }
}

/* Sorts one bucket c[0..n) (candidates of one key). A big one is first spread by the
 * SUB_BITS bits below the key, largest first, into s->cands, then each part is
 * sorted: the order cand_before gives, since equal probabilities share a part. */
static void sort_bucket(pd_sampler_t *s, cand_t *c, int32_t n)
{
    if (n <= BIG_BUCKET) {
        sort_cands(c, n);
        return;
    }
    cand_t *tmp = s->cands;
    uint32_t lo, hi;
    spread(c, n, tmp, s->sub_end, N_SUBS, KEY_SHIFT - SUB_BITS, N_SUBS - 1, &lo, &hi);
    int32_t b = 0;
    for (uint32_t k = hi + 1; k-- > lo;) {
        sort_cands(tmp + b, s->sub_end[k] - b);
        b = s->sub_end[k];
    }
    memcpy(c, tmp, (size_t)n * sizeof *c);
}

/* Spreads c[0..m) over s->ord by bucket, most likely bucket first; s->bucket_end[key]
 * is where each bucket ends in ord. Nothing is sorted yet (s->n_sorted = 0). */
static void ordered_begin(pd_sampler_t *s, const cand_t *c, int32_t m)
{
    uint32_t lo, hi;
    spread(c, m, s->ord, s->bucket_end, N_KEYS, KEY_SHIFT, UINT32_MAX >> KEY_SHIFT, &lo,
           &hi);
    s->n_sorted = 0;
}

/* The i-th candidate in order (i < the m given to ordered_begin). */
static const cand_t *ordered_at(pd_sampler_t *s, int32_t i)
{
    while (i >= s->n_sorted) {
        int32_t b = s->n_sorted, e = s->bucket_end[cand_key(s->ord[b].p)];
        sort_bucket(s, s->ord + b, e - b);
        s->n_sorted = e;
    }
    return &s->ord[i];
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
    /* min-p: keep p >= min_p * p_max (p_max is the unnormalised max, 1.0 here); the
     * argmax has p == 1 and survives, unless the logits are NaN. Without top-k it
     * filters as the probabilities are made: the same survivors, in the same order. */
    bool top_k = (p->top_k > 0 && p->top_k < n);
    bool min_p_now = (p->min_p > 0.0f && !top_k);
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++) {
        float e = expf((logits[i] - max) * inv_t);
        if (min_p_now && !(e >= p->min_p))
            continue;
        s->cands[m].p = e;
        s->cands[m++].id = i;
    }
    if (top_k) {
        select_top_k(s->cands, m, p->top_k);
        m = p->top_k;
        if (p->min_p > 0.0f) {
            int32_t w = 0;
            for (int32_t i = 0; i < m; i++)
                if (s->cands[i].p >= p->min_p)
                    s->cands[w++] = s->cands[i];
            m = w;
        }
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
    /* The candidates in order as far as the nucleus (top-p) and the draw need them. */
    float total = 0.0f;
    int32_t m = candidates(s, logits, &total);
    if (m == 0) /* NaN logits (a broken model) left nothing: a token all the same */
        return pd_argmax(logits, s->n_vocab);
    ordered_begin(s, s->cands, m);
    int32_t n_draw = m;
    if (p->top_p < 1.0f) {
        float cum = 0.0f, limit = p->top_p * total;
        int32_t n = 0;
        while (n < m && cum < limit)
            cum += ordered_at(s, n++)->p;
        /* the nucleus; never empty (only NaN logits leave the loop at once) */
        n_draw = n > 0 ? n : 1;
        total = cum < total ? cum : total;
    }
    float r = pd_rng_float(&s->rng) * total, acc = 0.0f;
    for (int32_t i = 0; i < n_draw; i++) {
        const cand_t *x = ordered_at(s, i);
        acc += x->p;
        if (r < acc)
            return x->id;
    }
    return ordered_at(s, n_draw - 1)->id; /* rounding left r at the very top */
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
    if (m == 0) { /* as in pd_sampler_sample */
        int32_t t = pd_argmax(logits, n);
        *accepted = t == proposed;
        return t;
    }
    int32_t lo = 0; /* the candidates drawn from: c[lo .. m) */
    if (p->top_p < 1.0f) {
        ordered_begin(s, c, m);
        float cum = 0.0f, limit = p->top_p * total;
        int32_t n_nuc = 0;
        while (n_nuc < m && cum < limit)
            cum += ordered_at(s, n_nuc++)->p;
        /* the nucleus into c[lo .. m), least likely first */
        lo = m - n_nuc;
        for (int32_t i = 0; i < n_nuc; i++)
            c[m - 1 - i] = s->ord[i];
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
