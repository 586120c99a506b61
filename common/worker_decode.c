/* worker_decode.c - the decode side of a worker: blocks reserved for a task, the
 * prompt's KV read from the prefill worker (UCX gets or CUDA IPC copies, coalesced per
 * run of blocks) or copied from KV_DATA, checked against KV_DONE's checksum, the
 * request admitted, and its tokens sent back in TOKEN_CHUNKs. See worker_impl.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"
#include "common/worker_impl.h"

/* ---- I/O thread: the decode side ----------------------------------------- */

void wk_peer_free_desc(worker_t *w, peer_t *pe)
{
    for (int kv = 0; kv < 2; kv++) {
        pd_devxfer_close(w->xfer, pe->dev[kv]);
        pe->dev[kv] = NULL;
    }
    pe->ipc = false;
    free(pe->addr);
    free(pe->rkey[0]);
    free(pe->rkey[1]);
    pe->addr = pe->rkey[0] = pe->rkey[1] = NULL;
}

static uint8_t *dup_bytes(const ProtobufCBinaryData *b)
{
    uint8_t *d = malloc(b->len ? b->len : 1);
    if (d && b->len)
        memcpy(d, b->data, b->len);
    return d;
}

dtask_t *wk_dtask_find(worker_t *w, uint64_t task)
{
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->task == task)
            return t;
    return NULL;
}

void wk_dtask_free(dtask_t *t)
{
    free(t->prompt);
    free(t->stop);
    free(t->blocks);
    free(t->src);
    free(t->ready);
    free(t->pulled);
    free(t->out);
    free(t);
}

static void dtask_unlink(worker_t *w, dtask_t *t)
{
    for (dtask_t **p = &w->dtasks; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            return;
        }
}

/* Force-closes a peer: every read from it completes (failed) now. */
void wk_peer_close(worker_t *w, peer_t *pe)
{
    (void)w;
    if (pe && pe->p)
        pd_ucx_peer_destroy(&pe->p);
}

/* Ends a decode task that is not running in the engine: its reads are stopped (the
 * peer is closed if any is in flight, so no byte lands later), then its blocks go back.
 */
void wk_dtask_abandon(worker_t *w, dtask_t *t)
{
    if (t->outstanding > 0)
        wk_peer_close(w, t->peer); /* runs the callbacks: outstanding becomes 0 */
    dtask_unlink(w, t);
    if (t->state == D_RUNNING || t->local) {
        wk_cmd_cancel(w, t->task);
    } else if (t->state == D_RESERVING) {
        wk_cmd_cancel(
            w, t->task); /* the reservation may still be granted: see on_reserved */
    } else {
        wk_cmd_release(w, t->blocks, t->n_blocks);
        t->blocks = NULL;
    }
    wk_dtask_free(t);
}

static void get_done(void *user, pd_status_t st)
{
    dtask_t *t = user;
    t->outstanding--;
    if (st != PD_OK)
        t->get_failed = true;
}

/* The peer entry of prefill worker wid, made if there is none. */
static peer_t *peer_entry(worker_t *w, uint64_t wid)
{
    uint64_t now = pd_rpc_mono_ms();
    for (peer_t *pe = w->peers; pe; pe = pe->next)
        if (pe->wid == wid) {
            pe->used_ms = now;
            return pe;
        }
    peer_t *pe = calloc(1, sizeof *pe);
    if (!pe)
        return NULL;
    pe->wid = wid;
    pe->used_ms = now;
    pe->next = w->peers;
    w->peers = pe;
    return pe;
}

/* Closes the peers no task has held for --kv-peer-idle-ms: their UCX endpoints, and
 * their CUDA IPC mappings, which would otherwise keep a prefill worker's whole device
 * pool allocated after that worker is gone (it comes back under a new worker id).
 * A peer still in use is only marked used now; the next task of a closed peer's worker
 * makes a new one (connecting or mapping again). */
