/* leanvm's Linux-shaped test kernel: reports what the boot loader handed over.
 *
 * kmain gets struct boot_params (only the setup header, offsets 0x1f1-0x26b, is read) and
 * prints the command line and the initrd's size, checksum (of its first 64 KiB) and first
 * line on COM1, then
 * returns 0, which head.S writes to leanvm's exit port. */
#include "../runtime.h"

extern u32 entered_32;

static u32 rd32(const u8 *p) { return *(const u32 *)p; }

static u32 fnv1a(const u8 *p, u32 n)
{
    u32 h = 2166136261u;
    for (u32 i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

int kmain(const u8 *bp)
{
    puts("leanvm-test-kernel: entry ");
    puts(entered_32 ? "32-bit" : "64-bit");
    puts(" boot_params=");
    put_hex((u64)bp);
    puts("\nloader: ");
    put_hex(bp[0x210]);
    puts("\ncmdline: ");
    u32 cmdline = rd32(bp + 0x228);
    if (cmdline)
        puts((const char *)(u64)cmdline);
    u32 initrd = rd32(bp + 0x218), initrd_size = rd32(bp + 0x21c);
    puts("\ninitrd: ");
    put_dec(initrd_size);
    puts(" bytes at ");
    put_hex(initrd);
    if (initrd_size) {
        const u8 *data = (const u8 *)(u64)initrd;
        /* guest kernel code is emulated on some hosts: hash at most the first 64 KiB */
        u32 hashed = initrd_size < 65536 ? initrd_size : 65536;
        puts(" fnv1a ");
        put_hex(fnv1a(data, hashed));
        puts("\ninitrd text: ");
        for (u32 i = 0; i < initrd_size && i < 80 && data[i] != '\n'; i++)
            putc(data[i] >= 0x20 && data[i] < 0x7f ? (char)data[i] : '.');
    }
    puts("\nleanvm-test-kernel: done\n");
    return 0;
}
