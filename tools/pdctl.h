/* pdctl.h - the subcommands of pdctl, one file each (tools/pdctl_<cmd>.c).
 * Each takes the arguments after the subcommand name (argv[0] is the subcommand)
 * and returns the process exit status: 0 ok, 1 runtime failure, 2 usage error. */
#ifndef PD_PDCTL_H
#define PD_PDCTL_H

int pd_cmd_generate(int argc, char **argv);
int pd_cmd_tokenize(int argc, char **argv);
int pd_cmd_mkmodel(int argc, char **argv);
#ifdef PD_HAVE_SERVICE /* the client of a running router (libpdclient) */
int pd_cmd_up(int argc, char **argv);
int pd_cmd_complete(int argc, char **argv);
int pd_cmd_bench(int argc, char **argv);
#endif

#endif
