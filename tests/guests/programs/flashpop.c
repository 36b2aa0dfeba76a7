/* POPCNT with a memory operand on flash, in read-status mode and back in read-array mode:
 * on a host whose KVM cannot emulate it at CPL 0, the emulation fallback runs it, and must
 * read what a plain load would (the device's status, not the array). Argument: the flash
 * bank's base in hex. Prints "status-popcnt N" and "array-popcnt N". */
#include "runtime.h"

static void show(const char *name, u64 value)
{
    puts(name);
    putc(' ');
    put_hex(value);
    putc('\n');
}

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    const char *p = args;
    u64 base = parse_hex(&p);
    u64 r;
    mmio_write8(base, 0x70); /* CFI: read status register */
    __asm__ volatile("popcnt (%%rbx), %%rax" : "=a"(r) : "b"(base) : "memory");
    show("status-popcnt", r);
    mmio_write8(base, 0xff); /* CFI: read array */
    __asm__ volatile("popcnt (%%rbx), %%rax" : "=a"(r) : "b"(base) : "memory");
    show("array-popcnt", r);
    return 0;
}
