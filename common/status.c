/* status.c - pd_status_str() from the X-macro list in status.h. */
#include "common/status.h"

const char *pd_status_str(pd_status_t status)
{
    switch (status) {
#define PD_STATUS_CASE_(name, value, text)                                               \
    case name:                                                                           \
        return text;
        PD_STATUS_LIST(PD_STATUS_CASE_)
#undef PD_STATUS_CASE_
    }
    return "unknown status";
}
