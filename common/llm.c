/* llm.c - see llm.h. The pass follows llama2.c's run.c step by step (RMSNorm,
 * Q/K/V projections, interleaved RoPE, causal grouped-query attention over the
 * cache, output projection and residual, RMSNorm, SwiGLU FFN and residual), with
 * every op over all T rows at once through the ops table.
 * On a device a pass is: the batch description up in one copy (upload_batch), the ops
 * (compute_ops: embedding to output matmul, no copy and no wait among them), then the
 * logits or their argmax down. With graphs the middle part is what is recorded and
 * replayed (compute); the copies on either side stay outside it, so each launch reads
 * the step's own batch from the same device addresses. Threading: one caller. */
#include "common/llm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/sampler.h"

/* ---- CUDA graphs: the cache (see llm.h) ---- */
#define GRAPH_SLOTS 32  /* graphs kept per llm */
#define GRAPH_MAX_T 512 /* larger passes are bound by their arithmetic, not launches */

/* Everything that changes a pass's launches or their arguments: the shapes, where the
 * batch description lands (the staging buffer, at offsets fixed by T, n_out and
 * n_seqs * bt_stride), the pool's cache, attention's host-derived key and the
 * backend's scratch generation. The llm's own buffers and weights never move. */
typedef struct graph_key {
    int64_t T, n_out, n_seqs, bt_stride, block_size;
    uint64_t attn, gen;
    const void *pool, *k0, *v0, *k_last, *stage;
    pd_dtype_t kv_dtype;
    bool ids;
} graph_key_t;

typedef enum slot_state {
    SLOT_FREE = 0,
    SLOT_SEEN,   /* ran once, op by op */
    SLOT_READY,  /* exec holds its graph */
    SLOT_FAILED, /* recording failed: runs op by op until evicted */
} slot_state_t;

typedef struct graph_slot {
    graph_key_t key;
    slot_state_t state;
    void *exec;
    uint64_t used; /* tick of the last use (least recently used goes first) */
} graph_slot_t;

struct pd_llm {
    const pd_model_t *model;
    pd_kernels_t *k;
    pd_model_config_t cfg;
    int32_t max_ctx, max_T, max_logits;
    int64_t kv_dim, q_dim;
    pd_dtype_t kv_dtype;  /* of the private pool */
    pd_kv_pool_t *own_kv; /* the private pool, or NULL */
    int32_t *own_table;   /* [own blocks] identity */
    int32_t *own_seq;     /* [max_T] zeros */
    int32_t *slots;       /* [max_T] cache row of each token */
    float *x;             /* [max_T][dim] residual stream */
    float *xb;            /* [max_T][dim] normed input */
    float *xb2;           /* [max_T][dim] projection output */
    float *q;             /* [max_T][n_heads*head_dim] */
    float *kk, *vv;       /* [max_T][kv_dim] */
    float *att;           /* [max_T][n_heads*head_dim] attention output */
    float *hb, *hb2;      /* [max_T][hidden_dim] */
    float *xo;            /* [max_logits][dim] rows that need logits */
    float *logits;        /* [max_logits][vocab] */
    pd_llm_layer_fn on_layer;
    void *layer_user;
    /* A device backend (k->device): the buffers above except slots, own_table, own_seq
     * and logits are device memory, the weights are device copies in dw, and each pass
     * uploads its batch description into stage_d (upload_batch). */
    bool dev;
    pd_model_weights_t dw;      /* what the kernels read: the model's weights or copies */
    int32_t *stage_h, *stage_d; /* the packed batch description, host and device */
    size_t stage_cap;           /* int32 elements of each */
    bool stage_pinned;
    int32_t *d_slots; /* into stage_d: the slots of this pass */
    float *d_logits;  /* [max_logits][vocab] */
    int32_t *touched; /* [max_T] blocks the pass writes (host mirrors) */
    int32_t n_touched;
    bool logits_pinned;
    /* CUDA graphs (opts.cuda_graphs and a backend that records) */
    bool graphs;
    graph_slot_t gslots[GRAPH_SLOTS];
    uint64_t gtick, ggen; /* use counter; the generation the slots were checked at */
    pd_llm_graph_stats_t gstats;
};

/* a * b elements of elem bytes in the backend's memory (device buffers for a device
 * backend, host otherwise). */
