/* placeholder: being written */
typedef int pd_placeholder_sampler_t;
