/* mapfile.h - read-only mmap of a whole regular file, for the model loaders.
 *
 * The mapping is MAP_PRIVATE and PROT_READ: the weights are views into it, so a
 * model costs page cache, not heap. PD_MAP_COPY instead reads the file into
 * anonymous memory aligned to 2 MiB and advised for transparent huge pages (fewer TLB
 * misses when every token streams every weight: llama.cpp's --no-mmap), then makes it
 * read-only. The file is untrusted; callers validate its
 * contents against the returned size. Threading: any thread. */
#ifndef PD_MAPFILE_H
#define PD_MAPFILE_H

#include <stddef.h>

#include "common/status.h"

#define PD_MAP_POPULATE 1u /* fault the whole file in at open (MAP_POPULATE) */
#define PD_MAP_COPY     2u /* read it into anonymous memory on transparent huge pages */

/* Maps path (flags: 0 or one PD_MAP_*). what names the format in error messages ("gguf",
 * "llama2c"); a file shorter than min_size is PD_ERR_FORMAT, an unreadable one PD_ERR_IO
 * (both logged). *map_p and *size_p are set only on success. */
pd_status_t pd_map_file(const char *path, const char *what, size_t min_size,
                        unsigned flags, const void **map_p, size_t *size_p);
/* Accepts NULL; flags as given to pd_map_file. */
void pd_unmap_file(const void *map, size_t size, unsigned flags);

#endif
