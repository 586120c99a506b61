/* alloc_count.h - counts every heap allocation of a test executable: malloc, calloc,
 * realloc, aligned_alloc and posix_memalign are interposed (over glibc's), or, under
 * ASan or TSan whose runtime owns malloc, counted through the sanitizer's allocator
 * hooks. Include it in exactly ONE source file of a test executable (it defines the
 * allocation functions), and call pd_test_alloc_count_install() before counting.
 * Threading: the counter is atomic. */
#ifndef PD_TEST_ALLOC_COUNT_H
#define PD_TEST_ALLOC_COUNT_H

#include <stdatomic.h>
#include <stddef.h>

static atomic_long n_allocs;

/* Under ASan or TSan the runtime owns malloc: count through its hooks instead. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PD_TEST_SANITIZER_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PD_TEST_SANITIZER_MALLOC 1
#endif
#endif

#ifdef PD_TEST_SANITIZER_MALLOC
/* from the sanitizer runtime (sanitizer/allocator_interface.h, not shipped by gcc) */
int __sanitizer_install_malloc_and_free_hooks(void (*m)(const volatile void *, size_t),
                                              void (*f)(const volatile void *));
static inline void on_malloc(const volatile void *p, size_t n)
{
    (void)p;
    (void)n;
    atomic_fetch_add(&n_allocs, 1);
}
static inline void on_free(const volatile void *p)
{
    (void)p;
}
static inline void pd_test_alloc_count_install(void)
{
    __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}
#else
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
void *malloc(size_t n)
{
    atomic_fetch_add(&n_allocs, 1);
    return __libc_malloc(n);
}
void *calloc(size_t a, size_t b)
{
    atomic_fetch_add(&n_allocs, 1);
    return __libc_calloc(a, b);
}
void *realloc(void *p, size_t n)
{
    atomic_fetch_add(&n_allocs, 1);
    return __libc_realloc(p, n);
}
void *aligned_alloc(size_t a, size_t n)
{
    atomic_fetch_add(&n_allocs, 1);
    return __libc_memalign(a, n);
}
int posix_memalign(void **p, size_t a, size_t n)
{
    atomic_fetch_add(&n_allocs, 1);
    *p = __libc_memalign(a, n);
    return *p ? 0 : 12;
}
static inline void pd_test_alloc_count_install(void) {}
#endif

/* Allocations so far. */
static inline long pd_test_allocs(void)
{
    return atomic_load(&n_allocs);
}

#endif
