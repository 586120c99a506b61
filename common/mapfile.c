/* mapfile.c - see mapfile.h. */
#include "common/mapfile.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

pd_status_t pd_map_file(const char *path, const char *what, size_t min_size,
                        const void **map_p, size_t *size_p)
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
        PD_LOG_ERROR("%s %s: byte 0: file too small (%lld bytes) for the header", what, path,
                     (long long)sb.st_size);
        st = PD_ERR_FORMAT;
        goto close_fd;
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
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

void pd_unmap_file(const void *map, size_t size)
{
    if (map)
        munmap((void *)map, size);
}