void wk_peers_prune(worker_t *w, uint64_t now_ms)
{
    if (w->o.peer_idle_ms <= 0)
        return;
    for (dtask_t *t = w->dtasks; t; t = t->next)
        if (t->peer)
            t->peer->used_ms = now_ms;
    for (peer_t **pp = &w->peers; *pp;) {
        peer_t *pe = *pp;
        if (now_ms - pe->used_ms < (uint64_t)w->o.peer_idle_ms) {
            pp = &pe->next;
            continue;
        }
        PD_LOG_INFO(
            "worker: closed the peer of prefill worker %llx (%s), unused for %d ms",
            (unsigned long long)pe->wid, pe->ipc ? "cuda-ipc" : "ucx", w->o.peer_idle_ms);
        *pp = pe->next;
        if (pe->p)
            pd_ucx_peer_destroy(&pe->p);
        wk_peer_free_desc(w, pe);
        free(pe);
    }
}

/* The CUDA IPC peer of prefill worker wid, described by src: its two handles, mapped
 * when the first read is due. A changed description replaces the old one. The peer's
 * pool may hold another number of blocks than this one: its layer stride is its own
 * length over the layers (as over UCX), and every copy is checked against it. */
static peer_t *peer_get_ipc(worker_t *w, uint64_t wid, const Pd__DeviceSource *src)
{
    size_t bb = w->row_bytes * (size_t)w->bs;
    if (!src || src->ipc_k.len != PD_IPC_HANDLE_BYTES ||
        src->ipc_v.len != PD_IPC_HANDLE_BYTES || src->len_k != src->len_v ||
        !src->len_k || src->len_k % (uint64_t)w->n_layers ||
        (src->len_k / (uint64_t)w->n_layers) % bb || !src->node ||
        strcmp(src->node, w->node))
        return NULL; /* the router checked the node; whole blocks of whole layers */
    peer_t *pe = peer_entry(w, wid);
    if (!pe)
        return NULL;
    if (pe->ipc && !memcmp(pe->handle[0], src->ipc_k.data, PD_IPC_HANDLE_BYTES) &&
        !memcmp(pe->handle[1], src->ipc_v.data, PD_IPC_HANDLE_BYTES))
        return pe;
    wk_peer_free_desc(w, pe);
    memcpy(pe->handle[0], src->ipc_k.data, PD_IPC_HANDLE_BYTES);
    memcpy(pe->handle[1], src->ipc_v.data, PD_IPC_HANDLE_BYTES);
    pe->ipc = true;
    pe->len[0] = pe->len[1] = src->len_k;
    pe->layer_bytes = (size_t)(src->len_k / (uint64_t)w->n_layers);
    return pe;
}

/* The peer entry of prefill worker wid, described by src (a changed description, as
 * after the worker registered again, replaces the old one and its endpoint). */
static peer_t *peer_get(worker_t *w, uint64_t wid, const Pd__UcxSource *src)
{
    if (!src || !src->worker_address.len || !src->rkey_k.len || !src->rkey_v.len ||
        !src->len_k)
        return NULL;
    peer_t *pe = peer_entry(w, wid);
    if (!pe)
        return NULL;
    if (pe->addr && pe->addr_len == src->worker_address.len &&
        !memcmp(pe->addr, src->worker_address.data, pe->addr_len) &&
        pe->base[0] == src->base_k && pe->base[1] == src->base_v)
        return pe;
    if (pe->p)
        pd_ucx_peer_destroy(&pe->p);
    wk_peer_free_desc(w, pe);
    pe->addr = dup_bytes(&src->worker_address);
    pe->rkey[0] = dup_bytes(&src->rkey_k);
    pe->rkey[1] = dup_bytes(&src->rkey_v);
    if (!pe->addr || !pe->rkey[0] || !pe->rkey[1]) {
        wk_peer_free_desc(w, pe);
        return NULL;
    }
    pe->addr_len = src->worker_address.len;
    pe->rkey_len[0] = src->rkey_k.len;
    pe->rkey_len[1] = src->rkey_v.len;
    pe->base[0] = src->base_k;
    pe->base[1] = src->base_v;
    pe->len[0] = src->len_k;
    pe->len[1] = src->len_v;
    pe->layer_bytes = (size_t)(src->len_k / (uint64_t)w->n_layers);
    return pe;
}

