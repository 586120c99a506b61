/* golden.c - reads the golden .jsonl files with json-c (see golden.h).
 * Threading: single-threaded. */
#define _GNU_SOURCE /* getline */
#include "support/golden.h"

#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "support/pdcheck.h"

/* The member key of o, which must be of type type. */
static json_object *field(json_object *o, const char *key, json_type type,
                          const char *where)
{
    json_object *v = NULL;
    ck_assert_msg(json_object_object_get_ex(o, key, &v), "%s: no %s", where, key);
    ck_assert_msg(json_object_is_type(v, type), "%s: %s is a %s, not a %s", where, key,
                  json_type_to_name(json_object_get_type(v)), json_type_to_name(type));
    return v;
}

static char *string_field(json_object *o, const char *key, size_t *len_p,
                          const char *where)
{
    json_object *v = field(o, key, json_type_string, where);
    size_t len = (size_t)json_object_get_string_len(v);
    char *s = malloc(len + 1);
    ck_assert_ptr_nonnull(s);
    memcpy(s, json_object_get_string(v), len);
    s[len] = '\0';
    *len_p = len;
    return s;
}

/* Appends the integers of the array member key to ids (cap grows); returns how many. */
static size_t ids_field(json_object *o, const char *key, int32_t **ids, size_t *n,
                        size_t *cap, const char *where)
{
    json_object *a = field(o, key, json_type_array, where);
    size_t len = json_object_array_length(a);
    if (*n + len > *cap) {
        *cap = *n + len;
        *ids = realloc(*ids, *cap * sizeof **ids);
        ck_assert_ptr_nonnull(*ids);
    }
    for (size_t i = 0; i < len; i++) {
        json_object *e = json_object_array_get_idx(a, i);
        ck_assert_msg(json_object_is_type(e, json_type_int), "%s: %s[%zu] is no integer",
                      where, key, i);
        int64_t v = json_object_get_int64(e);
        ck_assert_msg(v >= INT32_MIN && v <= INT32_MAX, "%s: %s[%zu] out of range", where,
                      key, i);
        (*ids)[(*n)++] = (int32_t)v;
    }
    return len;
}

static void parse_line(const char *line, const char *where, pd_test_golden_t *g)
{
    enum json_tokener_error err;
    json_object *o = json_tokener_parse_verbose(line, &err);
    ck_assert_msg(o != NULL, "%s: %s", where, json_tokener_error_desc(err));
    ck_assert_msg(json_object_is_type(o, json_type_object), "%s: not an object", where);
    *g = (pd_test_golden_t){0};
    g->prompt = string_field(o, "prompt", &g->prompt_len, where);
    size_t cap = 0;
    g->n_prompt = ids_field(o, "prompt_ids", &g->ids, &g->n_ids, &cap, where);
    ids_field(o, "greedy_ids", &g->ids, &g->n_ids, &cap, where);
    ck_assert_msg(g->n_prompt > 0, "%s: no prompt_ids", where);
    g->run_c_stdout = string_field(o, "run_c_stdout", &g->stdout_len, where);
    json_object_put(o);
}

int pd_test_golden_read(const char *name, pd_test_golden_t **lines_p)
{
    const char *path = pd_test_shared_path("golden", name);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    pd_test_golden_t *lines = NULL;
    int n = 0;
    char *line = NULL;
    size_t line_cap = 0;
    for (int line_no = 1; getline(&line, &line_cap, f) >= 0; line_no++) {
        if (line[strspn(line, " \t\r\n")] == '\0')
            continue;
        char where[512];
        snprintf(where, sizeof where, "%s line %d", name, line_no);
        lines = realloc(lines, (size_t)(n + 1) * sizeof *lines);
        ck_assert_ptr_nonnull(lines);
        parse_line(line, where, &lines[n++]);
    }
    free(line);
    fclose(f);
    ck_assert_msg(n > 0, "%s holds no lines", path);
    *lines_p = lines;
    return n;
}

void pd_test_golden_free(pd_test_golden_t **lines_p, int n)
{
    pd_test_golden_t *lines = *lines_p;
    if (!lines)
        return;
    for (int i = 0; i < n; i++) {
        free(lines[i].prompt);
        free(lines[i].ids);
        free(lines[i].run_c_stdout);
    }
    free(lines);
    *lines_p = NULL;
}
