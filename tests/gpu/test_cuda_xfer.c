/* test_cuda_xfer.c - kernels/devxfer.h on a GPU (run by tests/gpu/run.sh):
 *  1. PD-SUM64 on the device equals the host reference (pd_kv_checksum_sum64) over
 *     device pools of stories260K (F32 cache, blocks of 16 and of 4) and of the
 *     Llama-2-vocabulary random model (F16 cache), for a block table in reverse
 *     memory order, partial last blocks, one token and the whole pool; a flipped byte
 *     in the device copy changes it.
 *  2. CUDA IPC between two processes: a child (this program with --child) allocates
 *     device memory, fills it with a pattern and exports its handle; the parent maps
 *     it (twice: one mapping, counted), copies ranges into its own device memory with
 *     pd_devxfer_copy and finds the pattern; mapping its own handle is refused without
 *     breaking later copies; the child exits 0 after the parent closed the mapping.
 * usage: test_cuda_xfer SHARED_DIR. Exit status 1 on a failure. */
#define _GNU_SOURCE
#include <cuda_runtime.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/kvpool.h"
#include "common/log.h"
#include "common/model.h"
#include "kernels/devxfer.h"
#include "kernels/ops.h"

extern char **environ;

static int n_checks, n_fail;

#define CHECK(ok, ...)                                                                   \
    do {                                                                                 \
        n_checks++;                                                                      \
        if (!(ok)) {                                                                     \
            n_fail++;                                                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                  \
            printf(__VA_ARGS__);                                                         \
            printf("\n");                                                                \
        }                                                                                \
    } while (0)

static uint64_t rng = 88172645463325252ull;

static uint8_t next_byte(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint8_t)(rng >> 24);
}

/* The pattern the child writes: byte i of the buffer. */
static uint8_t pattern(size_t i)
{
    return (uint8_t)((i * 131u + (i >> 12)) ^ 0x5a);
}

#define IPC_BYTES (8u << 20)

/* ---- 1. PD-SUM64 ---- */

static void sum64_pool(pd_kernels_t *k, pd_devxfer_t *x, const pd_model_t *model,
                       int32_t bs, int32_t n_blocks)
{
    pd_kv_pool_opts_t o = {
        .block_size = bs, .n_blocks = n_blocks, .device = k, .host = PD_KV_HOST_STAGING};
    pd_kv_pool_t *p = NULL;
    CHECK(pd_kv_pool_new(model, &o, &p) == PD_OK, "device pool of %d blocks", n_blocks);
    if (!p)
        return;
    int32_t L = pd_kv_pool_n_layers(p);
    size_t layer = pd_kv_pool_layer_bytes(p), row = pd_kv_pool_row_bytes(p);
    for (int32_t l = 0; l < L; l++)
        for (size_t i = 0; i < layer; i++) {
            ((uint8_t *)pd_kv_pool_k(p, l))[i] = next_byte();
            ((uint8_t *)pd_kv_pool_v(p, l))[i] = next_byte();
        }
    int32_t *all = malloc((size_t)n_blocks * sizeof *all);
    for (int32_t b = 0; b < n_blocks; b++)
        all[b] = n_blocks - 1 - b; /* reversed: the table's order is not memory order */
    CHECK(pd_kv_pool_upload(p, -1, all, n_blocks) == PD_OK, "upload");
    const int32_t lens[] = {1, bs - 1, bs, bs + 1, 3 * bs + 5, n_blocks * bs};
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++) {
        int32_t n = lens[i];
        if (n < 1 || n > n_blocks * bs)
            continue;
        uint64_t want = pd_kv_checksum_sum64(p, all, n), got = 0;
        pd_status_t st =
            pd_devxfer_kv_sum64(x, pd_kv_pool_compute_k(p, 0), pd_kv_pool_compute_v(p, 0),
                                layer, L, bs, row, all, n, &got);
        CHECK(st == PD_OK && got == want,
              "sum64 bs %d, %d tokens: device %016llx, host %016llx (%s)", bs, n,
              (unsigned long long)got, (unsigned long long)want, pd_status_str(st));
    }
    /* one byte of V in the last layer, inside the first token's row, on the device */
    uint64_t before = 0, after = 0;
    pd_devxfer_kv_sum64(x, pd_kv_pool_compute_k(p, 0), pd_kv_pool_compute_v(p, 0), layer,
                        L, bs, row, all, bs, &before);
    uint8_t *vb = (uint8_t *)pd_kv_pool_compute_v(p, L - 1) + (size_t)all[0] * bs * row;
    uint8_t byte = 0;
    k->to_host(k, &byte, vb + 3, 1);
    byte ^= 0x10;
    k->to_device(k, vb + 3, &byte, 1);
    k->sync(k);
    pd_devxfer_kv_sum64(x, pd_kv_pool_compute_k(p, 0), pd_kv_pool_compute_v(p, 0), layer,
                        L, bs, row, all, bs, &after);
    CHECK(before != after, "a flipped byte on the device changes the sum");
    /* an earlier failed call of this thread (here an allocation no GPU can give) leaves
     * its error in the thread's last-error slot; the checksum must report its own
     * launch, not that error (it once failed the next task's check as a mismatch) */
    void *huge = NULL;
    CHECK(cudaMalloc(&huge, (size_t)1 << 62) != cudaSuccess, "a 4 EiB allocation fails");
    uint64_t again = 0;
    pd_status_t st2 =
        pd_devxfer_kv_sum64(x, pd_kv_pool_compute_k(p, 0), pd_kv_pool_compute_v(p, 0),
                            layer, L, bs, row, all, bs, &again);
    CHECK(st2 == PD_OK && again == after,
          "sum64 after an unrelated failed call: %s, %016llx against %016llx",
          pd_status_str(st2), (unsigned long long)again, (unsigned long long)after);
    free(all);
    pd_kv_pool_destroy(&p);
}

