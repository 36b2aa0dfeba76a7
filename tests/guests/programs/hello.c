/* Prints a greeting, its arguments and what the boot info says; exits with status 0. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    puts("hello from a bare guest\n");
    puts("args=[");
    puts(args);
    puts("] len=");
    put_dec(args_len);
    puts(" ram=");
    put_dec(info->ram_size);
    puts(" magic=");
    put_hex(info->magic);
    puts("\n");
    return info->magic == 0x424d564c && info->version == 1 ? 0 : 1;
}
