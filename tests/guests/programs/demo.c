/* leanvm's bundled demo guest: greets, shows what the VMM handed it, and resets. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    puts("Hello from a leanvm guest!\n");
    puts("  running in 64-bit long mode with ");
    put_dec(info->ram_size >> 20);
    puts(" MiB of RAM\n");
    if (args_len) {
        puts("  arguments: ");
        puts(args);
        puts("\n");
    }
    puts("  resetting through the i8042 controller. Bye.\n");
    reset();
}
