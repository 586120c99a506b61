/* devxfer.h - moving KV between GPU processes without the host: CUDA IPC mappings of a
 * peer's device KV pool, device-to-device copies on a stream of their own, and the
 * device transports' KV checksum computed where the rows are.
 *
 * Design: the prefill worker exports its pool's two device allocations (K and V) as
 * CUDA IPC handles (pd_devxfer_export) and sends them in its registration; a decode
 * worker on the same node maps them once per peer (pd_devxfer_open) and copies the
 * announced blocks straight into its own device pool (pd_devxfer_copy, then
 * pd_devxfer_wait). Nothing is staged in host memory and no byte is written into
 * another process's memory: the reader copies, as over UCX (docs/protocol.md).
 * A pd_devxfer_t owns one CUDA stream on one GPU, so copies and checksums never queue
 * behind the engine's forward passes (the blocks they touch are reserved, disjoint
 * from anything the engine is computing).
 * The checksum (PD-SUM64, pd_devxfer_kv_sum64; its host reference is
 * pd_kv_checksum_sum64 in common/kvpool.h) covers the same rows as the UCX
 * transport's XXH3 checksum, but as a sum of independently mixed 32-bit words, so a
 * GPU computes it in one pass over the blocks in place.
 * Builds without CUDA: every function returns PD_ERR_UNSUPPORTED (logged).
 * Ownership: each pd_devxfer_t belongs to its caller; mappings are counted per handle
 * across the process (a handle opened twice is mapped once), and close drops one
 * count. Threading: one thread per pd_devxfer_t; the mapping table is locked. */
#ifndef PD_DEVXFER_H
#define PD_DEVXFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PD_IPC_HANDLE_BYTES 64 /* sizeof(cudaIpcMemHandle_t) */

typedef struct pd_devxfer pd_devxfer_t;

/* The GPU index a --device string names: 0 for "cuda", N for "cuda:N", -1 for "cpu",
 * NULL or anything else. */
int pd_device_index(const char *device);

/* A transfer context on GPU `device` with its own stream. PD_ERR_UNSUPPORTED without
 * CUDA, PD_ERR_IO when the GPU cannot be used (logged); *x_p is set only on success. */
pd_status_t pd_devxfer_new(int device, pd_devxfer_t **x_p);
/* Waits for its stream, closes nothing it did not open. NULL-safe; clears *x_p. */
void pd_devxfer_destroy(pd_devxfer_t **x_p);

/* The IPC handle of the device allocation that starts at base (it must be the start
 * of a cudaMalloc allocation, as a device KV pool's K and V are). */
pd_status_t pd_devxfer_export(pd_devxfer_t *x, void *base,
                              uint8_t handle[PD_IPC_HANDLE_BYTES]);
/* Maps a handle another process exported; *remote is its base in this process.
 * PD_ERR_IO when CUDA refuses (another node, a dead exporter, the exporter itself:
 * CUDA does not map a process's own handles), logged. */
pd_status_t pd_devxfer_open(pd_devxfer_t *x, const uint8_t handle[PD_IPC_HANDLE_BYTES],
                            void **remote);
/* Drops one count of the mapping at remote (unmapped at zero). NULL-safe. */
void pd_devxfer_close(pd_devxfer_t *x, void *remote);

/* Enqueues a copy of len bytes between device pointers (either may be a mapping) on
 * x's stream; done after pd_devxfer_wait. */
pd_status_t pd_devxfer_copy(pd_devxfer_t *x, void *dst, const void *src, size_t len);
/* Waits for everything enqueued on x's stream; PD_ERR_IO for any failure since the
 * last wait (logged). */
pd_status_t pd_devxfer_wait(pd_devxfer_t *x);

/* PD-SUM64 over a sequence's KV in device memory, as pd_kv_checksum_sum64 defines it:
 * k_base/v_base are layer 0 of the pool's K and V (device), layer l at
 * l * layer_bytes, block b at b * block_size * row_bytes within a layer; the sequence's
 * block table is blocks[0..ceil(n_tokens / block_size)) (host). row_bytes must be a
 * multiple of 4. Synchronous: the sum is in *sum when it returns. */
pd_status_t pd_devxfer_kv_sum64(pd_devxfer_t *x, const void *k_base, const void *v_base,
                                size_t layer_bytes, int32_t n_layers, int32_t block_size,
                                size_t row_bytes, const int32_t *blocks, int32_t n_tokens,
                                uint64_t *sum);

#ifdef __cplusplus
}
#endif

#endif
