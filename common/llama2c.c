/* placeholder: being written */
typedef int pd_placeholder_llama2c_t;