static void *alloc_buf(pd_llm_t *l, size_t a, size_t b, size_t elem, int *fail)
{
    size_t n;
    if (pd_mul_size(a, b, &n) || pd_mul_size(n, elem, &n)) {
        *fail = 1;
        return NULL;
    }
    void *p = l->dev ? l->k->alloc(l->k, n) : aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p)
        *fail = 1;
    return p;
}

static float *alloc_floats(pd_llm_t *l, size_t a, size_t b, int *fail)
{
    return alloc_buf(l, a, b, sizeof(float), fail);
}

static void free_buf(pd_llm_t *l, void *p)
{
    if (l->dev)
        l->k->free(l->k, p);
    else
        free(p);
}

/* The device copies of every weight (the output matrix shares the embedding's copy
 * when the model ties them). */
static const pd_tensor_t *host_tensors(const pd_model_weights_t *w, int n_layers, int i)
{
    if (i == 0)
        return &w->tok_embd;
    if (i == 1)
        return &w->output_norm;
    if (i == 2)
        return &w->output;
    i -= 3;
    if (i >= 9 * n_layers)
        return NULL;
    const pd_layer_weights_t *L = &w->layers[i / 9];
    const pd_tensor_t *t[9] = {&L->attn_norm, &L->wq,     &L->wk,     &L->wv,  &L->wo,
                               &L->ffn_norm,  &L->w_gate, &L->w_down, &L->w_up};
    return t[i % 9];
}

static pd_tensor_t *dev_tensors(pd_model_weights_t *w, int n_layers, int i)
{
    return (pd_tensor_t *)host_tensors(w, n_layers, i);
}

static void free_weights(pd_llm_t *l)
{
    if (!l->dev || !l->dw.layers)
        return;
    const pd_model_weights_t *mw = pd_model_weights(l->model);
    bool tied = mw->output.data == mw->tok_embd.data;
    for (int i = 0; host_tensors(&l->dw, l->cfg.n_layers, i); i++) {
        pd_tensor_t *t = dev_tensors(&l->dw, l->cfg.n_layers, i);
        if (!(i == 2 && tied))
            l->k->free(l->k, (void *)t->data);
        t->data = NULL;
    }
    free(l->dw.layers);
    l->dw.layers = NULL;
}

static pd_status_t upload_weights(pd_llm_t *l)
{
    const pd_model_weights_t *mw = pd_model_weights(l->model);
    int n_layers = l->cfg.n_layers;
    l->dw = *mw;
    l->dw.layers = calloc((size_t)n_layers, sizeof *l->dw.layers);
    if (!l->dw.layers)
        return PD_ERR_NOMEM;
    bool tied = mw->output.data == mw->tok_embd.data;
    for (int i = 0; host_tensors(mw, n_layers, i); i++)
        dev_tensors(&l->dw, n_layers, i)->data = NULL;
    for (int i = 0; host_tensors(mw, n_layers, i); i++) {
        pd_tensor_t *d = dev_tensors(&l->dw, n_layers, i);
        if (i == 2 && tied) {
            *d = l->dw.tok_embd;
            continue;
        }
        pd_status_t st = l->k->upload_tensor(l->k, host_tensors(mw, n_layers, i), d);
        if (st != PD_OK) {
            d->data = NULL;
            PD_LOG_ERROR("cannot upload the model's weights to the device: %s",
                         pd_status_str(st));
            return st;
        }
    }
    return PD_OK;
}

static void graphs_clear(pd_llm_t *l);

static void free_buffers(pd_llm_t *l)
{
    graphs_clear(l); /* first: they name the buffers below */
    float **bufs[] = {&l->x,   &l->xb, &l->xb2, &l->q,  &l->kk,      &l->vv,
                      &l->att, &l->hb, &l->hb2, &l->xo, &l->d_logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        free_buf(l, *bufs[i]);
        *bufs[i] = NULL;
    }
    if (l->stage_pinned)
        l->k->unpin(l->k, l->stage_h);
    free(l->stage_h);
    if (l->dev)
        l->k->free(l->k, l->stage_d);
    l->stage_h = l->stage_d = l->d_slots = NULL;
    if (l->logits_pinned)
        l->k->unpin(l->k, l->logits);
    free(l->logits);
    l->logits = NULL;
    free(l->touched);
    l->touched = NULL;
    free_weights(l);
    free(l->own_table);
    free(l->own_seq);
    free(l->slots);
    pd_kv_pool_destroy(&l->own_kv);
}

