/* test_sampler.c - the sampler: greedy is argmax, filters restrict the support,
 * frequencies follow the softmax, the same seed gives the same draws, the draws are
 * those of a full sort, broken logits still give a token. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/rng.h"
#include "common/sampler.h"
#include "support/pdcheck.h"

#define NV 6

static pd_sampler_t *mk(float temp, int32_t k, float p, float minp, uint64_t seed)
{
    pd_sampler_params_t sp = {
        .temperature = temp, .top_k = k, .top_p = p, .min_p = minp, .seed = seed};
    pd_sampler_t *s = NULL;
    ck_assert_int_eq(pd_sampler_new(NV, &sp, &s), PD_OK);
    return s;
}

/* probabilities 0.4 0.25 0.15 0.1 0.06 0.04 */
static void logits(float *l)
{
    const float p[NV] = {0.4f, 0.25f, 0.15f, 0.1f, 0.06f, 0.04f};
    for (int i = 0; i < NV; i++)
        l[i] = logf(p[(i + 2) % NV]) + 3.0f; /* permuted and shifted */
}

START_TEST(greedy_is_argmax)
{
    float l[NV];
    logits(l);
    pd_sampler_t *s = mk(0.0f, 0, 1.0f, 0.0f, 1);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(pd_sampler_sample(s, l), 4); /* 0.4 sits at index 4 */
    pd_sampler_destroy(&s);
    ck_assert_ptr_null(s);
    s = mk(1.0f, 1, 1.0f, 0.0f, 1); /* top-k 1 is greedy too */
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(pd_sampler_sample(s, l), 4);
    pd_sampler_destroy(&s);
    float ties[NV] = {1, 5, 5, 2, 5, 0};
    ck_assert_int_eq(pd_argmax(ties, NV), 1); /* first of the tied maxima */
}
END_TEST

START_TEST(same_seed_same_draws)
{
    float l[NV];
    logits(l);
    pd_sampler_t *a = mk(1.0f, 0, 1.0f, 0.0f, 42), *b = mk(1.0f, 0, 1.0f, 0.0f, 42);
    pd_sampler_t *c = mk(1.0f, 0, 1.0f, 0.0f, 43);
    int differ = 0;
    for (int i = 0; i < 200; i++) {
        int32_t x = pd_sampler_sample(a, l), y = pd_sampler_sample(b, l);
        ck_assert_int_eq(x, y);
        differ += x != pd_sampler_sample(c, l);
    }
    ck_assert_int_gt(differ, 20);
    pd_sampler_reseed(a, 42);
    pd_sampler_reseed(b, 42);
    for (int i = 0; i < 50; i++)
        ck_assert_int_eq(pd_sampler_sample(a, l), pd_sampler_sample(b, l));
    pd_sampler_destroy(&a);
    pd_sampler_destroy(&b);
    pd_sampler_destroy(&c);
}
END_TEST

static void freqs(pd_sampler_t *s, int n, double *f)
{
    float l[NV];
    logits(l);
    for (int i = 0; i < NV; i++)
        f[i] = 0;
    for (int i = 0; i < n; i++)
        f[pd_sampler_sample(s, l)] += 1.0 / n;
}

START_TEST(frequencies_follow_softmax)
{
    const int n = 40000;
    double f[NV];
    /* index i holds p[(i+2)%6] */
    const double want[NV] = {0.15, 0.1, 0.06, 0.04, 0.4, 0.25};
    pd_sampler_t *s = mk(1.0f, 0, 1.0f, 0.0f, 7);
    freqs(s, n, f);
    for (int i = 0; i < NV; i++) /* 5 sigma of a binomial */
        ck_assert_double_le(fabs(f[i] - want[i]), 5 * sqrt(want[i] * (1 - want[i]) / n));
    pd_sampler_destroy(&s);

    /* temperature 0.5 squares the probabilities (renormalised) */
    double z = 0;
    for (int i = 0; i < NV; i++)
        z += want[i] * want[i];
    s = mk(0.5f, 0, 1.0f, 0.0f, 8);
    freqs(s, n, f);
    for (int i = 0; i < NV; i++) {
        double w = want[i] * want[i] / z;
        ck_assert_double_le(fabs(f[i] - w), 5 * sqrt(w * (1 - w) / n) + 1e-9);
    }
    pd_sampler_destroy(&s);
}
END_TEST

