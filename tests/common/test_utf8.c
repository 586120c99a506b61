/* test_utf8.c - strict UTF-8 checks and the sanitizer that keeps JSON output valid. */
#include <check.h>
#include <string.h>

#include "common/utf8.h"
#include "tests/support/pdcheck.h"

static bool valid(const char *s)
{
    return pd_utf8_valid((const unsigned char *)s, strlen(s));
}

START_TEST(valid_and_invalid)
{
    ck_assert(valid("plain ascii"));
    ck_assert(valid("caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80")); /* é 中 😀 */
    ck_assert(!valid("\xc3"));                                     /* truncated */
    ck_assert(!valid("\x80"));             /* stray continuation */
    ck_assert(!valid("\xc0\xaf"));         /* overlong '/' */
    ck_assert(!valid("\xe0\x80\xaf"));     /* overlong, 3 bytes */
    ck_assert(!valid("\xed\xa0\x80"));     /* surrogate U+D800 */
    ck_assert(!valid("\xf4\x90\x80\x80")); /* past U+10FFFF */
    ck_assert(!valid("\xff"));
    ck_assert_int_eq(pd_utf8_char_len((const unsigned char *)"\xf0\x9f\x98\x80", 4), 4);
    ck_assert_int_eq(pd_utf8_char_len((const unsigned char *)"\xf0\x9f\x98\x80", 3), 0);
}
END_TEST

START_TEST(sanitize_replaces_each_bad_byte)
{
    char out[64];
    const char *in = "a\xff\xfe b \xc3";
    size_t n = pd_utf8_sanitize(in, strlen(in), out);
    ck_assert_str_eq(out, "a\xef\xbf\xbd\xef\xbf\xbd b \xef\xbf\xbd");
    ck_assert_uint_eq(n, strlen(out));
    ck_assert(valid(out));
    const char *good = "caf\xc3\xa9 \xf0\x9f\x98\x80";
    pd_utf8_sanitize(good, strlen(good), out);
    ck_assert_str_eq(out, good); /* valid text passes through untouched */
    pd_utf8_sanitize("", 0, out);
    ck_assert_str_eq(out, "");
}
END_TEST

int main(void)
{
    TCase *tc = pd_test_tcase("core", 0, NULL, NULL);
    PD_TEST_ADD(tc, valid_and_invalid, sanitize_replaces_each_bad_byte);
    return pd_test_run("utf8", tc);
}
