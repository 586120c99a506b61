/* pdcheck.h - what every Check suite under tests/ needs besides Check itself: a
 * capture of the errors the library logs, paths into the shared test data, temp
 * files in one directory per run, whole-file reads, and the main() of a suite.
 *
 * Design: the helpers fail the running test with a Check assertion instead of
 * returning an error, so they belong inside a test or a checked fixture; only
 * pd_test_tcase(), PD_TEST_ADD and pd_test_run() are for main(). pd_test_run()
 * creates the temp directory before Check forks the test processes, and removes it,
 * with whatever a failed test left in it, after they have all ended.
 * Threading: single-threaded. Check forks a process per test, so the error counters
 * and the path ring below are per test. */
#ifndef PD_TEST_PDCHECK_H
#define PD_TEST_PDCHECK_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

/* ---- error-log capture ---- */

/* PD_LOG_ERROR lines seen since pd_test_log_setup(), and the text of the last one.
 * Tests may reset pd_test_n_errors to 0 to count a later step alone. */
extern int pd_test_n_errors;
extern char pd_test_last_error[1024];

/* A checked fixture: zeroes the counters and sends the library's log to them
 * (errors are counted, nothing is printed). */
void pd_test_log_setup(void);

/* ---- the shared test data ---- */

/* "$PD_SHARED_DIR/<sub>/<name>". The result lives in a ring of 8 static buffers:
 * it stays valid until 8 more paths have been made. PD_SHARED_DIR unset or a path
 * too long fails the test. */
const char *pd_test_shared_path(const char *sub, const char *name);
/* pd_test_shared_path("models", name). */
const char *pd_test_model_path(const char *name);

/* The whole file, in a malloc'ed buffer the caller frees; an unreadable or empty
 * file fails the test. */
uint8_t *pd_test_read_file(const char *path, size_t *size_p);

/* ---- temp files ---- */

/* This run's temp directory (made by pd_test_run()). */
const char *pd_test_temp_dir(void);
/* Creates "<temp dir>/<stem>XXXXXX<sfx>", writes its name into path (cap bytes) and
 * returns the open descriptor (read-write), which the caller closes. */
int pd_test_temp_fd(const char *stem, const char *sfx, char *path, size_t cap);
/* A new temp file as above holding the n bytes at data, already closed. */
void pd_test_temp_write(const char *stem, const char *sfx, const void *data, size_t n,
                        char *path, size_t cap);

/* ---- main() ---- */

/* A new test case with its timeout in seconds (0 keeps Check's default,
 * CK_DEFAULT_TIMEOUT) and a checked fixture (setup and teardown may be NULL), e.g.
 * pd_test_log_setup. Add its tests with PD_TEST_ADD, then pass it to pd_test_run(). */
TCase *pd_test_tcase(const char *name, double timeout_s, SFun setup, SFun teardown);
/* Adds the tests (names given to START_TEST) to tc, in order. */
#define PD_TEST_ADD(tc, ...)                                                             \
    pd_test_add_list((tc), (const TTest *const[]){__VA_ARGS__, NULL})
void pd_test_add_list(TCase *tc, const TTest *const *tests);
/* Runs the suite suite_name made of tc (CK_NORMAL output) inside a fresh temp
 * directory, frees it all and returns EXIT_SUCCESS if every test passed, else
 * EXIT_FAILURE. */
int pd_test_run(const char *suite_name, TCase *tc);

#endif