START_TEST(filters_restrict_support)
{
    const int n = 20000;
    double f[NV];
    /* top-k 2: only 0.4 (idx 4) and 0.25 (idx 5), renormalised 0.615/0.385 */
    pd_sampler_t *s = mk(1.0f, 2, 1.0f, 0.0f, 3);
    freqs(s, n, f);
    ck_assert_double_eq(f[0] + f[1] + f[2] + f[3], 0.0);
    ck_assert_double_le(fabs(f[4] - 0.4 / 0.65), 0.02);
    pd_sampler_destroy(&s);
    /* top-p 0.7: 0.4 + 0.25 = 0.65 < 0.7, so 0.15 (idx 0) joins; 0.1 does not */
    s = mk(1.0f, 0, 0.7f, 0.0f, 4);
    freqs(s, n, f);
    ck_assert_double_eq(f[1] + f[2] + f[3], 0.0);
    ck_assert_double_gt(f[0], 0.1);
    pd_sampler_destroy(&s);
    /* min-p 0.3: keep p >= 0.12 -> 0.4, 0.25, 0.15 */
    s = mk(1.0f, 0, 1.0f, 0.3f, 5);
    freqs(s, n, f);
    ck_assert_double_eq(f[1] + f[2] + f[3], 0.0);
    ck_assert_double_gt(f[0], 0.1);
    pd_sampler_destroy(&s);
    /* a tiny top-p is greedy */
    s = mk(1.0f, 0, 1e-6f, 0.0f, 6);
    freqs(s, 1000, f);
    ck_assert_double_eq_tol(f[4], 1.0, 1e-9);
    pd_sampler_destroy(&s);
}
END_TEST

START_TEST(bad_params_refused)
{
    pd_log_set_level(PD_LOG_LEVEL_OFF);
    pd_sampler_params_t p = pd_sampler_params_default();
    pd_sampler_t *s = NULL;
    p.temperature = NAN;
    ck_assert_int_eq(pd_sampler_new(NV, &p, &s), PD_ERR_INVALID);
    p = pd_sampler_params_default();
    p.temperature = -1;
    ck_assert_int_eq(pd_sampler_params_check(&p), PD_ERR_INVALID);
    p = pd_sampler_params_default();
    p.top_p = 0.0f;
    ck_assert_int_eq(pd_sampler_params_check(&p), PD_ERR_INVALID);
    p = pd_sampler_params_default();
    p.min_p = 1.5f;
    ck_assert_int_eq(pd_sampler_params_check(&p), PD_ERR_INVALID);
    p = pd_sampler_params_default();
    ck_assert_int_eq(pd_sampler_new(0, &p, &s), PD_ERR_INVALID);
    ck_assert_ptr_null(s);
    pd_sampler_destroy(NULL);
}
END_TEST

/* ---- the ordering: the same draws as a full sort ---- */

typedef struct ref_cand {
    float p;
    int32_t id;
} ref_cand_t;