/* The endpoint, made now if there is none (or the old one failed). */
static bool peer_connect(worker_t *w, peer_t *pe)
{
    if (pe->p && !pd_ucx_peer_failed(pe->p))
        return true;
    if (pe->p)
        pd_ucx_peer_destroy(&pe->p);
    if (!pe->addr)
        return false;
    const void *rk[2] = {pe->rkey[0], pe->rkey[1]};
    return pd_ucx_peer_new(w->ucx, pe->addr, pe->addr_len, 2, rk, pe->rkey_len, pe->base,
                           pe->len, &pe->p) == PD_OK;
}

/* CUDA IPC: maps the peer's pool (once). */
static bool peer_map(worker_t *w, peer_t *pe)
{
    for (int kv = 0; kv < 2; kv++)
        if (!pe->dev[kv] &&
            pd_devxfer_open(w->xfer, pe->handle[kv], (void **)&pe->dev[kv]) != PD_OK)
            return false;
    return true;
}

/* CUDA IPC: one run of blocks of one layer, K and V, copied from the peer's GPU memory
 * into this pool's (whose blocks are reserved: the engine does not touch them). */
static bool ipc_copy(worker_t *w, dtask_t *t, int32_t l, int32_t b, int32_t e, size_t bb)
{
    size_t len = (size_t)(e - b) * bb;
    if (t->src[b] < 0 || (uint64_t)t->src[b] * bb + len > t->peer->layer_bytes)
        return false; /* the run must lie inside one layer of the peer's pool */
    uint64_t roff = (uint64_t)l * t->peer->layer_bytes + (uint64_t)t->src[b] * bb;
    for (int kv = 0; kv < 2; kv++) {
        uint8_t *dst = (uint8_t *)(kv ? pd_kv_pool_compute_v(w->kv, l)
                                      : pd_kv_pool_compute_k(w->kv, l)) +
                       (size_t)t->blocks[b] * bb;
        if (pd_devxfer_copy(w->xfer, dst, t->peer->dev[kv] + roff, len) != PD_OK)
            return false;
    }
    return true;
}

/* Reads what has been announced and not read yet: per layer, whole blocks (the last,
 * partial one once the prompt is complete), runs of consecutive block ids on both
 * sides coalesced into one get (UCX) or copy (CUDA IPC) per K and V. The IPC copies
 * of one call are waited for before it returns: GPU to GPU they take microseconds. */
