/* fuzz_tokenizer.c - libFuzzer target: pd_tokenizer_load_bin (llama2.c tokenizer.bin)
 * on arbitrary bytes after a first byte that picks the vocabulary size (below 128:
 * every record; else byte - 100), then encoding fixed texts and the input itself and
 * detokenizing every id. Encoded ids must lie in the vocabulary. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/log.h"
#include "common/tokenizer.h"

static void quiet(pd_log_level_t l, const char *file, int line, const char *msg, void *u)
{
    (void)l, (void)file, (void)line, (void)msg, (void)u;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    if (!init) {
        pd_log_set_callback(quiet, NULL);
        init = 1;
    }
    if (size < 1)
        return 0;
    int32_t vocab = data[0] < 128 ? 0 : (int32_t)data[0] - 100;
    int fd = memfd_create("fuzz_tokenizer", 0);
    if (fd < 0 || (size > 1 && write(fd, data + 1, size - 1) != (ssize_t)(size - 1)))
        abort();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    pd_tokenizer_t *tok = NULL;
    if (pd_tokenizer_load_bin(path, vocab, &tok) != PD_OK) {
        close(fd);
        return 0;
    }
    size_t cap = pd_tokenizer_max_piece_len(tok) + 16;
    char *out = malloc(cap);
    int32_t *ids = malloc(512 * sizeof *ids);
    if (!out || !ids)
        abort();
    const char *texts[] = {"Once upon a time", " \xe2\x82\xac\x80\xff  x <0x41>", "",
                           (const char *)data + 1};
    for (int k = 0; k < 4; k++) {
        size_t len = k < 3 ? strlen(texts[k]) : (size - 1 < 300 ? size - 1 : 300);
        size_t n = 0;
        pd_status_t st = pd_tokenizer_encode(tok, texts[k], len, k & 1, ids, 512, &n);
        if (st != PD_OK && st != PD_ERR_RANGE)
            continue;
        n = n > 512 ? 512 : n;
        pd_detok_t d;
        pd_detok_init(&d, tok);
        for (size_t i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] >= pd_tokenizer_n_vocab(tok))
                abort(); /* an id outside the vocabulary */
            pd_detok_feed(&d, ids[i], out, cap);
        }
        pd_detok_flush(&d, out, cap);
    }
    pd_detok_t d;
    pd_detok_init(&d, tok);
    for (int32_t id = -2; id < pd_tokenizer_n_vocab(tok) + 2 && id < 4096; id++)
        pd_detok_feed(&d, id, out, cap);
    free(ids);
    free(out);
    pd_tokenizer_destroy(&tok);
    close(fd);
    return 0;
}
