/* test_kvpool.c - the paged KV pool on its own: sizing from a budget, all-or-nothing
 * allocation, reference counts, the prefix cache (hits need the same tokens and the
 * same parent; committed blocks survive until an allocation evicts them, least
 * recently freed first, a sequence's tail before its head), release errors, and the
 * device transports' PD-SUM64 checksum. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common/kvpool.h"
#include "common/log.h"
#include "common/model.h"
#include "kernels/sum64.h"
#include "support/pdcheck.h"

static pd_model_t *model;

static void setup(void)
{
    pd_test_log_setup();
    ck_assert_int_eq(pd_model_open(pd_test_model_path("stories260K.gguf"), NULL, &model),
                     PD_OK);
}

static void teardown(void)
{
    pd_model_destroy(&model);
}

static pd_kv_pool_t *pool_of(int32_t n_blocks, int32_t bs)
{
    pd_kv_pool_t *p = NULL;
    pd_kv_pool_opts_t o = {.block_size = bs, .n_blocks = n_blocks};
    ck_assert_int_eq(pd_kv_pool_new(model, &o, &p), PD_OK);
    return p;
}

START_TEST(sized_from_budget)
{
    const pd_model_config_t *c = pd_model_config(model);
    size_t row = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t f32_block = 2 * (size_t)c->n_layers * 16 * row * 4;
    pd_kv_pool_t *p = NULL;
    pd_kv_pool_opts_t o = {.memory_bytes = (int64_t)(10 * f32_block + f32_block / 2),
                           .kv_type = PD_KV_F32};
    ck_assert_int_eq(pd_kv_pool_new(model, &o, &p), PD_OK);
    ck_assert_int_eq(pd_kv_pool_n_blocks(p), 10);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 10);
    ck_assert_uint_eq(pd_kv_pool_block_bytes(p), f32_block);
    ck_assert_uint_eq(pd_kv_block_bytes(model, &o), f32_block);
    ck_assert_int_eq(pd_kv_pool_dtype(p), PD_DTYPE_F32);
    ck_assert_int_eq((char *)pd_kv_pool_k(p, 1) - (char *)pd_kv_pool_k(p, 0),
                     (ptrdiff_t)(10 * 16 * row * 4));
    pd_kv_pool_destroy(&p);
    o.kv_type = PD_KV_F16; /* half the bytes a block: twice the blocks */
    ck_assert_int_eq(pd_kv_pool_new(model, &o, &p), PD_OK);
    ck_assert_int_eq(pd_kv_pool_n_blocks(p), 21);
    pd_kv_pool_destroy(&p);
    /* below one block: refused, with the size one block needs */
    o = (pd_kv_pool_opts_t){.memory_bytes = (int64_t)f32_block - 1, .kv_type = PD_KV_F32};
    pd_test_n_errors = 0;
    ck_assert_int_eq(pd_kv_pool_new(model, &o, &p), PD_ERR_INVALID);
    ck_assert_int_eq(pd_test_n_errors, 1);
    ck_assert_ptr_nonnull(strstr(pd_test_last_error, "needs"));
    o.kv_type = (pd_kv_type_t)7;
    ck_assert_int_eq(pd_kv_pool_new(model, &o, &p), PD_ERR_INVALID);
    pd_kv_pool_destroy(&p); /* NULL is fine */
}
END_TEST

START_TEST(alloc_all_or_nothing_and_release)
{
    pd_kv_pool_t *p = pool_of(8, 4);
    int32_t a[8], b[8];
    ck_assert_int_eq(pd_kv_pool_alloc(p, 5, a), PD_OK);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 3);
    ck_assert_int_eq(pd_kv_pool_alloc(p, 4, b), PD_ERR_NOMEM);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 3); /* nothing taken */
    ck_assert_int_eq(pd_kv_pool_alloc(p, 3, b), PD_OK);
    int seen[8] = {0};
    for (int i = 0; i < 5; i++)
        seen[a[i]]++;
    for (int i = 0; i < 3; i++)
        seen[b[i]]++;
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(seen[i], 1); /* every block handed out once */
    pd_kv_pool_retain(p, a[0]);
    pd_kv_pool_release(p, a, 5);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 4); /* a[0] still held once */
    pd_kv_pool_release(p, a, 1);
    pd_kv_pool_release(p, b, 3);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 8);
    /* a double release is logged and ignored */
    pd_test_n_errors = 0;
    pd_kv_pool_release(p, b, 1);
    ck_assert_int_eq(pd_test_n_errors, 1);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 8);
    int32_t bad = 99;
    pd_kv_pool_release(p, &bad, 1);
    ck_assert_int_eq(pd_test_n_errors, 2);
    pd_kv_pool_destroy(&p);
}
END_TEST

