/* placeholder: being written */
typedef int pd_placeholder_gguf_t;
