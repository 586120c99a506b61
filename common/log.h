/* log.h - leveled logging through a replaceable callback.
 *
 * PD_LOG_*() check the level before evaluating their arguments. Library code
 * (common/, kernels/) logs only through these macros; a program may install its
 * own sink with pd_log_set_callback(). The default sink writes one line to stderr.
 * Threading: the level and callback are set once at start-up, before other threads
 * run; logging itself is thread-safe (one write per line). */
#ifndef PD_LOG_H
#define PD_LOG_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" { /* also included by the CUDA backend (C++) */
#endif

typedef enum pd_log_level {
    PD_LOG_LEVEL_OFF = -1, /* silences everything (tests of error paths) */
    PD_LOG_LEVEL_ERROR = 0,
    PD_LOG_LEVEL_WARN = 1,
    PD_LOG_LEVEL_INFO = 2,
    PD_LOG_LEVEL_DEBUG = 3,
} pd_log_level_t;

typedef void (*pd_log_fn)(pd_log_level_t level, const char *file, int line,
                          const char *msg, void *user);

extern pd_log_level_t pd_log_level_current;

void pd_log_set_level(pd_log_level_t level);
/* NULL restores the default stderr sink. */
void pd_log_set_callback(pd_log_fn fn, void *user);
/* Parses "error", "warn", "info", "debug"; returns -1 for anything else. */
int pd_log_level_parse(const char *s);
void pd_log_write(pd_log_level_t level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define PD_LOG_AT_(lvl, ...)                                                             \
    do {                                                                                 \
        if ((lvl) <= pd_log_level_current)                                               \
            pd_log_write((lvl), __FILE__, __LINE__, __VA_ARGS__);                        \
    } while (0)
#define PD_LOG_ERROR(...) PD_LOG_AT_(PD_LOG_LEVEL_ERROR, __VA_ARGS__)
#define PD_LOG_WARN(...)  PD_LOG_AT_(PD_LOG_LEVEL_WARN, __VA_ARGS__)
#define PD_LOG_INFO(...)  PD_LOG_AT_(PD_LOG_LEVEL_INFO, __VA_ARGS__)
#define PD_LOG_DEBUG(...) PD_LOG_AT_(PD_LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Guards the program's own invariants, never input: aborts with a message. */
#define PD_ASSERT(cond)                                                                  \
    do {                                                                                 \
        if (!(cond))                                                                     \
            pd_assert_fail(#cond, __FILE__, __LINE__);                                   \
    } while (0)
void pd_assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));

#ifdef __cplusplus
}
#endif

#endif
