/* rng.h - the project's one deterministic random stream: xoshiro256** seeded through
 * splitmix64, so a seed gives the same numbers on every machine and build.
 * Used by the sampler (per-request seeds) and by mkmodel (random weights).
 * A value type; one stream per thread. */
#ifndef PD_RNG_H
#define PD_RNG_H

#include <stdint.h>

typedef struct pd_rng {
    uint64_t s[4];
} pd_rng_t;

static inline uint64_t pd_splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline void pd_rng_seed(pd_rng_t *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = pd_splitmix64(&seed);
}

static inline uint64_t pd_rng_rotl_(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t pd_rng_next(pd_rng_t *r)
{
    uint64_t *s = r->s, result = pd_rng_rotl_(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = pd_rng_rotl_(s[3], 45);
    return result;
}

/* Uniform in [0, 1) with 24 bits: every value exactly representable as a float. */
static inline float pd_rng_float(pd_rng_t *r)
{
    return (float)(pd_rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

#endif