static int ref_cmp(const void *a, const void *b) /* descending p, ties by id */
{
    const ref_cand_t *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int ref_cmp_id(const void *a, const void *b)
{
    const ref_cand_t *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

/* The sampler's documented rule, done the plain way: softmax(l / T) in id order (the
 * same float expressions), min-p, the total summed in id order, then every candidate
 * sorted (qsort) before the nucleus and the draw. No top-k: its partial selection
 * leaves the candidates in an order of its own, and the total is summed in it. Fills
 * c[0..m) in order and returns m; *total as the sampler sums it. */
static int ref_candidates(const float *l, int n, const pd_sampler_params_t *sp,
                          ref_cand_t *c, float *total)
{
    float max = l[0];
    for (int i = 1; i < n; i++)
        max = l[i] > max ? l[i] : max;
    float inv_t = 1.0f / sp->temperature, tot = 0.0f;
    int m = 0;
    for (int i = 0; i < n; i++) {
        float e = expf((l[i] - max) * inv_t);
        if (sp->min_p > 0.0f && !(e >= sp->min_p))
            continue;
        c[m].p = e;
        c[m++].id = i;
    }
    for (int i = 0; i < m; i++)
        tot += c[i].p;
    qsort(c, (size_t)m, sizeof *c, ref_cmp);
    *total = tot;
    return m;
}

/* How many lead the order into the nucleus (all of them without top-p); *total
 * becomes the nucleus' mass. */
static int ref_nucleus(const ref_cand_t *c, int m, float top_p, float *total)
{
    if (top_p >= 1.0f)
        return m;
    float cum = 0.0f, limit = top_p * *total;
    int n = 0;
    while (n < m && cum < limit)
        cum += c[n++].p;
    *total = cum < *total ? cum : *total;
    return n;
}

static int32_t ref_sample(pd_rng_t *g, const float *l, int n,
                          const pd_sampler_params_t *sp, ref_cand_t *c)
{
    float total;
    int m = ref_candidates(l, n, sp, c, &total);
    int k = ref_nucleus(c, m, sp->top_p, &total);
    float r = pd_rng_float(g) * total, acc = 0.0f;
    for (int i = 0; i < k; i++) {
        acc += c[i].p;
        if (r < acc)
            return c[i].id;
    }
    return c[k - 1].id;
}

/* pd_sampler_sample_spec's documented rule: the nucleus walked least likely first with
 * top-p, the candidates in id order without. */
static int32_t ref_sample_spec(pd_rng_t *g, const float *l, int n,
                               const pd_sampler_params_t *sp, ref_cand_t *c,
                               int32_t proposed, bool *accepted)
{
    float total;
    int m = ref_candidates(l, n, sp, c, &total);
    int k = ref_nucleus(c, m, sp->top_p, &total);
    if (sp->top_p >= 1.0f) { /* back to id order */
        qsort(c, (size_t)m, sizeof *c, ref_cmp_id);
    } else { /* least likely first */
        for (int i = 0; i < k / 2; i++) {
            ref_cand_t t = c[i];
            c[i] = c[k - 1 - i];
            c[k - 1 - i] = t;
        }
    }
    float q = 0.0f;
    for (int i = 0; i < k; i++)
        if (c[i].id == proposed)
            q = c[i].p;
    *accepted = false;
    if (q > 0.0f && pd_rng_float(g) * total < q) {
        *accepted = true;
        return proposed;
    }
    float rest = total - q, r = pd_rng_float(g) * rest, acc = 0.0f;
    int32_t last = -1;
    for (int i = 0; i < k; i++) {
        if (c[i].id == proposed)
            continue;
        last = c[i].id;
        acc += c[i].p;
        if (r < acc)
            return last;
    }
    return last >= 0 ? last : proposed;
}

/* Logits of several shapes: flat (top-p reaches deep into the order), peaked, ties
 * (equal probabilities across and inside the sampler's buckets), a range wide enough
 * that many probabilities underflow to 0, nearly uniform (a random model's: thousands
 * of candidates in one bucket, spread again inside it, with ties among them). */
static void shaped_logits(float *l, int n, int shape, pd_rng_t *g)
{
    for (int i = 0; i < n; i++) {
        float u = pd_rng_float(g) + 1e-7f, v = pd_rng_float(g);
        float z = sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v); /* standard normal */
        switch (shape) {
        case 0:
            l[i] = 3.0f * z;
            break;
        case 1:
            l[i] = 2.0f * z + (i % 97 == 3 ? 12.0f : 0.0f);
            break;
        case 2:
            l[i] = floorf(2.0f * z) * 0.5f;
            break;
        case 4:
            l[i] = i % 5 ? 0.02f * z : floorf(400.0f * z) * 0.00005f;
            break;
        default:
            l[i] = 40.0f * z;
            break;
        }
    }
}

START_TEST(draws_match_a_full_sort)
{
    const int sizes[] = {1, 2, 7, 300, 5000, 32000};
    const float temps[] = {0.3f, 1.0f, 1.7f};
    const float top_ps[] = {1.0f, 0.95f, 0.5f, 0.01f};
    const float min_ps[] = {0.0f, 0.02f};
    float *l = malloc(32000 * sizeof *l);
    ref_cand_t *c = malloc(32000 * sizeof *c);
    ck_assert(l && c);
    pd_rng_t g;
    pd_rng_seed(&g, 5);
    int cases = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int shape = 0; shape < 5; shape++) {
            int n = sizes[si];
            shaped_logits(l, n, shape, &g);
            for (int ci = 0; ci < 24; ci++) {
                pd_sampler_params_t sp = pd_sampler_params_default();
                sp.temperature = temps[ci % 3];
                sp.top_p = top_ps[(ci / 3) % 4];
                sp.min_p = min_ps[ci / 12];
                sp.seed = 1000u * si + 10u * (unsigned)shape + (unsigned)ci;
                pd_sampler_t *s = NULL;
                ck_assert_int_eq(pd_sampler_new(n, &sp, &s), PD_OK);
                pd_rng_t ref;
                pd_rng_seed(&ref, sp.seed);
                int draws = n > 5000 ? 4 : 12;
                for (int d = 0; d < draws; d++) {
                    int32_t want = ref_sample(&ref, l, n, &sp, c);
                    int32_t got = pd_sampler_sample(s, l);
                    ck_assert_msg(got == want,
                                  "n %d shape %d T %g top_p %g min_p %g draw %d: %d, "
                                  "a full sort draws %d",
                                  n, shape, sp.temperature, sp.top_p, sp.min_p, d, got,
                                  want);
                    int32_t prop = (int32_t)((d * 7919) % n);
                    bool a = false, ra = false;
                    want = ref_sample_spec(&ref, l, n, &sp, c, prop, &ra);
                    got = pd_sampler_sample_spec(s, l, prop, &a);
                    ck_assert_msg(got == want && a == ra,
                                  "spec: n %d shape %d T %g top_p %g min_p %g draw %d: "
                                  "%d (%d), a full sort %d (%d)",
                                  n, shape, sp.temperature, sp.top_p, sp.min_p, d, got, a,
                                  want, ra);
                    cases++;
                }
                pd_sampler_destroy(&s);
            }
        }
    ck_assert_int_gt(cases, 1000);
    free(l);
    free(c);
}
END_TEST

