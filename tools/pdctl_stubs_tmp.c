/* Temporary weak fallbacks while the subcommands are written in parallel. */
#include <stdio.h>
#include "tools/pdctl.h"
#define STUB(fn) __attribute__((weak)) int fn(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "pdctl: not built yet\n"); return 1; }
STUB(pd_cmd_generate)
STUB(pd_cmd_tokenize)
STUB(pd_cmd_mkmodel)
