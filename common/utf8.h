/* utf8.h - strict UTF-8 checks (no overlongs, surrogates or code points past
 * U+10FFFF) shared by the tokenizer, the streaming decoder and the front ends that
 * must emit valid UTF-8 (JSON). Pure functions; any thread. */
#ifndef PD_UTF8_H
#define PD_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* Total length of a character starting with lead byte c, 0 if c cannot start one. */
int pd_utf8_lead_len(unsigned char c);
/* Whether b may be byte number pos (1..3) of a character led by lead. */
bool pd_utf8_cont_ok(unsigned char lead, int pos, unsigned char b);
/* Length of the valid character at s (n bytes available), 0 if it is not one. */
int pd_utf8_char_len(const unsigned char *s, size_t n);
bool pd_utf8_valid(const unsigned char *s, size_t n);
/* Copies s[0..n) to out, each byte that does not belong to a valid character
 * replaced by U+FFFD, and NUL-terminates. out needs 3 * n + 1 bytes. Returns the
 * output length. */
size_t pd_utf8_sanitize(const char *s, size_t n, char *out);

#endif