pd_status_t pd_llm_new(const pd_model_t *model, pd_kernels_t *kernels,
                       const pd_llm_opts_t *opts, pd_llm_t **llm_p)
{
    pd_llm_t *l = calloc(1, sizeof *l);
    if (!l)
        return PD_ERR_NOMEM;
    l->model = model;
    l->k = kernels;
    l->dev = kernels->device;
    if (opts && opts->cuda_graphs && l->dev) {
        pd_kernels_t *k = kernels;
        l->graphs = k->graph_attn_key && k->graph_generation && k->graph_begin &&
                    k->graph_end && k->graph_launch && k->graph_destroy;
        if (!l->graphs)
            PD_LOG_INFO("llm: the %s backend cannot record graphs; passes run op by op",
                        k->name);
    }
    l->dw = *pd_model_weights(model);
    l->cfg = *pd_model_config(model);
    const pd_model_config_t *c = &l->cfg;
    l->max_ctx = opts && opts->max_ctx > 0 ? opts->max_ctx : c->ctx_len;
    l->max_T = opts && opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 512;
    l->max_logits = opts && opts->max_logits > 0 ? opts->max_logits : 1;
    if (l->max_logits > l->max_T)
        l->max_logits = l->max_T;
    l->kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    l->q_dim = (int64_t)c->n_heads * c->head_dim;
    pd_kv_type_t kt = opts ? opts->kv_type : PD_KV_AUTO;
    l->kv_dtype = kt == PD_KV_F32   ? PD_DTYPE_F32
                  : kt == PD_KV_F16 ? PD_DTYPE_F16
                                    : pd_kv_auto_dtype(model);

    pd_status_t st = PD_OK;
    if (!(opts && opts->no_private_kv)) {
        int32_t bs = opts && opts->block_size > 0 ? opts->block_size : 16;
        int32_t n_blocks = (int32_t)(((int64_t)l->max_ctx + bs - 1) / bs);
        pd_kv_pool_opts_t po = {
            .block_size = bs, .n_blocks = n_blocks, .kv_type = kt, .device = kernels};
        st = pd_kv_pool_new(model, &po, &l->own_kv);
        if (st != PD_OK) {
            free(l);
            return st;
        }
        l->own_table = malloc((size_t)n_blocks * sizeof *l->own_table);
        if (l->own_table && pd_kv_pool_alloc(l->own_kv, n_blocks, l->own_table) != PD_OK)
            st = PD_ERR_NOMEM;
        if (l->own_table) /* blocks 0..n-1 in order: position p in block p / bs */
            for (int32_t b = 0; b < n_blocks; b++)
                l->own_table[b] = b;
    }

    int fail = st != PD_OK || (l->own_kv && !l->own_table);
    size_t T = (size_t)l->max_T;
    if (!fail && l->dev && upload_weights(l) != PD_OK)
        fail = 1;
    if (!fail) {
        l->x = alloc_floats(l, T, (size_t)c->dim, &fail);
        l->xb = alloc_floats(l, T, (size_t)c->dim, &fail);
        l->xb2 = alloc_floats(l, T, (size_t)c->dim, &fail);
        l->q = alloc_floats(l, T, (size_t)l->q_dim, &fail);
        l->kk = alloc_floats(l, T, (size_t)l->kv_dim, &fail);
        l->vv = alloc_floats(l, T, (size_t)l->kv_dim, &fail);
        l->att = alloc_floats(l, T, (size_t)l->q_dim, &fail);
        l->hb = alloc_floats(l, T, (size_t)c->hidden_dim, &fail);
        l->hb2 = alloc_floats(l, T, (size_t)c->hidden_dim, &fail);
        l->xo = alloc_floats(l, (size_t)l->max_logits, (size_t)c->dim, &fail);
        size_t nl;
        if (pd_mul_size((size_t)l->max_logits, (size_t)c->vocab_size, &nl) ||
            pd_mul_size(nl, sizeof(float), &nl))
            fail = 1;
        else
            l->logits = aligned_alloc(64, (nl + 63) / 64 * 64);
        fail |= !l->logits;
        if (l->dev) {
            l->d_logits =
                alloc_floats(l, (size_t)l->max_logits, (size_t)c->vocab_size, &fail);
            if (l->logits && l->k->pin) /* not pinned: slower copies, still right */
                l->logits_pinned =
                    l->k->pin(l->k, l->logits, (nl + 63) / 64 * 64) == PD_OK;
        }
        l->own_seq = calloc(T, sizeof *l->own_seq);
        l->slots = malloc(T * sizeof *l->slots);
        l->touched = malloc(T * sizeof *l->touched);
        fail |= !l->own_seq || !l->slots || !l->touched;
    }
    if (fail) {
        PD_LOG_ERROR("cannot allocate the llm buffers (ctx %d, batch %d)", l->max_ctx,
                     l->max_T);
        free_buffers(l);
        free(l);
        return PD_ERR_NOMEM;
    }
    *llm_p = l;
    return PD_OK;
}

