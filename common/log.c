/* log.c - the default stderr sink and the level/callback switches of log.h. */
#include "common/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

pd_log_level_t pd_log_level_current = PD_LOG_LEVEL_WARN;
static pd_log_fn log_fn;
static void *log_user;

void pd_log_set_level(pd_log_level_t level)
{
    pd_log_level_current = level;
}

void pd_log_set_callback(pd_log_fn fn, void *user)
{
    log_fn = fn;
    log_user = user;
}

int pd_log_level_parse(const char *s)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (s && strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

void pd_log_write(pd_log_level_t level, const char *file, int line, const char *fmt, ...)
{
    static const char *const tags[] = {"error", "warn", "info", "debug"};
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (log_fn) {
        log_fn(level, file, line, msg, log_user);
        return;
    }
    const char *base = strrchr(file, '/');
    fprintf(stderr, "pdserve %s: %s (%s:%d)\n", tags[level & 3], msg,
            base ? base + 1 : file, line);
}

void pd_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "pdserve: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}
