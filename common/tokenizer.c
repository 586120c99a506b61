/* placeholder: being written */
typedef int pd_placeholder_tokenizer_t;