void pd_llm_destroy(pd_llm_t **llm_p)
{
    if (!llm_p || !*llm_p)
        return;
    free_buffers(*llm_p);
    free(*llm_p);
    *llm_p = NULL;
}

int32_t pd_llm_max_ctx(const pd_llm_t *llm)
{
    return llm->max_ctx;
}

int32_t pd_llm_max_batch_tokens(const pd_llm_t *llm)
{
    return llm->max_T;
}

pd_dtype_t pd_llm_kv_dtype(const pd_llm_t *llm)
{
    return llm->own_kv ? pd_kv_pool_dtype(llm->own_kv) : llm->kv_dtype;
}

pd_kv_pool_t *pd_llm_private_kv(pd_llm_t *llm)
{
    return llm->own_kv;
}

/* Checks the batch and fills l->slots (the cache row of every token). */
static pd_status_t check_batch(pd_llm_t *l, const pd_kv_pool_t *pool,
                               const pd_llm_batch_t *b)
{
    if (b->T < 1 || b->T > l->max_T || b->n_out < 0 || b->n_out > l->max_logits) {
        PD_LOG_ERROR("forward batch of %lld tokens, %lld logits exceeds the limits "
                     "(%d tokens, %d logits)",
                     (long long)b->T, (long long)b->n_out, l->max_T, l->max_logits);
        return PD_ERR_RANGE;
    }
    if (l->dev != (pd_kv_pool_device(pool) != NULL)) {
        PD_LOG_ERROR("forward batch: the kv pool is in %s memory, the kernels compute on "
                     "the %s",
                     pd_kv_pool_device(pool) ? "device" : "host",
                     l->dev ? "device" : "host");
        return PD_ERR_INVALID;
    }
    if (pd_kv_pool_row_elems(pool) != l->kv_dim || b->n_seqs < 1 || b->bt_stride < 1) {
        PD_LOG_ERROR("forward batch: kv pool rows of %lld (model: %lld), %lld sequences, "
                     "block tables of %lld",
                     (long long)pd_kv_pool_row_elems(pool), (long long)l->kv_dim,
                     (long long)b->n_seqs, (long long)b->bt_stride);
        return PD_ERR_RANGE;
    }
    int32_t bs = pd_kv_pool_block_size(pool), n_blocks = pd_kv_pool_n_blocks(pool);
    l->n_touched = 0;
    for (int64_t t = 0; t < b->T; t++) {
        if (b->ids[t] < 0 || b->ids[t] >= l->cfg.vocab_size) {
            PD_LOG_ERROR("token id %d outside the vocabulary (%d)", b->ids[t],
                         l->cfg.vocab_size);
            return PD_ERR_RANGE;
        }
        if (b->pos[t] < 0 || b->pos[t] >= l->max_ctx || b->pos[t] / bs >= b->bt_stride) {
            PD_LOG_ERROR("position %d outside the context (%d)", b->pos[t], l->max_ctx);
            return PD_ERR_RANGE;
        }
        if (b->seq[t] < 0 || b->seq[t] >= b->n_seqs) {
            PD_LOG_ERROR("sequence %d outside the batch's %lld", b->seq[t],
                         (long long)b->n_seqs);
            return PD_ERR_RANGE;
        }
        int32_t blk = b->block_tables[(int64_t)b->seq[t] * b->bt_stride + b->pos[t] / bs];
        if (blk < 0 || blk >= n_blocks) {
            PD_LOG_ERROR("block %d of position %d outside the pool (%d blocks)", blk,
                         b->pos[t], n_blocks);
            return PD_ERR_RANGE;
        }
        l->slots[t] = blk * bs + b->pos[t] % bs;
        if (l->n_touched == 0 || l->touched[l->n_touched - 1] != blk)
            l->touched[l->n_touched++] = blk;
    }
    for (int64_t i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->T) {
            PD_LOG_ERROR("logit row %d outside the batch of %lld", b->out_rows[i],
                         (long long)b->T);
            return PD_ERR_RANGE;
        }
    return PD_OK;
}