/* Logits that are NaN or infinite (a broken model file) give some token of the
 * vocabulary, never a read outside the candidates. */
START_TEST(non_finite_logits_give_a_token)
{
    enum { V = 64 };
    float l[V];
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (int b = 0; b < 3; b++)
        for (int all = 0; all < 2; all++) {
            for (int i = 0; i < V; i++)
                l[i] = all || i % 5 == 0 ? bad[b] : (float)(i % 9);
            for (int ci = 0; ci < 8; ci++) {
                pd_sampler_params_t sp = pd_sampler_params_default();
                sp.temperature = 0.8f;
                sp.top_p = ci & 1 ? 0.9f : 1.0f;
                sp.top_k = ci & 2 ? 10 : 0;
                sp.min_p = ci & 4 ? 0.05f : 0.0f;
                sp.seed = (uint64_t)ci;
                pd_sampler_t *s = NULL;
                ck_assert_int_eq(pd_sampler_new(V, &sp, &s), PD_OK);
                for (int d = 0; d < 20; d++) {
                    int32_t t = pd_sampler_sample(s, l);
                    ck_assert_msg(t >= 0 && t < V, "bad %d all %d params %d: token %d", b,
                                  all, ci, t);
                    bool a = false;
                    t = pd_sampler_sample_spec(s, l, d % V, &a);
                    ck_assert(t >= 0 && t < V);
                }
                pd_sampler_destroy(&s);
            }
        }
}
END_TEST

/* ---- speculative sampling: the same distribution ---- */

/* The exact distribution pd_sampler_sample draws from, in double: softmax(l / T),
 * top-k (by probability, then id), min-p, then the top-p nucleus. */
static void exact_dist(const float *l, int n, const pd_sampler_params_t *sp, double *out)
{
    double max = l[0], tot = 0;
    for (int i = 1; i < n; i++)
        max = l[i] > max ? l[i] : max;
    int idx[256];
    for (int i = 0; i < n; i++) {
        out[i] = exp((l[i] - max) / sp->temperature);
        idx[i] = i;
    }
    for (int i = 0; i < n; i++) /* order: descending, ties by id */
        for (int j = i + 1; j < n; j++)
            if (out[idx[j]] > out[idx[i]] ||
                (out[idx[j]] == out[idx[i]] && idx[j] < idx[i])) {
                int t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
            }
    int keep = sp->top_k > 0 && sp->top_k < n ? sp->top_k : n;
    for (int r = 0; r < n; r++)
        if (r >= keep || (sp->min_p > 0 && out[idx[r]] < sp->min_p))
            out[idx[r]] = 0;
    for (int i = 0; i < n; i++)
        tot += out[i];
    if (sp->top_p < 1) {
        double cum = 0;
        int r = 0;
        for (; r < n && cum < sp->top_p * tot; r++)
            cum += out[idx[r]];
        for (; r < n; r++)
            out[idx[r]] = 0;
        tot = cum;
    }
    for (int i = 0; i < n; i++)
        out[i] /= tot;
}

