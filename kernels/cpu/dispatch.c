/* placeholder: being written */
typedef int pd_placeholder_dispatch_t;
