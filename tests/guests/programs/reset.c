/* Says so, then resets through the i8042 the way Linux's reboot=k does. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    puts("resetting\n");
    reset();
}