START_TEST(prefix_cache_hits_and_misses)
{
    pd_kv_pool_t *p = pool_of(6, 4);
    int32_t t0[4] = {1, 2, 3, 4}, t1[4] = {5, 6, 7, 8}, other[4] = {1, 2, 3, 5};
    pd_kv_hash_t h0 = pd_kv_hash_block(p, NULL, t0);
    pd_kv_hash_t h1 = pd_kv_hash_block(p, &h0, t1);
    pd_kv_hash_t h1_root = pd_kv_hash_block(p, NULL, t1);
    ck_assert(h1.lo != h1_root.lo || h1.hi != h1_root.hi); /* the chain matters */
    int32_t blk[2];
    ck_assert_int_eq(pd_kv_pool_alloc(p, 2, blk), PD_OK);
    pd_kv_pool_commit(p, blk[0], h0, NULL, t0);
    pd_kv_pool_commit(p, blk[1], h1, &h0, t1);
    /* while held: a hit shares the block */
    ck_assert_int_eq(pd_kv_pool_lookup(p, h0, NULL, t0), blk[0]);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h1, &h0, t1), blk[1]);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 4);
    /* misses: other tokens under the same hash, another parent, no parent */
    ck_assert_int_eq(pd_kv_pool_lookup(p, h0, NULL, other), -1);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h1, &h1_root, t1), -1);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h1, NULL, t1), -1);
    pd_kv_pool_stats_t s = pd_kv_pool_stats(p);
    ck_assert_int_eq(s.lookups, 5);
    ck_assert_int_eq(s.hits, 2);
    /* released twice (two holders): cached but free, still found */
    pd_kv_pool_release(p, blk, 2);
    pd_kv_pool_release(p, blk, 2);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 6);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h0, NULL, t0), blk[0]);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 5);
    pd_kv_pool_release(p, blk, 1);
    /* a second copy of the same content is not committed over the first */
    int32_t dup;
    ck_assert_int_eq(pd_kv_pool_alloc(p, 1, &dup), PD_OK);
    pd_kv_pool_commit(p, dup, h0, NULL, t0);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h0, NULL, t0), blk[0]);
    pd_kv_pool_release(p, blk, 1);
    pd_kv_pool_release(p, &dup, 1);
    /* clearing forgets the unreferenced ones */
    pd_kv_pool_clear_cache(p);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h0, NULL, t0), -1);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 6);
    pd_kv_pool_destroy(&p);
}
END_TEST

/* Plain free blocks go first; then committed ones, least recently freed first, and
 * within one release the tail of the sequence before its head. */
START_TEST(eviction_order)
{
    pd_kv_pool_t *p = pool_of(4, 2);
    int32_t seq[3], toks[3][2] = {{1, 2}, {3, 4}, {5, 6}};
    pd_kv_hash_t h[3];
    ck_assert_int_eq(pd_kv_pool_alloc(p, 3, seq), PD_OK);
    for (int i = 0; i < 3; i++) {
        h[i] = pd_kv_hash_block(p, i ? &h[i - 1] : NULL, toks[i]);
        pd_kv_pool_commit(p, seq[i], h[i], i ? &h[i - 1] : NULL, toks[i]);
    }
    pd_kv_pool_release(p, seq, 3);
    ck_assert_int_eq(pd_kv_pool_n_free(p), 4);
    int32_t got;
    ck_assert_int_eq(pd_kv_pool_alloc(p, 1, &got), PD_OK); /* the plain block */
    ck_assert_int_ne(got, seq[0]);
    ck_assert_int_ne(got, seq[1]);
    ck_assert_int_ne(got, seq[2]);
    ck_assert_int_eq(pd_kv_pool_stats(p).evictions, 0);
    ck_assert_int_eq(pd_kv_pool_alloc(p, 1, &got), PD_OK); /* evicts the tail */
    ck_assert_int_eq(got, seq[2]);
    ck_assert_int_eq(pd_kv_pool_stats(p).evictions, 1);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h[2], &h[1], toks[2]), -1);
    ck_assert_int_eq(pd_kv_pool_lookup(p, h[0], NULL, toks[0]), seq[0]); /* head kept */
    ck_assert_int_eq(pd_kv_pool_lookup(p, h[1], &h[0], toks[1]), seq[1]);
    pd_kv_pool_destroy(&p);
}
END_TEST

