/* status.h - the one status type of pdserve.
 *
 * 0 is success, negative values are failures, a few positive values drive state
 * machines. The enum and pd_status_str() come from one X-macro list so they never
 * drift apart. Thread-safe: pure functions. */
#ifndef PD_STATUS_H
#define PD_STATUS_H

#ifdef __cplusplus
extern "C" { /* also included by the CUDA backend (C++) */
#endif

#define PD_STATUS_LIST(X)                                                                \
    X(PD_OK, 0, "ok")                                                                    \
    X(PD_AGAIN, 1, "try again")                                                          \
    X(PD_INPROGRESS, 2, "in progress")                                                   \
    X(PD_ERR_INVALID, -1, "invalid argument")                                            \
    X(PD_ERR_NOMEM, -2, "out of memory")                                                 \
    X(PD_ERR_IO, -3, "i/o error")                                                        \
    X(PD_ERR_FORMAT, -4, "malformed input")                                              \
    X(PD_ERR_UNSUPPORTED, -5, "unsupported")                                             \
    X(PD_ERR_NOT_FOUND, -6, "not found")                                                 \
    X(PD_ERR_RANGE, -7, "out of range")                                                  \
    X(PD_ERR_OVERFLOW, -8, "size overflow")                                              \
    X(PD_ERR_INTERNAL, -9, "internal error")

typedef enum pd_status {
#define PD_STATUS_ENUM_(name, value, text) name = value,
    PD_STATUS_LIST(PD_STATUS_ENUM_)
#undef PD_STATUS_ENUM_
} pd_status_t;

/* A static, lowercase description; "unknown status" for values not in the list. */
const char *pd_status_str(pd_status_t status);

#ifdef __cplusplus
}
#endif

#endif
