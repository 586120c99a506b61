/* placeholder: being written */
typedef int pd_placeholder_model_t;