static void dtask_pull(worker_t *w, dtask_t *t)
{
    if (t->state != D_PULLING || !t->peer || t->get_failed)
        return;
    bool due = t->done_rcvd;
    for (int32_t l = 0; l < w->n_layers && !due; l++)
        due = t->ready[l] > t->pulled[l];
    if (!due)
        return;
    bool ipc = t->peer->ipc;
    if (ipc ? !peer_map(w, t->peer) : !peer_connect(w, t->peer)) {
        PD_LOG_ERROR("worker: task %llu: cannot reach prefill worker %llu over %s",
                     (unsigned long long)t->task, (unsigned long long)t->prefill_wid,
                     ipc ? "CUDA IPC" : "UCX");
        t->get_failed = true;
        return;
    }
    size_t bb = w->row_bytes * (size_t)w->bs;
    for (int32_t l = 0; l < w->n_layers; l++) {
        int32_t avail = t->done_rcvd ? t->n_prompt : t->ready[l];
        int32_t target = avail >= t->n_prompt ? t->n_prompt : avail / w->bs * w->bs;
        if (target <= t->pulled[l])
            continue;
        int32_t b0 = t->pulled[l] / w->bs, b1 = (target + w->bs - 1) / w->bs;
        if (b1 > t->n_src || b1 > t->n_blocks) {
            t->get_failed = true; /* the announcement does not match the prompt */
            PD_LOG_ERROR("worker: task %llu: layer %d needs %d blocks, but the prefill "
                         "worker announced %d and %d are reserved",
                         (unsigned long long)t->task, (int)l, (int)b1, t->n_src,
                         t->n_blocks);
            return;
        }
        for (int32_t b = b0; b < b1;) {
            int32_t e = b + 1;
            while (e < b1 && t->src[e] == t->src[e - 1] + 1 &&
                   t->blocks[e] == t->blocks[e - 1] + 1)
                e++;
            size_t len = (size_t)(e - b) * bb;
            if (!t->t_first_get)
                t->t_first_get = now_s();
            if (ipc) {
                if (!ipc_copy(w, t, l, b, e, bb)) {
                    PD_LOG_ERROR("worker: task %llu: a CUDA IPC copy failed",
                                 (unsigned long long)t->task);
                    t->get_failed = true;
                    break;
                }
                t->bytes_read += 2 * (int64_t)len;
                w->kv_bytes += 2 * (int64_t)len;
                b = e;
                continue;
            }
            for (int kv = 0; kv < 2; kv++) {
                uint64_t roff =
                    (uint64_t)l * t->peer->layer_bytes + (uint64_t)t->src[b] * bb;
                uint8_t *dst =
                    (uint8_t *)(kv ? pd_kv_pool_v(w->kv, l) : pd_kv_pool_k(w->kv, l)) +
                    (size_t)t->blocks[b] * bb;
                t->outstanding++;
                t->bytes_read += (int64_t)len;
                pd_status_t st = pd_ucx_get(t->peer->p, kv, roff, dst, len,
                                            kv ? w->reg_v : w->reg_k, get_done, t);
                if (st != PD_OK) {
                    t->outstanding--;
                    t->get_failed = true;
                    return;
                }
                w->kv_bytes += (int64_t)len;
            }
            b = e;
        }
        if (t->get_failed)
            break;
        t->pulled[l] = target;
    }
    if (ipc && pd_devxfer_wait(w->xfer) != PD_OK)
        t->get_failed = true;
}

static void chunk_push(dtask_t *t, int32_t tok, uint32_t index, const uint64_t *rng)
{
    if (t->n_out == 0)
        t->out_index = index;
    if (t->n_out == t->cap_out) {
        int32_t cap = t->cap_out ? 2 * t->cap_out : 16;
        int32_t *o = realloc(t->out, (size_t)cap * sizeof *o);
        if (!o)
            return; /* dropped: the router re-runs on a gap? no: logged */
        t->out = o;
        t->cap_out = cap;
    }
    t->out[t->n_out++] = tok;
    if (rng) {
        memcpy(t->out_rng, rng, sizeof t->out_rng);
        t->has_out_rng = true;
    }
}

void wk_chunk_flush(worker_t *w, dtask_t *t)
{
    if (!t->n_out && !t->finish)
        return;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__TOKEN_CHUNK, t->task);
    Pd__TokenChunk c = PD__TOKEN_CHUNK__INIT;
    c.index = t->n_out ? t->out_index : (uint32_t)t->first_index;
    c.n_ids = (size_t)t->n_out;
    c.ids = t->out;
    c.finish_reason = (char *)(t->finish ? t->finish : "");
    if (t->has_out_rng) {
        c.n_rng_state = 4;
        c.rng_state = t->out_rng;
    }
    c.cached_tokens = (uint32_t)t->cached;
    if (t->finish) {
        c.spec_proposed = (uint64_t)t->spec_proposed;
        c.spec_accepted = (uint64_t)t->spec_accepted;
    }
    env.token_chunk = &c;
    wk_send_env(w, &env, NULL, 0);
    t->n_out = 0;
}

/* All KV read and KV_DONE in: check, release the source, admit. True when the task
 * left the PULLING state (admitted, or failed and gone). */
