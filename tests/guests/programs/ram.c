/* Host <-> guest RAM: the host leaves a value at 0x200000 before start; the guest writes its
 * complement to 0x200008 and a marker to 0x200010. Exit status 0 if the host value was seen. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    volatile u64 *shared = (volatile u64 *)0x200000;
    u64 seen = shared[0];
    shared[1] = ~seen;
    shared[2] = 0x6775657374ULL; /* "guest" */
    return seen == 0x1122334455667788ULL ? 0 : 1;
}