/* Row pos of a sequence with block table bt, layer l, K (kv 0) or V. */
static uint8_t *row_at(pd_kv_pool_t *p, const int32_t *bt, int l, int kv, int pos)
{
    int32_t bs = pd_kv_pool_block_size(p);
    uint8_t *base = kv ? pd_kv_pool_v(p, l) : pd_kv_pool_k(p, l);
    return base + ((size_t)bt[pos / bs] * (size_t)bs + (size_t)(pos % bs)) *
                      pd_kv_pool_row_bytes(p);
}

/* PD-SUM64 is the documented sum over the covered words in their documented order:
 * the same rows in other blocks give the same sum, a flipped bit or two swapped rows
 * change it, and rows past n_tokens do not count. */
START_TEST(sum64_checksum)
{
    pd_kv_pool_t *p = pool_of(8, 4);
    const int32_t a[3] = {5, 2, 7}, b[3] = {1, 3, 0};
    const int n = 10, L = pd_kv_pool_n_layers(p);
    size_t row = pd_kv_pool_row_bytes(p), words = row / 4;
    ck_assert_uint_eq(row % 4, 0);
    uint64_t x = 88172645463325252ull; /* xorshift64: arbitrary contents */
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int pos = 0; pos < 12; pos++) { /* 12: the partial block's tail too */
                uint8_t *r = row_at(p, a, l, kv, pos);
                for (size_t i = 0; i < row; i++) {
                    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                    r[i] = (uint8_t)x;
                }
                if (pos < n)
                    memcpy(row_at(p, b, l, kv, pos), r, row);
            }
    /* the oracle: every covered word gathered in order, then summed */
    size_t total = (size_t)L * 2 * (size_t)n * words;
    uint32_t *all = malloc(total * sizeof *all);
    ck_assert_ptr_nonnull(all);
    size_t k = 0;
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int pos = 0; pos < n; pos++, k += words)
                memcpy(all + k, row_at(p, a, l, kv, pos), row);
    uint64_t want = 0;
    for (size_t i = 0; i < total; i++)
        want += pd_sum64_mix(all[i], i);
    free(all);
    uint64_t sa = pd_kv_checksum_sum64(p, a, n);
    ck_assert_uint_eq(sa, want);
    ck_assert_uint_eq(pd_kv_checksum_sum64(p, b, n), sa);
    ck_assert_uint_ne(pd_kv_checksum_sum64(p, a, n - 1), sa);

    row_at(p, a, L - 1, 1, 11)[0] ^= 0xff; /* past n_tokens: not covered */
    ck_assert_uint_eq(pd_kv_checksum_sum64(p, a, n), sa);
    row_at(p, b, 0, 1, 3)[row - 1] ^= 0x01; /* one bit of V, layer 0 */
    ck_assert_uint_ne(pd_kv_checksum_sum64(p, b, n), sa);
    row_at(p, b, 0, 1, 3)[row - 1] ^= 0x01;
    ck_assert_uint_eq(pd_kv_checksum_sum64(p, b, n), sa);
    uint8_t *tmp = malloc(row); /* two rows swapped */
    ck_assert_ptr_nonnull(tmp);
    memcpy(tmp, row_at(p, b, 1, 0, 2), row);
    memcpy(row_at(p, b, 1, 0, 2), row_at(p, b, 1, 0, 6), row);
    memcpy(row_at(p, b, 1, 0, 6), tmp, row);
    free(tmp);
    ck_assert_uint_ne(pd_kv_checksum_sum64(p, b, n), sa);
    pd_kv_pool_destroy(&p);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 30, setup, teardown);
    PD_TEST_ADD(tc, sized_from_budget, alloc_all_or_nothing_and_release,
                prefix_cache_hits_and_misses, eviction_order, sum64_checksum);
    return pd_test_run("kvpool", tc);
}
