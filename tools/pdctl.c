/* pdctl.c - the user's front door: dispatches to one subcommand per file
 * (tools/pdctl_<cmd>.c). Single-threaded; each subcommand owns its process. */
#include <stdio.h>
#include <string.h>

#include "tools/pdctl.h"

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} command_t;

static const command_t commands[] = {
    {"generate", pd_cmd_generate, "generate text from a model in this process"},
    {"tokenize", pd_cmd_tokenize, "print a prompt's token ids"},
    {"mkmodel", pd_cmd_mkmodel, "write a random-weight GGUF model for benchmarks"},
#ifdef PD_HAVE_SERVICE
    {"up", pd_cmd_up, "start a local cluster: router, prefill and decode workers"},
    {"complete", pd_cmd_complete, "one completion from a running router"},
    {"bench", pd_cmd_bench, "load a running router and report latency and throughput"},
#endif
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pdctl <command> [options]   (pdctl <command> --help)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "pdctl: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
