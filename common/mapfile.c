/* mapfile.c - see mapfile.h. */
#include "common/mapfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

#define HUGE_PAGE ((size_t)2 << 20)

static size_t copy_len(size_t size)
{
    return (size + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
}

/* Anonymous, 2 MiB-aligned, huge-page-advised memory holding the file's bytes. */
static void *copy_file(int fd, const char *path, const char *what, size_t size)
{
    size_t len = copy_len(size);
    uint8_t *raw = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        PD_LOG_ERROR("%s %s: cannot allocate %zu bytes: %s", what, path, len,
                     strerror(errno));
        return NULL;
    }
    /* trim to a 2 MiB-aligned region of len bytes */
    size_t head = (HUGE_PAGE - (uintptr_t)raw % HUGE_PAGE) % HUGE_PAGE;
    if (head)
        munmap(raw, head);
    if (HUGE_PAGE - head)
        munmap(raw + head + len, HUGE_PAGE - head);
    uint8_t *p = raw + head;
    (void)madvise(p, len, MADV_HUGEPAGE); /* advisory: fine if THP is off */
    for (size_t off = 0; off < size;) {
        ssize_t got = pread(
            fd, p + off, size - off > (1u << 30) ? (1u << 30) : size - off, (off_t)off);
        if (got <= 0) {
            PD_LOG_ERROR("%s %s: read failed at byte %zu: %s", what, path, off,
                         got < 0 ? strerror(errno) : "unexpected end of file");
            munmap(p, len);
            return NULL;
        }
        off += (size_t)got;
    }
    mprotect(p, len, PROT_READ);
    return p;
}

pd_status_t pd_map_file(const char *path, const char *what, size_t min_size,
                        unsigned flags, const void **map_p, size_t *size_p)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        PD_LOG_ERROR("%s %s: open failed: %s", what, path, strerror(errno));
        return PD_ERR_IO;
    }
    pd_status_t st = PD_OK;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        PD_LOG_ERROR("%s %s: not a readable regular file", what, path);
        st = PD_ERR_IO;
        goto close_fd;
    }
    if ((size_t)sb.st_size < min_size || sb.st_size == 0) {
        PD_LOG_ERROR("%s %s: byte 0: file too small (%lld bytes) for the header", what,
                     path, (long long)sb.st_size);
        st = PD_ERR_FORMAT;
        goto close_fd;
    }
    void *map;
    if (flags & PD_MAP_COPY) {
        map = copy_file(fd, path, what, (size_t)sb.st_size);
        if (!map) {
            st = PD_ERR_NOMEM;
            goto close_fd;
        }
    } else if ((map = mmap(NULL, (size_t)sb.st_size, PROT_READ,
                           MAP_PRIVATE | ((flags & PD_MAP_POPULATE) ? MAP_POPULATE : 0),
                           fd, 0)) == MAP_FAILED) {
        PD_LOG_ERROR("%s %s: mmap failed: %s", what, path, strerror(errno));
        st = PD_ERR_IO;
        goto close_fd;
    }
    *map_p = map;
    *size_p = (size_t)sb.st_size;
close_fd:
    close(fd);
    return st;
}

void pd_unmap_file(const void *map, size_t size, unsigned flags)
{
    if (map)
        munmap((void *)map, (flags & PD_MAP_COPY) ? copy_len(size) : size);
}