bool wk_dtask_check(worker_t *w, dtask_t *t)
{
    if (t->state != D_PULLING || t->outstanding > 0)
        return false;
    Pd__Envelope env;
    Pd__KvRelease rel = PD__KV_RELEASE__INIT;
    if (t->get_failed) {
        pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
        env.kv_release = &rel;
        wk_send_env(w, &env, NULL, 0);
        wk_send_failed(w, t->task, PD__ERROR_CODE__INTERNAL, "reading the KV failed");
        wk_dtask_abandon(w, t);
        return true;
    }
    if (!t->done_rcvd)
        return false;
    for (int32_t l = 0; l < w->n_layers; l++)
        if (t->pulled[l] < t->n_prompt)
            return false;
    double t_read = now_s();
    uint64_t sum = 0;
    if (t->peer && t->peer->ipc) {
        if (pd_devxfer_kv_sum64(w->xfer, pd_kv_pool_compute_k(w->kv, 0),
                                pd_kv_pool_compute_v(w->kv, 0), w->layer_bytes,
                                w->n_layers, w->bs, w->row_bytes, t->blocks, t->n_prompt,
                                &sum) != PD_OK)
            sum = ~t->checksum; /* logged; fails the check below */
    } else {
        sum = pd_kv_checksum(w->kv, t->blocks, t->n_prompt);
    }
    if (t->bytes_read > 0 && t_read > t->t_first_get)
        PD_LOG_INFO("worker: task %llu: KV of %d tokens, %lld bytes read in %.3f ms "
                    "(%.3f GB/s), the last %.3f ms after KV_DONE",
                    (unsigned long long)t->task, t->n_prompt, (long long)t->bytes_read,
                    (t_read - t->t_first_get) * 1e3,
                    (double)t->bytes_read / (t_read - t->t_first_get) * 1e-9,
                    (t_read - t->t_kv_done) * 1e3);
    rel.ok = sum == t->checksum;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_RELEASE, t->task);
    env.kv_release = &rel;
    wk_send_env(w, &env, NULL, 0);
    if (!rel.ok) {
        PD_LOG_ERROR("worker: task %llu: KV checksum %016llx, the prefill worker sent "
                     "%016llx",
                     (unsigned long long)t->task, (unsigned long long)sum,
                     (unsigned long long)t->checksum);
        wk_send_failed(w, t->task, PD__ERROR_CODE__CHECKSUM_MISMATCH,
                       "KV checksum mismatch");
        wk_dtask_abandon(w, t);
        return true;
    }
    msg_t *c = wk_new_msg(CMD_ADMIT, t->task);
    if (!c) {
        wk_send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        wk_dtask_abandon(w, t);
        return true;
    }
    c->ids = t->prompt;
    c->n_ids = t->n_prompt;
    t->prompt = NULL;
    c->blocks = t->blocks;
    c->n_blocks = t->n_blocks;
    t->blocks = NULL;
    c->stop = t->stop;
    c->n_stop = t->n_stop;
    t->stop = NULL;
    c->sp = t->sp;
    c->max_tokens = t->max_tokens;
    c->spec_k = t->spec_k;
    c->ignore_eos = t->ignore_eos;
    c->first_index = t->first_index;
    c->a = t->first_token;
    memcpy(c->rng, t->rng, sizeof c->rng);
    c->has_rng = true;
    t->state = D_RUNNING;
    chunk_push(t, t->first_token, (uint32_t)t->first_index, t->rng);
    wk_send_cmd(w, c);
    return true;
}

