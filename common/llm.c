/* placeholder: being written */
typedef int pd_placeholder_llm_t;
