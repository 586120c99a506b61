/* mapfile.h - read-only mmap of a whole regular file, for the model loaders.
 *
 * The mapping is MAP_PRIVATE and PROT_READ: the weights are views into it, so a
 * model costs page cache, not heap. The file is untrusted; callers validate its
 * contents against the returned size. Threading: any thread. */
#ifndef PD_MAPFILE_H
#define PD_MAPFILE_H

#include <stddef.h>

#include "common/status.h"

/* Maps path. what names the format in error messages ("gguf", "llama2c");
 * a file shorter than min_size is PD_ERR_FORMAT, an unreadable one PD_ERR_IO (both
 * logged). *map_p and *size_p are set only on success. */
pd_status_t pd_map_file(const char *path, const char *what, size_t min_size,
                        const void **map_p, size_t *size_p);
/* Accepts NULL. */
void pd_unmap_file(const void *map, size_t size);

#endif
