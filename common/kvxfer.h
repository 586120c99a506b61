/* kvxfer.h - the KV transfer layer: one-sided UCX reads (gets) of a remote worker's
 * registered memory into local memory, as the decode worker pulls a prefill worker's
 * KV blocks (docs/protocol.md, "Why the decode worker pulls").
 *
 * Design: a pd_ucx_t is a UCP context with one worker (RMA and wake-up features).
 * Memory that peers may read is registered as a pd_ucx_region_t, whose packed rkey
 * travels to the reader with the worker's address (pd_ucx_address); the reader builds
 * a pd_ucx_peer_t from them (one endpoint plus the unpacked rkeys of the remote's
 * regions, their base addresses and lengths) and reads with pd_ucx_get. Addresses
 * and rkeys travel wrapped in a small frame (magic, length, 64-bit checksum), so
 * truncated or corrupt bytes from the control channel are refused with
 * PD_ERR_FORMAT before UCX parses them. Remote addresses are uint64.
 * Endpoints use UCP_ERR_HANDLING_MODE_PEER: a dead peer fails its gets (and marks the
 * peer failed), it never aborts the process. pd_ucx_peer_destroy force-closes the
 * endpoint, which completes every pending get (with an error) before it returns, so
 * no byte from that peer lands in local memory afterwards: the caller may reuse the
 * destination buffers at once.
 * Ownership: each object belongs to the caller that made it; regions and peers live
 * inside their pd_ucx_t and must be destroyed before it (pd_ucx_destroy destroys the
 * ones left, with a warning, and the caller's pointers to them dangle).
 * Threading: one thread owns a pd_ucx_t and everything made from it (the worker is
 * UCS_THREAD_MODE_SINGLE). Completion callbacks run on that thread, inside
 * pd_ucx_progress, pd_ucx_get or pd_ucx_peer_destroy; a callback may start new gets
 * but must not call pd_ucx_progress, pd_ucx_peer_destroy or pd_ucx_destroy. */
#ifndef PD_KVXFER_H
#define PD_KVXFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct pd_ucx pd_ucx_t;
typedef struct pd_ucx_region pd_ucx_region_t;
typedef struct pd_ucx_peer pd_ucx_peer_t;

/* The completion of one get: PD_OK when the bytes are in place; PD_ERR_IO when the
 * peer failed or the get was cancelled by pd_ucx_peer_destroy (the destination then
 * holds unspecified bytes). */
typedef void (*pd_ucx_done_fn)(void *user, pd_status_t st);

/* A context and its worker, configured from the UCX_* environment (ucp_config_read).
 * PD_ERR_IO with the UCX reason when UCX cannot start; *u_p is set only on success. */
pd_status_t pd_ucx_new(pd_ucx_t **u_p);
/* Destroys peers and regions still alive (logs a warning), then the worker and the
 * context. Accepts NULL and *u_p == NULL; clears *u_p. */
void pd_ucx_destroy(pd_ucx_t **u_p);

/* The worker's event fd (ucp_worker_get_efd), owned by the pd_ucx_t; -1 on error
 * (logged). Level of readiness: poll it for reading after pd_ucx_arm returned true. */
int pd_ucx_fd(pd_ucx_t *u);
/* Arms the fd. true: nothing pending, safe to sleep on the fd; false: events are
 * pending (or arming failed, logged), call pd_ucx_progress again first. */
bool pd_ucx_arm(pd_ucx_t *u);
/* Progresses the worker once; returns the number of events it processed (0: idle).
 * Completion callbacks run from here. */
unsigned pd_ucx_progress(pd_ucx_t *u);

/* The framed worker address to send to readers: *addr (owned by u, valid until
 * pd_ucx_destroy) and its *len bytes. */
pd_status_t pd_ucx_address(pd_ucx_t *u, const void **addr, size_t *len);

/* Registers [base, base + len) (ucp_mem_map, no allocation) for remote reads and as a
 * zero-copy get destination, and packs its rkey. The memory stays the caller's and
 * must outlive the region. PD_ERR_INVALID for NULL/empty, PD_ERR_IO when UCX refuses
 * (logged); *r_p is set only on success. */
pd_status_t pd_ucx_region_new(pd_ucx_t *u, void *base, size_t len, pd_ucx_region_t **r_p);
/* The framed packed rkey (owned by r) and its *len bytes. */
const void *pd_ucx_region_rkey(const pd_ucx_region_t *r, size_t *len);
/* The base address and length registered. */
void *pd_ucx_region_base(const pd_ucx_region_t *r);
size_t pd_ucx_region_len(const pd_ucx_region_t *r);
/* Unregisters. Peers that still read it get errors (or stale bytes) from then on.
 * Accepts NULL and *r_p == NULL; clears *r_p. */
void pd_ucx_region_destroy(pd_ucx_region_t **r_p);

/* An endpoint to the worker whose framed address is addr[0..addr_len), with the
 * remote's n_regions regions: framed rkeys[i] of rkey_lens[i] bytes (from
 * pd_ucx_region_rkey), registered at remote address bases[i] for lens[i] bytes. The
 * arrays are copied. PD_ERR_FORMAT for a malformed address or rkey, PD_ERR_INVALID for
 * bad counts or lengths, PD_ERR_IO when UCX refuses (all logged); *p_p is set only
 * on success. */
pd_status_t pd_ucx_peer_new(pd_ucx_t *u, const void *addr, size_t addr_len, int n_regions,
                            const void *const *rkeys, const size_t *rkey_lens,
                            const uint64_t *bases, const uint64_t *lens,
                            pd_ucx_peer_t **p_p);
/* Force-closes the endpoint (UCP_EP_CLOSE_FLAG_FORCE): every get still pending on it
 * completes (its done runs with PD_ERR_IO) before this returns; after it no byte lands
 * in local memory from this peer. Accepts NULL and *p_p == NULL; clears *p_p. */
void pd_ucx_peer_destroy(pd_ucx_peer_t **p_p);
/* true once UCX reported the endpoint failed (the peer died or the link broke); gets
 * started after that are refused with PD_ERR_IO. */
bool pd_ucx_peer_failed(const pd_ucx_peer_t *p);
/* Gets started and not yet completed. */
int64_t pd_ucx_peer_pending(const pd_ucx_peer_t *p);

/* One-sided read of len bytes at remote address bases[region] + off into local.
 * local_region, when given, must contain [local, local + len) (zero copy with its
 * memory handle); NULL reads into any memory. done(user, status) runs exactly once,
 * from pd_ucx_progress, from pd_ucx_peer_destroy, or before this returns when the get
 * completes at once. Returns an error, and done is not called, only when the get
 * could not be started: PD_ERR_RANGE for a bad region index or a range past the
 * remote region (or outside local_region), PD_ERR_INVALID for len 0 or NULL
 * pointers, PD_ERR_IO for a failed peer or a UCX error (all logged). */
pd_status_t pd_ucx_get(pd_ucx_peer_t *p, int region, uint64_t off, void *local,
                       size_t len, const pd_ucx_region_t *local_region,
                       pd_ucx_done_fn done, void *user);

#endif
