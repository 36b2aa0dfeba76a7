/* Writes its loop index to port 0x80 N times (N from the arguments, default 100000),
 * then exits with status 0. Used by the exit-cost benchmark and the ioeventfd test. */
#include "runtime.h"

static u64 parse(const char *s, u64 fallback)
{
    u64 v = 0;
    if (!*s)
        return fallback;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    u64 n = parse(args, 100000);
    for (u64 i = 0; i < n; i++)
        outl(0x80, (u32)i);
    return 0;
}
