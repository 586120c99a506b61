/* pd-prefill: the prefill worker (common/worker.h). */
#include "common/worker.h"

int main(int argc, char **argv)
{
    return pd_worker_main(argc, argv, PD_WORKER_PREFILL);
}
