/* MMIO of every size to a test device at 0xd0000000. The device answers a read at offset o
 * of size s with (0x0807060504030201 + o) truncated to s bytes. Exit status: one bit per
 * failed read check. */
#include "runtime.h"

#define DEV 0xd0000000UL
#define EXPECT(o) (0x0807060504030201UL + (o))

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    int fail = 0;
    mmio_write8(DEV + 0x01, 0x11);
    mmio_write16(DEV + 0x12, 0x2222);
    mmio_write32(DEV + 0x24, 0x33333333);
    mmio_write64(DEV + 0x48, 0x4444444444444444UL);
    if (mmio_read8(DEV + 0x03) != (u8)EXPECT(0x03)) fail |= 1;
    if (mmio_read16(DEV + 0x14) != (u16)EXPECT(0x14)) fail |= 2;
    if (mmio_read32(DEV + 0x28) != (u32)EXPECT(0x28)) fail |= 4;
    if (mmio_read64(DEV + 0x50) != EXPECT(0x50)) fail |= 8;
    /* past the device's end: nothing claims it, reads as all ones */
    if (mmio_read32(DEV + 0x1000) != 0xffffffffU) fail |= 16;
    return fail;
}