/* Copies the batch description to the device in one copy: packed into pinned host
 * memory (ids, pos, seq, slots, out_rows, block tables), mirrored in device memory.
 * The staging buffer is rewritten by the next pass only: every pass ends waiting for
 * the stream (the logits' copy, or a sync), so this pass's copy has finished by then.
 * *db gets the device pointers. */
static pd_status_t upload_batch(pd_llm_t *l, const pd_llm_batch_t *b, pd_llm_batch_t *db)
{
    pd_kernels_t *k = l->k;
    size_t T = (size_t)b->T, n_out = (size_t)b->n_out;
    size_t n_tab = (size_t)b->n_seqs * (size_t)b->bt_stride;
    size_t need = 4 * T + n_out + n_tab;
    if (need > l->stage_cap) {
        if (l->stage_pinned)
            k->unpin(k, l->stage_h);
        free(l->stage_h);
        k->free(k, l->stage_d);
        size_t cap = need + need / 2;
        l->stage_h = malloc(cap * sizeof(int32_t));
        l->stage_d = k->alloc(k, cap * sizeof(int32_t));
        l->stage_pinned =
            l->stage_h && k->pin && k->pin(k, l->stage_h, cap * sizeof(int32_t)) == PD_OK;
        l->stage_cap = l->stage_h && l->stage_d ? cap : 0;
        if (!l->stage_cap)
            return PD_ERR_NOMEM;
    }
    int32_t *h = l->stage_h, *d = l->stage_d;
    memcpy(h, b->ids, T * sizeof *h);
    memcpy(h + T, b->pos, T * sizeof *h);
    memcpy(h + 2 * T, b->seq, T * sizeof *h);
    memcpy(h + 3 * T, l->slots, T * sizeof *h);
    if (n_out)
        memcpy(h + 4 * T, b->out_rows, n_out * sizeof *h);
    memcpy(h + 4 * T + n_out, b->block_tables, n_tab * sizeof *h);
    db->ids = d;
    db->pos = d + T;
    db->seq = d + 2 * T;
    l->d_slots = d + 3 * T;
    db->out_rows = d + 4 * T;
    db->block_tables = d + 4 * T + n_out;
    return k->to_device(k, d, h, need * sizeof *h);
}

/* Matrices that read the same input run as one fan-out when the backend can (same
 * dtype and input width: the usual case), else one by one. */
static void matmul_shared_x(pd_kernels_t *k, const pd_tensor_t *const *ws,
                            float *const *ys, int n, const float *x, int64_t T)
{
    int same = k->matmul_multi != NULL;
    for (int m = 1; m < n; m++)
        same = same && ws[m]->dtype == ws[0]->dtype && ws[m]->ne[0] == ws[0]->ne[0];
    if (same) {
        k->matmul_multi(k, ws, ys, n, x, T);
        return;
    }
    for (int m = 0; m < n; m++)
        k->matmul(k, ws[m], x, T, ys[m]);
}

/* One transformer block over the T rows of l->x. b: the batch as the kernels see it
 * (device pointers on a device), host: the caller's. */
static void layer_forward(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *b,
                          const pd_llm_batch_t *host, const int32_t *slots, int layer)
{
    const pd_model_config_t *c = &l->cfg;
    const pd_layer_weights_t *w = &l->dw.layers[layer];
    pd_kernels_t *k = l->k;
    int64_t T = b->T;
    pd_dtype_t kv_dtype = pd_kv_pool_dtype(pool);
    void *kc = pd_kv_pool_compute_k(pool, layer), *vc = pd_kv_pool_compute_v(pool, layer);

    /* attention */
    k->rmsnorm(k, l->xb, l->x, w->attn_norm.data, T, c->dim, c->norm_eps);
    const pd_tensor_t *qkv[3] = {&w->wq, &w->wk, &w->wv};
    float *qkv_out[3] = {l->q, l->kk, l->vv};
    matmul_shared_x(k, qkv, qkv_out, 3, l->xb, T);
    k->rope(k, l->q, b->pos, T, c->n_heads, c->head_dim, c->rope_theta);
    k->rope(k, l->kk, b->pos, T, c->n_kv_heads, c->head_dim, c->rope_theta);
    k->kv_write(k, kc, kv_dtype, l->kv_dim, slots, T, l->kk);
    k->kv_write(k, vc, kv_dtype, l->kv_dim, slots, T, l->vv);
    pd_attn_args_t a = {
        .q = l->q,
        .out = l->att,
        .T = T,
        .pos = b->pos,
        .seq = b->seq,
        .k_cache = kc,
        .v_cache = vc,
        .kv_dtype = kv_dtype,
        .block_tables = b->block_tables,
        .n_seqs = b->n_seqs,
        .bt_stride = b->bt_stride,
        .block_size = pd_kv_pool_block_size(pool),
        .n_heads = c->n_heads,
        .n_kv_heads = c->n_kv_heads,
        .head_dim = c->head_dim,
        .scale = 1.0f / sqrtf((float)c->head_dim),
        .pos_host = host->pos,
        .seq_host = host->seq,
    };
    k->attention(k, &a);
    k->matmul(k, &w->wo, l->att, T, l->xb2);
    k->add(k, l->x, l->xb2, T * c->dim);

    /* feed-forward: w_down(silu(w_gate x) * w_up x) */
    k->rmsnorm(k, l->xb, l->x, w->ffn_norm.data, T, c->dim, c->norm_eps);
    const pd_tensor_t *gate_up[2] = {&w->w_gate, &w->w_up};
    float *gate_up_out[2] = {l->hb, l->hb2};
    matmul_shared_x(k, gate_up, gate_up_out, 2, l->xb, T);
    k->silu_mul(k, l->hb, l->hb2, T * c->hidden_dim);
    k->matmul(k, &w->w_down, l->hb, T, l->xb2);
    k->add(k, l->x, l->xb2, T * c->dim);
}

