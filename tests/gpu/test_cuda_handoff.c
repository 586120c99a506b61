/* test_cuda_handoff.c - the disaggregated KV handoff with both engines on the GPU, as
 * the workers run it (run by tests/gpu/run.sh; the service itself needs ZeroMQ and UCX,
 * which a GPU host may lack, so the network part is a copy here).
 *
 * A prefill engine (kv_host MIRROR, prompts in chunks of 16 tokens) computes every
 * stories260K golden prompt prefill-only on the GPU. At each layer hook the test copies
 * the rows that layer just finished ([previous end, pos_end) of each sequence) out of
 * the pool's host copy, as a layer-wise transfer would: rows missing from the host
 * copy at hook time would reach the decode side wrong. A decode engine (kv_host
 * STAGING) gets the rows written into its host copy, the XXH3 checksums of both host
 * copies must agree, the requests are added as prefilled (the engine moves the blocks
 * to the device) and must produce the golden ids. Every block is free at the end.
 * usage: test_cuda_handoff SHARED_DIR [cpu]; "cpu" runs the same on the CPU backend
 * (a check of the test itself). Exit status 1 on a failure. */
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/engine.h"
#include "common/kvpool.h"
#include "common/model.h"
#include "kernels/ops.h"

#define MAX_REQ 32
#define MAX_POS 512

static int n_checks, n_fail;

static void check(int ok, const char *fmt, const char *what)
{
    n_checks++;
    if (!ok) {
        n_fail++;
        printf("FAIL ");
        printf(fmt, what);
        printf("\n");
    }
}

typedef struct req {
    int32_t prompt[MAX_POS], n_prompt;
    int32_t want[MAX_POS], n_want, exact;
    /* prefill side */
    int32_t done_end[64];     /* per layer: rows already copied */
    uint8_t *k_rows, *v_rows; /* [n_layers][n_prompt][row] as copied at the hooks */
    int32_t first, kv[64], n_kv;
    uint64_t rng[4];
    bool prefilled;
    /* decode side */
    int32_t got[MAX_POS], n_got;
    bool finished;
} req_t;

static req_t reqs[MAX_REQ];
static int n_reqs;
static pd_kv_pool_t *ppool;
static size_t row_bytes, layer_bytes, block_bytes;
static int32_t bs = 16;

/* The layer hook: copy the rows this layer finished from the host copy. */
static void on_layer(void *user, int32_t layer, const pd_engine_progress_t *seqs,
                     int32_t n)
{
    (void)user;
    for (int32_t i = 0; i < n; i++) {
        req_t *r = seqs[i].user;
        int32_t end = seqs[i].pos_end < r->n_prompt ? seqs[i].pos_end : r->n_prompt;
        for (int32_t p = r->done_end[layer]; p < end; p++) {
            size_t off = (size_t)layer * layer_bytes +
                         (size_t)seqs[i].blocks[p / bs] * block_bytes +
                         (size_t)(p % bs) * row_bytes;
            size_t dst = ((size_t)layer * (size_t)r->n_prompt + (size_t)p) * row_bytes;
            memcpy(r->k_rows + dst, (uint8_t *)pd_kv_pool_k(ppool, 0) + off, row_bytes);
            memcpy(r->v_rows + dst, (uint8_t *)pd_kv_pool_v(ppool, 0) + off, row_bytes);
        }
        if (end > r->done_end[layer])
            r->done_end[layer] = end;
    }
}

static void on_prefilled(void *user, const pd_engine_result_t *res)
{
    req_t *r = user;
    r->prefilled = res->finish == PD_ENGINE_FINISH_LENGTH && res->n_gen == 1 &&
                   res->kv_blocks && res->n_kv_blocks <= 64;
    if (!r->prefilled)
        return;
    r->first = res->ids[0];
    r->n_kv = res->n_kv_blocks;
    memcpy(r->kv, res->kv_blocks, (size_t)r->n_kv * sizeof *r->kv);
    memcpy(r->rng, res->rng_state, sizeof r->rng);
}

static void on_token(void *user, uint64_t id, int32_t token)
{
    (void)id;
    req_t *r = user;
    if (r->n_got < MAX_POS)
        r->got[r->n_got++] = token;
}