/* A decode task from its DECODE_TASK (NULL: out of memory, already answered). */
static dtask_t *dtask_new(worker_t *w, const Pd__Envelope *env)
{
    const Pd__DecodeTask *dt = env->decode_task;
    dtask_t *t = calloc(1, sizeof *t);
    if (!t) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return NULL;
    }
    t->task = env->request_id;
    t->local = dt->local_prefill;
    t->n_prompt = (int32_t)dt->n_ids;
    t->prompt = wk_dup_ids(dt->ids, t->n_prompt);
    t->n_stop = (int32_t)dt->n_stop_ids;
    t->stop = wk_dup_ids(dt->stop_ids, t->n_stop);
    t->ready = calloc((size_t)w->n_layers, sizeof *t->ready);
    t->pulled = calloc((size_t)w->n_layers, sizeof *t->pulled);
    t->sp = pd_sampler_params_default();
    if (dt->sampling) {
        t->sp.temperature = dt->sampling->temperature;
        t->sp.top_p = dt->sampling->top_p > 0 ? dt->sampling->top_p : 1.0f;
        t->sp.top_k = dt->sampling->top_k;
        t->sp.min_p = dt->sampling->min_p;
        t->sp.seed = dt->sampling->seed;
    }
    t->max_tokens = dt->max_tokens;
    t->spec_k = dt->spec_k;
    t->ignore_eos = dt->ignore_eos;
    t->first_index = (int32_t)dt->first_index;
    t->prefill_wid = dt->prefill_worker_id;
    t->lease_until = pd_rpc_mono_ms() + (dt->lease_ms ? dt->lease_ms : 10000);
    if (!t->prompt || (t->n_stop && !t->stop) || !t->ready || !t->pulled) {
        wk_dtask_free(t);
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return NULL;
    }
    return t;
}

/* Local prefill: the whole request runs in this worker's engine. */
static void start_local(worker_t *w, dtask_t *t, const Pd__DecodeTask *dt)
{
    msg_t *c = wk_new_msg(CMD_DECODE, t->task);
    if (!c) {
        wk_send_failed(w, t->task, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        wk_dtask_free(t);
        return;
    }
    c->ids = wk_dup_ids(t->prompt, t->n_prompt);
    c->n_ids = t->n_prompt;
    c->stop = wk_dup_ids(t->stop, t->n_stop);
    c->n_stop = t->n_stop;
    c->sp = t->sp;
    c->max_tokens = t->max_tokens;
    c->spec_k = t->spec_k;
    c->ignore_eos = t->ignore_eos;
    c->first_index = t->first_index;
    if (dt->n_rng_state == 4) {
        memcpy(c->rng, dt->rng_state, sizeof c->rng);
        c->has_rng = true;
    }
    t->state = D_RUNNING;
    t->next = w->dtasks;
    w->dtasks = t;
    wk_send_cmd(w, c);
}

void wk_on_decode_task(worker_t *w, const Pd__Envelope *env)
{
    const Pd__DecodeTask *dt = env->decode_task;
    if (w->draining) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                       "worker draining");
        return;
    }
    if (wk_dtask_find(w, env->request_id)) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__DUPLICATE,
                       "task already here");
        return;
    }
    if (dt->n_ids < 1 || dt->n_ids > MAX_PROMPT_WIRE ||
        (dt->n_rng_state != 0 && dt->n_rng_state != 4)) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__INVALID_ARGUMENT,
                       "a decode task needs 1.. prompt ids and 0 or 4 rng words");
        return;
    }
    if (dt->local_prefill && !w->o.local_prefill) {
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                       "this decode worker does not prefill (--local-prefill)");
        return;
    }
    dtask_t *t = dtask_new(w, env);
    if (!t)
        return;
    if (t->local) {
        start_local(w, t, dt);
        return;
    }
    if (w->o.transport == PD__KV_TRANSPORT__UCX) {
        t->peer = peer_get(w, t->prefill_wid, dt->source);
        if (!t->peer) {
            wk_dtask_free(t);
            wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                           "the task names no UCX address for its prefill worker");
            return;
        }
    } else if (w->o.transport == PD__KV_TRANSPORT__CUDA_IPC) {
        t->peer = peer_get_ipc(w, t->prefill_wid, dt->device_source);
        if (!t->peer) {
            wk_dtask_free(t);
            wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE,
                           "the task names no CUDA IPC pool of this node and this KV "
                           "layout for its prefill worker");
            return;
        }
    }
    msg_t *c = wk_new_msg(CMD_RESERVE, t->task);
    if (!c) {
        wk_dtask_free(t);
        wk_send_failed(w, env->request_id, PD__ERROR_CODE__UNAVAILABLE, "out of memory");
        return;
    }
    c->a = (t->n_prompt + w->bs - 1) / w->bs;
    t->state = D_RESERVING;
    t->next = w->dtasks;
    w->dtasks = t;
    wk_send_cmd(w, c);
}

