/* pdctl.h - the subcommands of pdctl, one file each (tools/pdctl_<cmd>.c).
 * Each takes the arguments after the subcommand name (argv[0] is the subcommand)
 * and returns the process exit status: 0 ok, 1 runtime failure, 2 usage error. */
#ifndef PD_PDCTL_H
#define PD_PDCTL_H

int pd_cmd_generate(int argc, char **argv);
int pd_cmd_tokenize(int argc, char **argv);
int pd_cmd_mkmodel(int argc, char **argv);

#endif