static void on_finish(void *user, const pd_engine_result_t *res)
{
    (void)res;
    ((req_t *)user)->finished = true;
}

static void load_golden(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[1 << 16];
    while (f && n_reqs < MAX_REQ && fgets(line, sizeof line, f)) {
        json_object *o = json_tokener_parse(line), *a, *b, *e;
        if (!o || !json_object_object_get_ex(o, "prompt_ids", &a) ||
            !json_object_object_get_ex(o, "greedy_ids", &b) ||
            !json_object_object_get_ex(o, "exact_prefix", &e)) {
            json_object_put(o);
            continue;
        }
        req_t *r = &reqs[n_reqs++];
        r->n_prompt = (int32_t)json_object_array_length(a);
        r->n_want = (int32_t)json_object_array_length(b);
        if (r->n_prompt > MAX_POS / 2 || r->n_want > MAX_POS / 2) {
            n_reqs--;
            json_object_put(o);
            continue;
        }
        for (int32_t i = 0; i < r->n_prompt; i++)
            r->prompt[i] = json_object_get_int(json_object_array_get_idx(a, i));
        for (int32_t i = 0; i < r->n_want; i++)
            r->want[i] = json_object_get_int(json_object_array_get_idx(b, i));
        r->exact = json_object_get_int(e);
        json_object_put(o);
    }
    if (f)
        fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_cuda_handoff SHARED_DIR\n");
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/golden/stories260K_greedy.jsonl", argv[1]);
    load_golden(path);
    snprintf(path, sizeof path, "%s/models/stories260K.gguf", argv[1]);
    pd_model_t *model = NULL;
    pd_kernels_t *k = NULL;
    if (n_reqs == 0 || pd_model_open(path, NULL, &model) != PD_OK ||
        (argc > 2 && !strcmp(argv[2], "cpu")
             ? pd_kernels_cpu_new(2, NULL, &k)
             : pd_kernels_cuda_new(0, false, &k)) != PD_OK) {
        fprintf(stderr, "test_cuda_handoff: no golden lines, model or GPU\n");
        return 1;
    }
    int32_t nl = pd_model_config(model)->n_layers;
    pd_engine_opts_t po = {.max_num_seqs = 4,
                           .max_batch_tokens = 16,
                           .kv_blocks = 256,
                           .eos = -1,
                           .bos = -1,
                           .kv_host = PD_KV_HOST_MIRROR,
                           .no_prefix_cache = true, /* every row passes a hook */
                           .on_layer = {on_layer, NULL}};
    pd_engine_opts_t dopt = {.max_num_seqs = 16,
                             .kv_blocks = 512,
                             .eos = -1,
                             .bos = -1,
                             .kv_host = PD_KV_HOST_STAGING};
    pd_engine_t *P = NULL, *D = NULL;
    if (pd_engine_new(model, k, &po, &P) != PD_OK ||
        pd_engine_new(model, k, &dopt, &D) != PD_OK) {
        fprintf(stderr, "test_cuda_handoff: cannot create the engines\n");
        return 1;
    }
    ppool = pd_engine_kv(P);
    pd_kv_pool_t *dpool = pd_engine_kv(D);
    check(!k->device || (pd_kv_pool_device(ppool) == k &&
                         pd_kv_pool_host(ppool) == PD_KV_HOST_MIRROR),
          "%s", "the prefill pool is not a mirrored device pool");
    row_bytes = pd_kv_pool_row_bytes(ppool);
    layer_bytes = pd_kv_pool_layer_bytes(ppool);
    block_bytes = row_bytes * (size_t)bs;
    int32_t pfree0 = pd_kv_pool_n_free(ppool), dfree0 = pd_kv_pool_n_free(dpool);
    for (int i = 0; i < n_reqs; i++) {
        req_t *r = &reqs[i];
        r->k_rows = calloc((size_t)nl * (size_t)r->n_prompt, row_bytes);
        r->v_rows = calloc((size_t)nl * (size_t)r->n_prompt, row_bytes);
        pd_engine_request_t rq = {.prompt = r->prompt,
                                  .n_prompt = r->n_prompt,
                                  .sampling = {.top_p = 1.0f}, /* greedy */
                                  .prefill_only = true,
                                  .on_finish = on_prefilled,
                                  .user = r};
        check(pd_engine_add(P, &rq, NULL) == PD_OK, "%s", "prefill add");
    }
    for (int s = 0; s < 10000 && pd_engine_n_pending(P); s++)
        if (pd_engine_step(P, NULL) != PD_OK) {
            check(0, "%s", "a prefill step failed");
            break;
        }
    /* the transfer: rows copied at the hooks into blocks reserved on D */
    for (int i = 0; i < n_reqs; i++) {
        req_t *r = &reqs[i];
        char what[64];
        snprintf(what, sizeof what, "request %d", i);
        check(r->prefilled, "%s: not prefilled", what);
        if (!r->prefilled)
            continue;
        int32_t dst[64];
        if (pd_kv_pool_alloc(dpool, r->n_kv, dst) != PD_OK) {
            check(0, "%s: no blocks on D", what);
            continue;
        }
        size_t dlb = pd_kv_pool_layer_bytes(dpool);
        for (int32_t l = 0; l < nl; l++)
            for (int32_t p = 0; p < r->n_prompt; p++) {
                size_t off = (size_t)l * dlb + (size_t)dst[p / bs] * block_bytes +
                             (size_t)(p % bs) * row_bytes;
                size_t src = ((size_t)l * (size_t)r->n_prompt + (size_t)p) * row_bytes;
                memcpy((uint8_t *)pd_kv_pool_k(dpool, 0) + off, r->k_rows + src,
                       row_bytes);
                memcpy((uint8_t *)pd_kv_pool_v(dpool, 0) + off, r->v_rows + src,
                       row_bytes);
            }
        check(pd_kv_checksum(ppool, r->kv, r->n_prompt) ==
                  pd_kv_checksum(dpool, dst, r->n_prompt),
              "%s: the rows copied at the layer hooks differ from the final host copy",
              what);
        pd_kv_pool_release(ppool, r->kv, r->n_kv);
        pd_engine_request_t rq = {.prompt = r->prompt,
                                  .n_prompt = r->n_prompt,
                                  .max_tokens = r->n_want,
                                  .ignore_eos = true,
                                  .sampling = {.top_p = 1.0f},
                                  .rng_state = r->rng,
                                  .kv_blocks = dst,
                                  .first_token = r->first,
                                  .on_token = on_token,
                                  .on_finish = on_finish,
                                  .user = r};
        r->got[r->n_got++] = r->first;
        if (pd_engine_add(D, &rq, NULL) != PD_OK) {
            pd_kv_pool_release(dpool, dst, r->n_kv);
            check(0, "%s: decode add", what);
        }
    }
    check(pd_kv_pool_n_free(ppool) == pfree0, "%s", "prefill blocks not all back");
    for (int s = 0; s < 20000 && pd_engine_n_pending(D); s++)
        if (pd_engine_step(D, NULL) != PD_OK) {
            check(0, "%s", "a decode step failed");
            break;
        }
    int exact = 0;
    for (int i = 0; i < n_reqs; i++) {
        req_t *r = &reqs[i];
        char what[64];
        snprintf(what, sizeof what, "request %d", i);
        check(r->finished, "%s: not finished", what);
        int ok = r->n_got == r->n_want;
        for (int32_t j = 0; ok && j < r->exact; j++)
            ok = r->got[j] == r->want[j];
        check(ok, "%s: ids differ from golden", what);
        exact += ok;
        free(r->k_rows);
        free(r->v_rows);
    }
    check(pd_kv_pool_n_free(dpool) == dfree0, "%s", "decode blocks not all back");
    pd_engine_destroy(&P);
    pd_engine_destroy(&D);
    pd_kernels_destroy(&k);
    pd_model_destroy(&model);
    printf("handoff: %d of %d golden requests exact; %d checks, %d failures\n", exact,
           n_reqs, n_checks, n_fail);
    return n_fail ? 1 : 0;
}
