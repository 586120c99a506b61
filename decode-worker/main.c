/* pd-decode: the decode worker (common/worker.h). */
#include "common/worker.h"

int main(int argc, char **argv)
{
    return pd_worker_main(argc, argv, PD_WORKER_DECODE);
}
