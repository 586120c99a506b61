/* pdcheck.c - the shared Check-suite support declared in pdcheck.h: log capture,
 * shared-data paths, temp files in one per-run directory, whole-file reads, the
 * suite runner.
 * Threading: single-threaded; each forked test process has its own copy of the
 * statics, and the temp directory is created and removed by the parent. */
#define _GNU_SOURCE /* nftw, mkstemps */
#include "support/pdcheck.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

/* ---- error-log capture ---- */

int pd_test_n_errors;
char pd_test_last_error[1024];

static void count_log(pd_log_level_t level, const char *file, int line, const char *msg,
                      void *user)
{
    (void)file, (void)line, (void)user;
    if (level == PD_LOG_LEVEL_ERROR) {
        pd_test_n_errors++;
        snprintf(pd_test_last_error, sizeof pd_test_last_error, "%s", msg);
    }
}

void pd_test_log_setup(void)
{
    pd_test_n_errors = 0;
    pd_test_last_error[0] = '\0';
    pd_log_set_callback(count_log, NULL);
}

/* ---- the shared test data ---- */

const char *pd_test_shared_path(const char *sub, const char *name)
{
    static char ring[8][4096];
    static unsigned next;
    const char *dir = getenv("PD_SHARED_DIR");
    ck_assert_msg(dir != NULL, "PD_SHARED_DIR is not set");
    char *p = ring[next++ % 8];
    int n = snprintf(p, sizeof ring[0], "%s/%s/%s", dir, sub, name);
    ck_assert_msg(n > 0 && (size_t)n < sizeof ring[0], "path of %s too long", name);
    return p;
}

const char *pd_test_model_path(const char *name)
{
    return pd_test_shared_path("models", name);
}

uint8_t *pd_test_read_file(const char *path, size_t *size_p)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_msg(n > 0, "%s is empty or unreadable", path);
    rewind(f);
    uint8_t *p = malloc((size_t)n);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size_p = (size_t)n;
    return p;
}

/* ---- temp files ---- */

static char temp_dir[] = "/tmp/pd_test_XXXXXX";
static int temp_dir_made;

const char *pd_test_temp_dir(void)
{
    ck_assert_msg(temp_dir_made, "no temp directory: run the suite with pd_test_run()");
    return temp_dir;
}

int pd_test_temp_fd(const char *stem, const char *sfx, char *path, size_t cap)
{
    int n = snprintf(path, cap, "%s/%sXXXXXX%s", pd_test_temp_dir(), stem, sfx);
    ck_assert_msg(n > 0 && (size_t)n < cap, "temp path too long for %zu bytes", cap);
    int fd = mkstemps(path, (int)strlen(sfx));
    ck_assert_msg(fd >= 0, "mkstemps %s failed", path);
    return fd;
}

void pd_test_temp_write(const char *stem, const char *sfx, const void *data, size_t n,
                        char *path, size_t cap)
{
    int fd = pd_test_temp_fd(stem, sfx, path, cap);
    ck_assert_int_eq(write(fd, data, n), (ssize_t)n);
    ck_assert_int_eq(close(fd), 0);
}

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

/* ---- main() ---- */

TCase *pd_test_tcase(const char *name, double timeout_s, SFun setup, SFun teardown)
{
    TCase *tc = tcase_create(name);
    if (timeout_s > 0)
        tcase_set_timeout(tc, timeout_s);
    if (setup || teardown)
        tcase_add_checked_fixture(tc, setup, teardown);
    return tc;
}

void pd_test_add_list(TCase *tc, const TTest *const *tests)
{
    for (; *tests; tests++)
        tcase_add_test(tc, *tests);
}

int pd_test_run(const char *suite_name, TCase *tc)
{
    if (!mkdtemp(temp_dir)) {
        perror("mkdtemp");
        return EXIT_FAILURE;
    }
    temp_dir_made = 1;
    Suite *s = suite_create(suite_name);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    /* children first, links not followed: a test's symlinks go, never their targets */
    nftw(temp_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
