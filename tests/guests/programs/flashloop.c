/* Rewrites flash blocks forever, each with a generation stamp, for the kill -9 test.
 * Arguments: "BASE BLOCKS" in hex (pc geometry: byte accesses, 4 KiB blocks). Each
 * generation erases a block and programs all of it with 256-byte buffered writes, then
 * returns to read-array mode (which is when leanvm persists the block). */
#include "runtime.h"

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    const char *p = args;
    u64 base = parse_hex(&p), blocks = parse_hex(&p);
    for (u32 gen = 1;; gen++) {
        for (u64 b = 0; b < blocks; b++) {
            u64 block = base + b * 4096;
            mmio_write8(block, 0x20);
            mmio_write8(block, 0xd0);
            for (u64 chunk = 0; chunk < 4096; chunk += 256) {
                mmio_write8(block + chunk, 0xe8);
                mmio_write8(block + chunk, 255);
                for (u64 i = 0; i < 256; i++)
                    mmio_write8(block + chunk + i, (u8)(gen >> (8 * (i & 3))));
                mmio_write8(block + chunk, 0xd0);
            }
            mmio_write8(block, 0xff);
        }
        puts("gen ");
        put_dec(gen);
        putc('\n');
    }
}