/* The ops of a pass: the embedding, every layer and, with logit rows, the output
 * matmul into l->logits (host) or l->d_logits (device). On a device nothing here
 * copies or waits unless the pool mirrors to the host or a layer hook is set (which
 * keep a pass from being recorded). */
static pd_status_t compute_ops(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *db,
                               const pd_llm_batch_t *b, const int32_t *slots)
{
    const pd_model_config_t *c = &l->cfg;
    const pd_model_weights_t *mw = &l->dw;
    pd_kernels_t *k = l->k;
    bool mirror = pd_kv_pool_host(pool) == PD_KV_HOST_MIRROR;
    pd_status_t st;

    k->get_rows(k, &mw->tok_embd, db->ids, b->T, l->x);
    for (int layer = 0; layer < c->n_layers; layer++) {
        layer_forward(l, pool, db, b, slots, layer);
        /* a prefill worker serves the layer's KV from the host copy */
        if (mirror && (st = pd_kv_pool_download(pool, layer, l->touched, l->n_touched)))
            return st;
        if (l->on_layer)
            l->on_layer(l->layer_user, layer);
    }
    if (b->n_out == 0)
        return PD_OK;
    if (l->dev) { /* the rows that need logits, gathered on the device */
        pd_tensor_t xs = {.dtype = PD_DTYPE_F32,
                          .n_dims = 2,
                          .ne = {c->dim, b->T, 1, 1},
                          .data = l->x,
                          .nbytes = (size_t)b->T * (size_t)c->dim * sizeof(float)};
        k->get_rows(k, &xs, db->out_rows, b->n_out, l->xo);
    } else {
        for (int64_t i = 0; i < b->n_out; i++)
            memcpy(l->xo + i * c->dim, l->x + (int64_t)b->out_rows[i] * c->dim,
                   (size_t)c->dim * sizeof(float));
    }
    k->rmsnorm(k, l->xo, l->xo, mw->output_norm.data, b->n_out, c->dim, c->norm_eps);
    k->matmul(k, &mw->output, l->xo, b->n_out, l->dev ? l->d_logits : l->logits);
    return PD_OK;
}

/* ---- CUDA graphs: the cache ---- */

static bool key_eq(const graph_key_t *a, const graph_key_t *b)
{
    return a->T == b->T && a->n_out == b->n_out && a->n_seqs == b->n_seqs &&
           a->bt_stride == b->bt_stride && a->block_size == b->block_size &&
           a->attn == b->attn && a->gen == b->gen && a->pool == b->pool &&
           a->k0 == b->k0 && a->v0 == b->v0 && a->k_last == b->k_last &&
           a->stage == b->stage && a->kv_dtype == b->kv_dtype && a->ids == b->ids;
}

static void slot_clear(pd_llm_t *l, graph_slot_t *s)
{
    if (s->exec)
        l->k->graph_destroy(l->k, s->exec);
    memset(s, 0, sizeof *s);
}

static void graphs_clear(pd_llm_t *l)
{
    for (int i = 0; i < GRAPH_SLOTS; i++)
        slot_clear(l, &l->gslots[i]);
}