/* ---- 2. CUDA IPC ---- */

static int child_main(void)
{
    pd_devxfer_t *x = NULL;
    if (pd_devxfer_new(0, &x) != PD_OK)
        return 3;
    uint8_t *h = malloc(IPC_BYTES), *d = NULL;
    for (size_t i = 0; i < IPC_BYTES; i++)
        h[i] = pattern(i);
    uint8_t handle[PD_IPC_HANDLE_BYTES];
    if (cudaMalloc((void **)&d, IPC_BYTES) != cudaSuccess ||
        cudaMemcpy(d, h, IPC_BYTES, cudaMemcpyHostToDevice) != cudaSuccess ||
        pd_devxfer_export(x, d, handle) != PD_OK)
        return 4;
    if (write(1, handle, sizeof handle) != (ssize_t)sizeof handle)
        return 5;
    char c;
    while (read(0, &c, 1) > 0) /* until the parent is done (EOF) */
        ;
    cudaFree(d);
    free(h);
    pd_devxfer_destroy(&x);
    return 0;
}

static void ipc(const char *self)
{
    int to_child[2], from_child[2];
    if (pipe(to_child) || pipe(from_child)) {
        CHECK(0, "pipes");
        return;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
    posix_spawn_file_actions_adddup2(&fa, from_child[1], 1);
    posix_spawn_file_actions_addclose(&fa, to_child[1]);
    posix_spawn_file_actions_addclose(&fa, from_child[0]);
    char *argv[] = {(char *)self, (char *)"--child", NULL};
    pid_t pid = 0;
    int err = posix_spawn(&pid, self, &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(to_child[0]);
    close(from_child[1]);
    CHECK(err == 0, "spawn the child: %s", strerror(err));
    if (err) {
        close(to_child[1]);
        close(from_child[0]);
        return;
    }
    uint8_t handle[PD_IPC_HANDLE_BYTES];
    size_t got = 0;
    alarm(60); /* a child that never answers ends the test, not the CI budget */
    while (got < sizeof handle) {
        ssize_t r = read(from_child[0], handle + got, sizeof handle - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    CHECK(got == sizeof handle, "the child's handle (%zu bytes)", got);
    pd_devxfer_t *x = NULL;
    CHECK(pd_devxfer_new(0, &x) == PD_OK, "transfer context");
    if (got == sizeof handle && x) {
        void *remote = NULL, *again = NULL;
        CHECK(pd_devxfer_open(x, handle, &remote) == PD_OK && remote, "map the handle");
        CHECK(pd_devxfer_open(x, handle, &again) == PD_OK && again == remote,
              "the same handle twice: one mapping");
        uint8_t *local = NULL, *h = malloc(IPC_BYTES);
        cudaMalloc((void **)&local, IPC_BYTES);
        cudaMemset(local, 0, IPC_BYTES);
        /* three ranges, as runs of blocks: head, an odd middle, the tail */
        const size_t off[3] = {0, 4096 * 3 + 64, IPC_BYTES - 65536};
        const size_t len[3] = {65536, 1 << 20, 65536};
        for (int i = 0; i < 3 && remote; i++)
            CHECK(pd_devxfer_copy(x, local + off[i], (uint8_t *)remote + off[i],
                                  len[i]) == PD_OK,
                  "copy %d", i);
        CHECK(pd_devxfer_wait(x) == PD_OK, "wait for the copies");
        cudaMemcpy(h, local, IPC_BYTES, cudaMemcpyDeviceToHost);
        size_t bad = 0;
        for (size_t i = 0; i < IPC_BYTES; i++) {
            bool in = false;
            for (int r = 0; r < 3; r++)
                in |= i >= off[r] && i < off[r] + len[r];
            bad += h[i] != (in ? pattern(i) : 0);
        }
        CHECK(bad == 0, "%zu bytes differ after the IPC copies", bad);
        /* our own handle: CUDA does not map it; later copies still work */
        uint8_t own[PD_IPC_HANDLE_BYTES];
        void *mine = NULL;
        CHECK(pd_devxfer_export(x, local, own) == PD_OK, "export our own buffer");
        CHECK(pd_devxfer_open(x, own, &mine) != PD_OK && !mine,
              "mapping our own handle is refused");
        if (remote) {
            CHECK(pd_devxfer_copy(x, local, remote, 4096) == PD_OK &&
                      pd_devxfer_wait(x) == PD_OK,
                  "a copy after the refusal");
        }
        pd_devxfer_close(x, again);
        pd_devxfer_close(x, remote);
        cudaFree(local);
        free(h);
    }
    pd_devxfer_destroy(&x);
    close(to_child[1]); /* the child exits */
    close(from_child[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    alarm(0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child exited with %d",
          WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--child"))
        return child_main();
    if (argc != 2) {
        fprintf(stderr, "usage: test_cuda_xfer SHARED_DIR\n");
        return 2;
    }
    char path[4096], path2[4096];
    snprintf(path, sizeof path, "%s/models/stories260K.gguf", argv[1]);
    snprintf(path2, sizeof path2, "%s/models/llama-2-tiny-random.gguf", argv[1]);
    pd_model_t *model = NULL, *model2 = NULL;
    pd_kernels_t *k = NULL;
    pd_devxfer_t *x = NULL;
    if (pd_model_open(path, NULL, &model) != PD_OK ||
        pd_model_open(path2, NULL, &model2) != PD_OK ||
        pd_kernels_cuda_new(0, false, &k) != PD_OK || pd_devxfer_new(0, &x) != PD_OK) {
        printf("FAIL setup (models %s and %s, GPU 0)\n", path, path2);
        return 1;
    }
    sum64_pool(k, x, model, 16, 64);
    sum64_pool(k, x, model, 4, 300);
    sum64_pool(k, x, model2, 16, 40);
    pd_devxfer_destroy(&x);
    pd_kernels_destroy(&k);
    pd_model_destroy(&model);
    pd_model_destroy(&model2);
    ipc(argv[0]);
    printf("%d checks, %d failures\n", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
