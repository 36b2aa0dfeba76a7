/* A read-only region at 0xe0000000 holds host data: reads come from memory, a write must
 * trap to the VMM (an MMIO write) and leave memory unchanged. Exit 0 when all holds. */
#include "runtime.h"

#define ROM 0xe0000000UL

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    int fail = 0;
    if (mmio_read64(ROM) != 0x1122334455667788UL) fail |= 1;
    mmio_write8(ROM + 0x10, 0xab);
    mmio_write32(ROM + 0x20, 0xdeadbeef);
    if (mmio_read8(ROM + 0x10) != 0x5a) fail |= 2;
    if (mmio_read32(ROM + 0x20) != 0x5a5a5a5a) fail |= 4;
    return fail;
}