/* The key of a pass (after upload_batch: the staging buffer is part of it); false:
 * the pass must run op by op. */
static bool graph_key_of(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *b,
                         bool ids, graph_key_t *key)
{
    pd_kernels_t *k = l->k;
    if (!l->graphs || l->on_layer || b->T > GRAPH_MAX_T ||
        pd_kv_pool_host(pool) == PD_KV_HOST_MIRROR)
        return false;
    uint64_t attn = k->graph_attn_key(k, b->T, b->pos, b->seq);
    if (!attn)
        return false; /* a prompt run: its attention plan is this batch's alone */
    memset(key, 0, sizeof *key); /* key_eq compares fields, but keep it tidy */
    key->T = b->T;
    key->n_out = b->n_out;
    key->n_seqs = b->n_seqs;
    key->bt_stride = b->bt_stride;
    key->block_size = pd_kv_pool_block_size(pool);
    key->attn = attn;
    key->gen = k->graph_generation(k);
    key->pool = pool;
    key->k0 = pd_kv_pool_compute_k(pool, 0);
    key->v0 = pd_kv_pool_compute_v(pool, 0);
    key->k_last = pd_kv_pool_compute_k(pool, l->cfg.n_layers - 1);
    key->stage = l->stage_d;
    key->kv_dtype = pd_kv_pool_dtype(pool);
    key->ids = ids;
    return true;
}

/* Graphs recorded before the backend moved a buffer of its own name the old one:
 * drop them (they could never match again anyway). */
static void graphs_drop_stale(pd_llm_t *l, uint64_t gen)
{
    if (gen == l->ggen)
        return;
    for (int i = 0; i < GRAPH_SLOTS; i++)
        if (l->gslots[i].state != SLOT_FREE && l->gslots[i].key.gen != gen) {
            l->gstats.dropped += l->gslots[i].exec != NULL;
            slot_clear(l, &l->gslots[i]);
        }
    l->ggen = gen;
}

static graph_slot_t *graph_find(pd_llm_t *l, const graph_key_t *key)
{
    for (int i = 0; i < GRAPH_SLOTS; i++)
        if (l->gslots[i].state != SLOT_FREE && key_eq(&l->gslots[i].key, key))
            return &l->gslots[i];
    return NULL;
}

/* A free slot, else the least recently used one, emptied. */
static graph_slot_t *graph_slot_take(pd_llm_t *l)
{
    graph_slot_t *v = &l->gslots[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        graph_slot_t *s = &l->gslots[i];
        if (s->state == SLOT_FREE)
            return s;
        if (s->used < v->used)
            v = s;
    }
    l->gstats.dropped += v->exec != NULL;
    slot_clear(l, v);
    return v;
}

/* The second pass of a key: recorded (nothing runs), then launched; op by op when
 * the recording or its launch fails (the backend logged why), and from then on for
 * this key. */
static pd_status_t record(pd_llm_t *l, graph_slot_t *s, pd_kv_pool_t *pool,
                          const pd_llm_batch_t *db, const pd_llm_batch_t *b,
                          const int32_t *slots)
{
    pd_kernels_t *k = l->k;
    if (k->graph_begin(k) == PD_OK) {
        void *g = NULL;
        pd_status_t st = compute_ops(l, pool, db, b, slots);
        pd_status_t est = k->graph_end(k, &g);
        /* the generation cannot move while recording (scratch refuses to grow), but
         * a graph naming moved scratch must never run: check */
        if (st == PD_OK && est == PD_OK && k->graph_generation(k) == s->key.gen &&
            k->graph_launch(k, g) == PD_OK) {
            s->exec = g;
            s->state = SLOT_READY;
            l->gstats.captures++;
            return PD_OK;
        }
        k->graph_destroy(k, g);
        s->state = SLOT_FAILED;
    }
    l->gstats.fallbacks++;
    return compute_ops(l, pool, db, b, slots);
}

