/* Executes INT3 at CPL 0 with no IDT: on a host whose KVM emulates supervisor code and
 * cannot emulate INT3, this is a KVM internal error (emulation failure) with the byte 0xcc. */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    puts("before int3\n");
    __asm__ volatile("int3");
    puts("after int3\n");
    return 0;
}