void wk_on_ev_reserved(worker_t *w, msg_t *m)
{
    dtask_t *t = wk_dtask_find(w, m->task);
    if (!t || t->state != D_RESERVING) { /* abandoned meanwhile */
        wk_cmd_release(w, m->blocks, m->n_blocks);
        m->blocks = NULL;
        return;
    }
    t->blocks = m->blocks;
    t->n_blocks = m->n_blocks;
    m->blocks = NULL;
    t->state = D_PULLING;
    Pd__Envelope env;
    pd_rpc_envelope_init(&env, PD__METHOD__KV_TARGET, t->task);
    Pd__KvTarget kt = PD__KV_TARGET__INIT;
    kt.n_blocks = (uint32_t)t->n_blocks;
    kt.lease_until_ms = pd_rpc_realtime_ms() + (t->lease_until - pd_rpc_mono_ms());
    env.kv_target = &kt;
    wk_send_env(w, &env, NULL, 0);
    dtask_pull(w, t);
    wk_dtask_check(w, t);
}

static bool take_src(dtask_t *t, const int32_t *src, size_t n)
{
    if (n == 0)
        return true;
    if (n > (size_t)t->n_prompt)
        return false;
    if ((int32_t)n > t->n_src) {
        int32_t *s = realloc(t->src, n * sizeof *s);
        if (!s)
            return false;
        t->src = s;
    }
    memcpy(t->src, src, n * sizeof *src);
    t->n_src = (int32_t)n;
    return true;
}

void wk_on_kv_ready(worker_t *w, const Pd__Envelope *env)
{
    dtask_t *t = wk_dtask_find(w, env->request_id);
    const Pd__KvReady *r = env->kv_ready;
    if (!t || t->local || t->state == D_RUNNING)
        return;
    if (!take_src(t, r->src_blocks, r->n_src_blocks) ||
        r->n_tokens > (uint32_t)t->n_prompt || r->layers_done > (uint32_t)w->n_layers) {
        t->get_failed = true;
    } else {
        for (uint32_t l = 0; l < r->layers_done; l++)
            if ((int32_t)r->n_tokens > t->ready[l])
                t->ready[l] = (int32_t)r->n_tokens;
    }
    dtask_pull(w, t);
    wk_dtask_check(w, t);
}

void wk_on_kv_done(worker_t *w, const Pd__Envelope *env)
{
    dtask_t *t = wk_dtask_find(w, env->request_id);
    const Pd__KvDone *d = env->kv_done;
    if (!t || t->local || t->state == D_RUNNING)
        return;
    if (d->n_tokens != (uint32_t)t->n_prompt || d->n_rng_state != 4 ||
        d->first_token < 0 || d->first_token >= w->vocab ||
        (w->o.transport != PD__KV_TRANSPORT__ZMQ &&
         (d->n_src_blocks != (size_t)(t->n_prompt + w->bs - 1) / (size_t)w->bs ||
          !take_src(t, d->src_blocks, d->n_src_blocks)))) {
        PD_LOG_ERROR("worker: task %llu: a malformed KV_DONE",
                     (unsigned long long)t->task);
        t->get_failed = true;
    } else {
        t->done_rcvd = true;
        t->t_kv_done = now_s();
        t->first_token = d->first_token;
        t->checksum = d->checksum;
        t->cached = (int32_t)d->cached_tokens;
        memcpy(t->rng, d->rng_state, sizeof t->rng);
    }
    dtask_pull(w, t);
    wk_dtask_check(w, t);
}