/* compute_ops, through a graph where the key allows (llm.h). */
static pd_status_t compute(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *db,
                           const pd_llm_batch_t *b, const int32_t *slots, bool ids)
{
    pd_kernels_t *k = l->k;
    graph_key_t key;
    if (!graph_key_of(l, pool, b, ids, &key)) {
        l->gstats.eager++;
        return compute_ops(l, pool, db, b, slots);
    }
    graphs_drop_stale(l, key.gen);
    graph_slot_t *s = graph_find(l, &key);
    if (!s) {
        /* First sight: op by op, which also grows the backend's scratch to this key's
         * shapes; the key keeps the generation after that growth. */
        l->gstats.eager++;
        pd_status_t st = compute_ops(l, pool, db, b, slots);
        key.gen = k->graph_generation(k);
        s = graph_slot_take(l);
        s->key = key;
        s->state = SLOT_SEEN;
        s->used = ++l->gtick;
        return st;
    }
    s->used = ++l->gtick;
    if (s->state == SLOT_SEEN)
        return record(l, s, pool, db, b, slots);
    if (s->state == SLOT_READY) {
        if (k->graph_launch(k, s->exec) == PD_OK) {
            l->gstats.replays++;
            return PD_OK;
        }
        k->graph_destroy(k, s->exec);
        s->exec = NULL;
        s->state = SLOT_FAILED;
        l->gstats.fallbacks++;
        return compute_ops(l, pool, db, b, slots);
    }
    l->gstats.eager++; /* SLOT_FAILED */
    return compute_ops(l, pool, db, b, slots);
}

void pd_llm_graph_stats(const pd_llm_t *l, pd_llm_graph_stats_t *stats_p)
{
    *stats_p = l->gstats;
    stats_p->cached = 0;
    for (int i = 0; i < GRAPH_SLOTS; i++)
        stats_p->cached += l->gslots[i].state == SLOT_READY;
}

static pd_status_t forward(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *b,
                           const float **logits_p, int32_t *ids)
{
    pd_status_t st = check_batch(l, pool, b);
    if (st != PD_OK)
        return st;
    const pd_model_config_t *c = &l->cfg;
    pd_kernels_t *k = l->k;
    pd_llm_batch_t db = *b; /* the batch as the kernels read it */
    const int32_t *slots = l->slots;
    if (l->dev) {
        st = upload_batch(l, b, &db);
        if (st != PD_OK)
            return st;
        slots = l->d_slots;
    }
    st = compute(l, pool, &db, b, slots, ids != NULL);
    if (st != PD_OK)
        return st;

    /* outside any graph: the argmax copies to the host and waits */
    if (b->n_out > 0) {
        if (l->dev && ids)
            st = k->argmax(k, l->d_logits, b->n_out, c->vocab_size, ids);
        else if (l->dev)
            st = k->to_host(k, l->logits, l->d_logits,
                            (size_t)b->n_out * (size_t)c->vocab_size * sizeof(float));
        else if (ids)
            for (int64_t i = 0; i < b->n_out; i++)
                ids[i] = pd_argmax(l->logits + i * c->vocab_size, c->vocab_size);
    } else if (l->dev) {
        st = k->sync(k); /* a failed kernel shows here, not steps later */
    }
    if (st != PD_OK) {
        PD_LOG_ERROR("forward pass failed on the device: %s", pd_status_str(st));
        return st;
    }
    if (logits_p)
        *logits_p = ids && l->dev ? NULL : l->logits;
    return PD_OK;
}

pd_status_t pd_llm_forward_batch(pd_llm_t *l, pd_kv_pool_t *pool, const pd_llm_batch_t *b,
                                 const float **logits_p)
{
    return forward(l, pool, b, logits_p, NULL);
}

pd_status_t pd_llm_forward_batch_ids(pd_llm_t *l, pd_kv_pool_t *pool,
                                     const pd_llm_batch_t *b, int32_t *ids)
{
    return forward(l, pool, b, NULL, ids);
}

pd_status_t pd_llm_forward(pd_llm_t *l, const int32_t *ids, const int32_t *pos, int64_t T,
                           const int32_t *out_rows, int64_t n_out, const float **logits_p)
{
    if (!l->own_kv) {
        PD_LOG_ERROR("pd_llm_forward: this llm has no private kv cache");
        return PD_ERR_INVALID;
    }
    pd_llm_batch_t b = {.T = T,
                        .ids = ids,
                        .pos = pos,
                        .seq = l->own_seq,
                        .n_seqs = 1,
                        .bt_stride = pd_kv_pool_n_blocks(l->own_kv),
                        .block_tables = l->own_table,
                        .out_rows = out_rows,
                        .n_out = n_out};
    return pd_llm_forward_batch(l, l->own_kv, &b, logits_p);
}

void pd_llm_set_layer_hook(pd_llm_t *llm, pd_llm_layer_fn fn, void *user)
{
    llm->on_layer = fn;
    llm->layer_user = user;
}
