/* test_registry.c - the router's worker registry (router/registry.c) without its loop:
 * how long a dead worker stays listed (STATS shows it for DEAD_KEEP_MS). */
#include <check.h>
#include <stdint.h>

#include "router/registry.h"
#include "support/pdcheck.h"

static pd_worker_t *add(pd_registry_t *reg, const char *name, uint64_t now_ms)
{
    Pd__Register r = PD__REGISTER__INIT;
    r.name = (char *)name;
    r.role = PD__ROLE__DECODE;
    return pd_registry_add(reg, name, 2, &r, now_ms);
}

/* The router's tick reads the clock, marks silent workers dead with a fresh reading,
 * then prunes with the first one: a death stamped after the prune's "now" must not
 * count as long ago (the unsigned difference wrapped, and a worker that had just died
 * vanished from STATS at once). */
START_TEST(dead_worker_kept_when_clock_read_before_death)
{
    pd_registry_t *reg = NULL;
    ck_assert_int_eq(pd_registry_new(64, &reg), PD_OK);
    pd_worker_t *a = add(reg, "d1", 1000), *b = add(reg, "d2", 1000);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    pd_registry_mark_dead(reg, a, 5001);
    pd_registry_prune(reg, 5000, 60000);
    ck_assert_uint_eq(pd_registry_count(reg), 2);
    pd_registry_prune(reg, 5001 + 59999, 60000); /* not yet */
    ck_assert_uint_eq(pd_registry_count(reg), 2);
    pd_registry_prune(reg, 5001 + 60000, 60000); /* now it goes; the alive one stays */
    ck_assert_uint_eq(pd_registry_count(reg), 1);
    ck_assert_ptr_eq(pd_registry_at(reg, 0), b);
    pd_registry_destroy(&reg);
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 30, NULL, NULL);
    PD_TEST_ADD(tc, dead_worker_kept_when_clock_read_before_death);
    return pd_test_run("registry", tc);
}
