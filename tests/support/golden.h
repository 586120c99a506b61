/* golden.h - the reference generations in $PD_SHARED_DIR/golden/<name>.jsonl (one
 * JSON object a line, fields described in golden/README.md), read with json-c.
 *
 * Design: each line is parsed whole; a line that is not a JSON object, or lacks a
 * field used here (prompt, prompt_ids, greedy_ids, run_c_stdout) or has it with the
 * wrong type, fails the test, as do an empty prompt_ids and a missing or empty file.
 * Blank lines are skipped.
 * Threading: single-threaded; call from inside a test. */
#ifndef PD_TEST_GOLDEN_H
#define PD_TEST_GOLDEN_H

#include <stddef.h>
#include <stdint.h>

typedef struct pd_test_golden {
    char *prompt; /* [prompt_len + 1], NUL-terminated */
    size_t prompt_len;
    int32_t *ids; /* [n_ids]: prompt_ids, then greedy_ids from n_prompt on */
    size_t n_prompt, n_ids;
    char *run_c_stdout; /* [stdout_len + 1], NUL-terminated */
    size_t stdout_len;
} pd_test_golden_t;

/* Every line of golden/<name>; returns how many (at least 1) and sets *lines_p to
 * an array the caller frees with pd_test_golden_free(). */
int pd_test_golden_read(const char *name, pd_test_golden_t **lines_p);
/* Frees the n lines and clears *lines_p; NULL is fine. */
void pd_test_golden_free(pd_test_golden_t **lines_p, int n);

#endif
