/* Never exits on its own: spins (argument "spin") or halts with interrupts off ("halt").
 * Used to test that the host can stop a guest that makes no exits. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    puts("spinning\n");
    if (streq(args, "halt"))
        for (;;) __asm__ volatile("cli; hlt");
    for (volatile u64 i = 0;; i++)
        ;
}
