/* pdctl_tokenize.c - `pdctl tokenize`: a prompt's token ids, or (--decode) ids' text.
 *
 *   pdctl tokenize (--model M.gguf | --tokenizer T.bin [--vocab-size N])
 *                  (--prompt P | --stdin) [--no-bos] [--decode]
 *
 * Encoding prints the ids as a JSON array on one line. --decode reads integers
 * (any separators: a JSON array works) from the prompt or stdin and writes their
 * text through the streaming decoder, byte-exact and without a trailing newline.
 * The vocabulary is loaded directly (pd_gguf_open + pd_tokenizer_from_gguf, or
 * pd_tokenizer_load_bin), no model needed. A tokenizer.bin's vocab_size comes from
 * --vocab-size, else from --model when that is a llama2.c checkpoint, else from
 * counting the file's records. Single-threaded. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/gguf.h"
#include "common/log.h"
#include "common/tokenizer.h"
#include "tools/pdctl.h"

typedef struct opts {
    const char *model, *tokenizer, *prompt;
    long vocab_size; /* 0: infer */
    bool from_stdin, no_bos, decode;
} opts_t;

static void usage(FILE *f)
{
    fprintf(
        f, "usage: pdctl tokenize (--model M.gguf | --tokenizer T.bin [--vocab-size N])\n"
           "                      (--prompt P | --stdin) [--no-bos] [--decode]\n"
           "  prints the ids of P as a JSON array; --decode reads ids, prints text\n");
}

static int parse_args(int argc, char **argv, opts_t *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--model") && has_val) {
            o->model = argv[++i];
        } else if (!strcmp(a, "--tokenizer") && has_val) {
            o->tokenizer = argv[++i];
        } else if (!strcmp(a, "--prompt") && has_val) {
            o->prompt = argv[++i];
        } else if (!strcmp(a, "--vocab-size") && has_val) {
            char *end;
            o->vocab_size = strtol(argv[++i], &end, 10);
            if (*end || o->vocab_size <= 0 || o->vocab_size > INT32_MAX) {
                fprintf(stderr, "pdctl tokenize: bad --vocab-size '%s'\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(a, "--stdin")) {
            o->from_stdin = true;
        } else if (!strcmp(a, "--no-bos")) {
            o->no_bos = true;
        } else if (!strcmp(a, "--decode")) {
            o->decode = true;
        } else {
            fprintf(stderr, "pdctl tokenize: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if ((!o->model && !o->tokenizer) || (!o->prompt == !o->from_stdin)) {
        usage(stderr);
        return 2;
    }
    return -1;
}

static int read_stdin(char **buf_p, size_t *len_p)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        len += fread(buf + len, 1, cap - len, stdin);
        if (len < cap)
            break;
        char *nb = cap < ((size_t)1 << 30) ? realloc(buf, cap * 2) : NULL;
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    if (!buf || ferror(stdin)) {
        fprintf(stderr, "pdctl tokenize: cannot read stdin\n");
        free(buf);
        return 1;
    }
    *buf_p = buf;
    *len_p = len;
    return 0;
}

/* vocab_size of a llama2.c checkpoint (7 int32 header; negative when unshared). */
static long checkpoint_vocab(const char *path)
{
    FILE *f = fopen(path, "rb");
    int32_t hdr[7];
    long v = 0;
    if (f && fread(hdr, sizeof hdr, 1, f) == 1 && memcmp(hdr, "GGUF", 4) != 0)
        v = hdr[5] < 0 ? -(long)hdr[5] : hdr[5];
    if (f)
        fclose(f);
    return v;
}

static int load_tokenizer(const opts_t *o, pd_gguf_t **g_p, pd_tokenizer_t **tok_p)
{
    pd_status_t st;
    if (o->tokenizer) {
        long n = o->vocab_size;
        if (n == 0 && o->model)
            n = checkpoint_vocab(o->model);
        /* n == 0: every record of the file */
        st = pd_tokenizer_load_bin(o->tokenizer, (int32_t)n, tok_p);
    } else {
        st = pd_gguf_open(o->model, g_p);
        if (st == PD_OK)
            st = pd_tokenizer_from_gguf(*g_p, tok_p);
    }
    if (st != PD_OK) {
        fprintf(stderr, "pdctl tokenize: cannot load the vocabulary: %s\n",
                pd_status_str(st));
        return 1;
    }
    return 0;
}

static int do_encode(const pd_tokenizer_t *tok, const char *text, size_t len, bool bos)
{
    size_t cap = len + 2, n = 0; /* at most one id per byte, plus prefix and BOS */
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "pdctl tokenize: out of memory\n");
        return 1;
    }
    pd_status_t st = pd_tokenizer_encode(tok, text, len, bos, ids, cap, &n);
    if (st != PD_OK) {
        fprintf(stderr, "pdctl tokenize: encode failed: %s\n", pd_status_str(st));
        free(ids);
        return 1;
    }
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf(i ? ", %d" : "%d", (int)ids[i]);
    printf("]\n");
    free(ids);
    return fflush(stdout) == 0 ? 0 : 1;
}

static int do_decode(const pd_tokenizer_t *tok, const char *text, size_t len)
{
    size_t cap = pd_tokenizer_max_piece_len(tok) + 16;
    char *out = malloc(cap);
    char *nums = malloc(len + 1);
    if (!out || !nums) {
        fprintf(stderr, "pdctl tokenize: out of memory\n");
        free(out);
        free(nums);
        return 1;
    }
    /* Any character but a digit or '-' separates ids. */
    for (size_t i = 0; i < len; i++)
        nums[i] = (text[i] >= '0' && text[i] <= '9') || text[i] == '-' ? text[i] : ' ';
    nums[len] = '\0';
    pd_detok_t d;
    pd_detok_init(&d, tok);
    int rc = 0;
    for (char *p = nums, *end; *p; p = end) {
        errno = 0;
        long id = strtol(p, &end, 10);
        if (end == p) {
            end = p + 1;
            continue;
        }
        if (errno || id < 0 || id >= pd_tokenizer_n_vocab(tok)) {
            fprintf(stderr, "pdctl tokenize: id %ld out of range [0, %d)\n", id,
                    (int)pd_tokenizer_n_vocab(tok));
            rc = 1;
            break;
        }
        size_t k = pd_detok_feed(&d, (int32_t)id, out, cap);
        fwrite(out, 1, k, stdout);
    }
    size_t k = pd_detok_flush(&d, out, cap);
    fwrite(out, 1, k, stdout);
    free(out);
    free(nums);
    return fflush(stdout) == 0 ? rc : 1;
}

int pd_cmd_tokenize(int argc, char **argv)
{
    opts_t o = {0};
    int rc = parse_args(argc, argv, &o);
    if (rc >= 0)
        return rc;
    char *in = NULL;
    size_t len = 0;
    if (o.from_stdin) {
        if (read_stdin(&in, &len) != 0)
            return 1;
    } else {
        len = strlen(o.prompt);
    }
    const char *text = o.from_stdin ? in : o.prompt;
    pd_gguf_t *g = NULL;
    pd_tokenizer_t *tok = NULL;
    rc = load_tokenizer(&o, &g, &tok);
    if (rc == 0)
        rc = o.decode ? do_decode(tok, text, len) : do_encode(tok, text, len, !o.no_bos);
    pd_tokenizer_destroy(&tok);
    pd_gguf_destroy(&g);
    free(in);
    return rc;
}