/* Pearson's chi-square of counts against n * p over bins of expected count >= 5 (the
 * rest pooled); false when it exceeds the 0.999 quantile (Wilson-Hilferty). */
static bool chi_square_ok(const long *count, const double *p, int n, long N, double *stat)
{
    double x2 = 0, pool_e = 0, pool_o = 0;
    int df = -1;
    for (int i = 0; i < n; i++) {
        double e = p[i] * (double)N;
        if (e >= 5) {
            x2 += (count[i] - e) * (count[i] - e) / e;
            df++;
        } else {
            pool_e += e;
            pool_o += (double)count[i];
        }
    }
    if (pool_e >= 5) {
        x2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        df++;
    } else if (pool_o > 10) {
        x2 = INFINITY; /* mass where (almost) none is expected */
    }
    double z = 3.09, k = df > 0 ? df : 1;
    double crit = k * pow(1 - 2 / (9 * k) + z * sqrt(2 / (9 * k)), 3);
    *stat = x2;
    return x2 <= crit;
}

START_TEST(spec_sampling_keeps_distribution)
{
    enum { V = 48, N = 30000 };
    float logits[V];
    pd_rng_t g;
    pd_rng_seed(&g, 99);
    for (int i = 0; i < V; i++)
        logits[i] = 3.0f * (pd_rng_float(&g) - 0.5f) + (i % 7 == 0 ? 1.5f : 0.0f);
    pd_sampler_params_t sets[4];
    for (int i = 0; i < 4; i++)
        sets[i] = pd_sampler_params_default();
    sets[0].temperature = 0.8f;
    sets[1].temperature = 1.0f;
    sets[1].top_p = 0.85f;
    sets[2].temperature = 0.7f;
    sets[2].top_k = 10;
    sets[3].temperature = 1.3f;
    sets[3].min_p = 0.1f;
    static long cnt[V], plain[V];
    double p[V];
    for (int si = 0; si < 4; si++) {
        exact_dist(logits, V, &sets[si], p);
        int best = 0, zero = -1;
        for (int i = 0; i < V; i++) {
            best = p[i] > p[best] ? i : best;
            if (p[i] == 0 && zero < 0)
                zero = i;
        }
        /* proposals: the most likely token, a middling one, one outside the set */
        int props[3] = {best, (best + 5) % V, zero >= 0 ? zero : (best + 11) % V};
        for (int pi = 0; pi < 3; pi++) {
            pd_sampler_t *s = NULL;
            ck_assert_int_eq(pd_sampler_new(V, &sets[si], &s), PD_OK);
            memset(cnt, 0, sizeof cnt);
            memset(plain, 0, sizeof plain);
            long acc = 0;
            for (long t = 0; t < N; t++) {
                pd_sampler_reseed(s, 1000003ull * (uint64_t)t + (uint64_t)si);
                bool a = false;
                int32_t tok = pd_sampler_sample_spec(s, logits, props[pi], &a);
                ck_assert(tok >= 0 && tok < V);
                ck_assert(!a || tok == props[pi]);
                acc += a;
                cnt[tok]++;
                plain[pd_sampler_sample(s, logits)]++;
            }
            pd_sampler_destroy(&s);
            double x2s = 0, x2p = 0;
            ck_assert_msg(chi_square_ok(plain, p, V, N, &x2p),
                          "set %d: the plain sampler's chi-square %.1f", si, x2p);
            ck_assert_msg(chi_square_ok(cnt, p, V, N, &x2s),
                          "set %d proposal %d: speculative chi-square %.1f", si,
                          props[pi], x2s);
            /* acceptance happens with the proposal's probability */
            double pa = p[props[pi]], sd = sqrt(pa * (1 - pa) / N) + 1e-9;
            ck_assert_msg(fabs((double)acc / N - pa) < 5 * sd + 1e-12,
                          "set %d proposal %d: accepted %.4f, p %.4f", si, props[pi],
                          (double)acc / N, pa);
        }
    }
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 0, NULL, NULL);
    PD_TEST_ADD(tc, spec_sampling_keeps_distribution, greedy_is_argmax,
                same_seed_same_draws, frequencies_follow_softmax,
                filters_restrict_support, bad_params_refused, draws_match_a_full_sort,
                non_finite_logits_give_a_token);
    return pd_test_run("sampler", tc);
}
