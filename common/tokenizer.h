/* tokenizer.h - SentencePiece BPE (byte fallback, dummy-prefix space) and a
 * streaming, UTF-8-safe decoder.
 *
 * Encoding follows llama2.c's encode() / SentencePiece BPE: a dummy-prefix space is
 * added to non-empty text, the text is split into UTF-8 characters (each looked up
 * as a piece, else byte-fallback <0xNN> tokens, else UNK when the vocabulary has no
 * byte tokens), then the adjacent pair whose merged piece has the highest score is
 * merged until none can be. Invalid UTF-8 is encoded byte by byte, never rejected.
 * Pieces are stored with spaces (SentencePiece's U+2581 is converted at load).
 * Ownership: the tokenizer owns copies of all its pieces. Threading: immutable after
 * construction; encode/decode may run concurrently from any thread. */
#ifndef PD_TOKENIZER_H
#define PD_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/gguf.h"
#include "common/status.h"

typedef struct pd_tokenizer pd_tokenizer_t;

/* llama2.c tokenizer.bin (int32 max_token_length, then per token: f32 score,
 * int32 len, bytes). vocab_size comes from the model header (the file does not
 * store it; the file must hold exactly that many records); vocab_size <= 0 takes
 * every record the file holds. BOS 1, EOS 2, UNK 0. */
pd_status_t pd_tokenizer_load_bin(const char *path, int32_t vocab_size,
                                  pd_tokenizer_t **tok_p);
/* tokenizer.ggml.{model,tokens,scores,token_type,bos_token_id,eos_token_id,
 * unknown_token_id,add_space_prefix} from a GGUF file; model must be "llama". */
pd_status_t pd_tokenizer_from_gguf(const pd_gguf_t *g, pd_tokenizer_t **tok_p);
void pd_tokenizer_destroy(pd_tokenizer_t **tok_p);

int32_t pd_tokenizer_n_vocab(const pd_tokenizer_t *tok);
int32_t pd_tokenizer_bos(const pd_tokenizer_t *tok);
int32_t pd_tokenizer_eos(const pd_tokenizer_t *tok);
size_t pd_tokenizer_max_piece_len(const pd_tokenizer_t *tok);
/* The merge score of id, and its GGUF token type (1 normal, 2 unknown, 3 control,
 * 4 user-defined, 5 unused, 6 byte); 0 for an id out of range. */
float pd_tokenizer_score(const pd_tokenizer_t *tok, int32_t id);
int pd_tokenizer_type(const pd_tokenizer_t *tok, int32_t id);
/* The piece's bytes as stored (byte tokens as "<0xNN>"); NULL for an id out of range. */
const char *pd_tokenizer_piece(const pd_tokenizer_t *tok, int32_t id, size_t *len_p);

/* Encodes len bytes of text (need not be NUL-terminated, may be invalid UTF-8).
 * Writes at most cap ids; *n_p is the full count. PD_ERR_RANGE when cap was too
 * small (ids holds the first cap). Allocates scratch internally. */
pd_status_t pd_tokenizer_encode(const pd_tokenizer_t *tok, const char *text, size_t len,
                                bool add_bos, int32_t *ids, size_t cap, size_t *n_p);

/* Streaming decoder: a value type kept by the caller. Bytes of a UTF-8 character
 * split across tokens are held back until the character is complete; a byte that
 * can never complete one is emitted as U+FFFD. The leading space of the first
 * piece after BOS (the dummy prefix) is dropped, as SentencePiece does. */
typedef struct pd_detok {
    const pd_tokenizer_t *tok;
    int32_t prev;          /* previous token id, -1 at start */
    unsigned char pend[8]; /* bytes of an incomplete UTF-8 character */
    int n_pend;
} pd_detok_t;

void pd_detok_init(pd_detok_t *d, const pd_tokenizer_t *tok);
/* Appends the text completed by token id to out (at most cap bytes, NUL-terminated
 * when cap > 0), returns the number of bytes written. A cap of at least
 * pd_tokenizer_max_piece_len(tok) + 16 always suffices. Ids out of range decode to
 * nothing. */
size_t pd_detok_feed(pd_detok_t *d, int32_t id, char *out, size_t cap);
/* Emits whatever is pending (as U+FFFD for an incomplete character). */
size_t pd_detok_flush(pd_detok_t *d, char *out, size_t cap);

#endif
