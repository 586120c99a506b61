/* utf8.c - see utf8.h. */
#include "common/utf8.h"

#include <string.h>

int pd_utf8_lead_len(unsigned char c)
{
    if (c < 0x80)
        return 1;
    if (c < 0xC2)
        return 0;
    if (c < 0xE0)
        return 2;
    if (c < 0xF0)
        return 3;
    if (c < 0xF5)
        return 4;
    return 0;
}

/* Excludes overlongs (E0 80.., F0 80..), surrogates (ED A0..) and code points past
 * U+10FFFF (F4 90..) through the range allowed for the first continuation byte. */
bool pd_utf8_cont_ok(unsigned char lead, int pos, unsigned char b)
{
    unsigned char lo = 0x80, hi = 0xBF;
    if (pos == 1) {
        if (lead == 0xE0)
            lo = 0xA0;
        else if (lead == 0xED)
            hi = 0x9F;
        else if (lead == 0xF0)
            lo = 0x90;
        else if (lead == 0xF4)
            hi = 0x8F;
    }
    return b >= lo && b <= hi;
}

int pd_utf8_char_len(const unsigned char *s, size_t n)
{
    int k = pd_utf8_lead_len(s[0]);
    if (k == 0 || (size_t)k > n)
        return 0;
    for (int i = 1; i < k; i++)
        if (!pd_utf8_cont_ok(s[0], i, s[i]))
            return 0;
    return k;
}

bool pd_utf8_valid(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        int k = pd_utf8_char_len(s + i, n - i);
        if (k == 0)
            return false;
        i += (size_t)k;
    }
    return true;
}

size_t pd_utf8_sanitize(const char *s, size_t n, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        int k = pd_utf8_char_len(u + i, n - i);
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, s + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        }
    }
    out[o] = 0;
    return o;
}