void wk_on_kv_data(worker_t *w, const pd_rpc_msg_t *msg)
{
    const Pd__Envelope *env = msg->env;
    dtask_t *t = wk_dtask_find(w, env->request_id);
    if (!t || t->state != D_PULLING) /* unknown, abandoned or not reserved yet */
        return;
    const Pd__KvData *d = env->kv_data;
    size_t row = w->row_bytes;
    size_t len = msg->has_data ? zmq_msg_size((zmq_msg_t *)&msg->data) : 0;
    if (w->o.transport != PD__KV_TRANSPORT__ZMQ || !pd_kv_pool_k(w->kv, 0)) {
        /* only the zmq transport sends rows; a cuda-ipc worker has no host pool */
        PD_LOG_ERROR("worker: task %llu: KV_DATA, but this worker reads KV over %s",
                     (unsigned long long)t->task,
                     w->o.transport == PD__KV_TRANSPORT__UCX ? "ucx" : "cuda-ipc");
        t->get_failed = true;
        wk_dtask_check(w, t);
        return;
    }
    if (d->layer >= (uint32_t)w->n_layers || d->pos0 != (uint32_t)t->pulled[d->layer] ||
        d->n_pos == 0 || d->pos0 + d->n_pos > (uint32_t)t->n_prompt ||
        len != 2 * (size_t)d->n_pos * row) {
        PD_LOG_ERROR("worker: task %llu: KV_DATA out of order or of the wrong size",
                     (unsigned long long)t->task);
        t->get_failed = true;
        wk_dtask_check(w, t);
        return;
    }
    const uint8_t *src = zmq_msg_data((zmq_msg_t *)&msg->data);
    for (int kv = 0; kv < 2; kv++) {
        uint8_t *base =
            kv ? pd_kv_pool_v(w->kv, (int)d->layer) : pd_kv_pool_k(w->kv, (int)d->layer);
        for (uint32_t i = 0; i < d->n_pos; i++) {
            uint32_t pos = d->pos0 + i;
            size_t off = ((size_t)t->blocks[pos / (uint32_t)w->bs] * (size_t)w->bs +
                          pos % (uint32_t)w->bs) *
                         row;
            memcpy(base + off, src + ((size_t)kv * d->n_pos + i) * row, row);
        }
    }
    w->kv_bytes += (int64_t)len;
    t->pulled[d->layer] = (int32_t)(d->pos0 + d->n_pos);
    wk_dtask_check(w, t);
}

void wk_on_ev_token(worker_t *w, msg_t *m)
{
    dtask_t *t = wk_dtask_find(w, m->task);
    if (t)
        chunk_push(t, m->a, (uint32_t)m->b, m->has_rng ? m->rng : NULL);
}

void wk_on_ev_finish(worker_t *w, msg_t *m)
{
    dtask_t *t = wk_dtask_find(w, m->task);
    if (!t)
        return;
    t->finish = m->reason;
    if (m->cached > t->cached)
        t->cached = m->cached;
    t->spec_proposed = m->spec_proposed;
    t->spec_accepted = m->spec_accepted;
    wk_chunk_flush(w, t);
    dtask_unlink(w, t);
    wk_dtask_free(t);
}

void wk_on_ev_failed(worker_t *w, msg_t *m)
{
    ptask_t *p = wk_ptask_find(w, m->task);
    dtask_t *d = wk_dtask_find(w, m->task);
    if (!p && !d)
        return;
    char what[128];
    snprintf(what, sizeof what, "engine: %s", pd_status_str(m->st));
    wk_send_failed(w, m->task, wk_status_code(m->st), what);
    if (p)
        wk_ptask_drop(w, p, false);
    if (d) {
        if (d->state == D_RESERVING) /* the reservation failed: nothing held */
            d->state = D_PULLING;
        if (d->outstanding > 0)
            wk_peer_close(w, d->peer);
        dtask_unlink(w, d);
        if (d->blocks)
            wk_cmd_release(w, d->blocks, d->n_blocks);
        d->blocks = NULL;
        wk_dtask_free(d);
    }
}
