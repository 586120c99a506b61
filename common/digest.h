/* digest.h - a model's identity for the service: an XXH3-128 digest of its
 * configuration, every weight tensor's dtype, shape and bytes, and its vocabulary
 * (pieces, scores, types). Two workers serving the same model compute the same
 * digest whatever the file's name or container (GGUF or llama2.c) copy they load;
 * the router refuses a worker whose digest is not its own model's.
 * Reads every weight page once (about 0.1 s per GB). Threading: any thread. */
#ifndef PD_DIGEST_H
#define PD_DIGEST_H

#include <stdint.h>

#include "common/model.h"

#define PD_DIGEST_BYTES 16

void pd_model_digest(const pd_model_t *model, uint8_t out[PD_DIGEST_BYTES]);
/* 32 lowercase hex digits and a NUL. */
void pd_digest_hex(const uint8_t d[PD_DIGEST_BYTES], char out[2 * PD_DIGEST_BYTES + 1]);

#endif
