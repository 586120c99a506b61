/* An LD_PRELOAD shim for the integration tests: every thread the program starts for
 * itself (its start routine is in the executable, not in a shared library such as
 * libzmq's or UCX's, whose threads run at once) sleeps PD_TEST_THREAD_DELAY_MS
 * milliseconds before it runs. A loaded machine can leave a new thread unscheduled for
 * that long; the shim makes the delay certain, so that a test can check what a process
 * does (or reports) before its threads have run. Only the tests load it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

struct delayed_start {
    void *(*fn)(void *);
    void *arg;
    long ms;
};

/* whether fn is in the main executable */
static int in_executable(void *(*fn)(void *))
{
    Dl_info info;
    void *addr;
    memcpy(&addr, &fn, sizeof addr);
    if (!dladdr(addr, &info) || !info.dli_fname)
        return 0;
    char exe[PATH_MAX], lib[PATH_MAX];
    if (!realpath("/proc/self/exe", exe) || !realpath(info.dli_fname, lib))
        return info.dli_fname[0] == '\0'; /* the main program may be named "" */
    return strcmp(exe, lib) == 0;
}

static void *run_delayed(void *p)
{
    struct delayed_start s = *(struct delayed_start *)p;
    free(p);
    struct timespec ts = {s.ms / 1000, (s.ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    return s.fn(s.arg);
}

int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                   void *arg)
{
    create_fn next;
    void *sym = dlsym(RTLD_NEXT, "pthread_create");
    if (!sym)
        return EAGAIN;
    memcpy(&next, &sym, sizeof next); /* object to function pointer, without a cast */
    const char *env = getenv("PD_TEST_THREAD_DELAY_MS");
    long ms = env ? strtol(env, NULL, 10) : 0;
    if (ms <= 0 || !in_executable(fn))
        return next(t, attr, fn, arg);
    struct delayed_start *s = malloc(sizeof *s);
    if (!s)
        return EAGAIN;
    *s = (struct delayed_start){fn, arg, ms};
    int rc = next(t, attr, run_delayed, s);
    if (rc != 0)
        free(s);
    return rc;
}
