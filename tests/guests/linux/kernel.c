/* leanvm's Linux-shaped test kernel: reports what the boot loader handed over.
 *
 * kmain gets struct boot_params (acpi_rsdp_addr at 0x070 and the setup header, offsets
 * 0x1f1-0x26b, are read) and prints the command line, the ACPI RSDP address and the initrd's
 * size, checksum (of its first 64 KiB) and first line on COM1, then
 * returns 0, which head.S writes to leanvm's exit port. */
#include "../runtime.h"

extern u32 entered_32;
extern u32 pvh_start_info;

static u32 rd32(const u8 *p) { return *(const u32 *)p; }

static u32 fnv1a(const u8 *p, u32 n)
{
    u32 h = 2166136261u;
    for (u32 i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static u64 rd64(const u8 *p) { return *(const u64 *)p; }

/* "leanvm.panic" on the command line: print Linux's panic line, then spin as a panicked
 * kernel does (the VMM is expected to notice and stop). */
static void maybe_panic(const char *cmdline)
{
    static const char word[] = "leanvm.panic";
    for (const char *p = cmdline; p && *p; p++) {
        unsigned i = 0;
        while (word[i] && p[i] == word[i])
            i++;
        if (!word[i]) {
            puts("\nKernel panic - not syncing: leanvm test kernel asked to panic\n");
            for (;;)
                __asm__ volatile("pause");
        }
    }
}

static int pvh_main(const u8 *si)
{
    puts("leanvm-test-kernel: entry pvh start_info=");
    put_hex((u64)si);
    puts("\nmagic: ");
    put_hex(rd32(si));
    puts("\ncmdline: ");
    u64 cmdline = rd64(si + 24);
    if (cmdline)
        puts((const char *)cmdline);
    maybe_panic((const char *)cmdline);
    puts("\nmemmap entries: ");
    put_dec(rd32(si + 48));
    puts("\nrsdp: ");
    put_hex(rd64(si + 32)); /* rsdp_paddr */
    u32 modules = rd32(si + 12);
    u64 initrd = 0, initrd_size = 0;
    if (modules) {
        const u8 *mod = (const u8 *)rd64(si + 16);
        initrd = rd64(mod);
        initrd_size = rd64(mod + 8);
    }
    puts("\ninitrd: ");
    put_dec(initrd_size);
    puts(" bytes at ");
    put_hex(initrd);
    if (initrd_size) {
        const u8 *data = (const u8 *)initrd;
        u32 hashed = initrd_size < 65536 ? (u32)initrd_size : 65536;
        puts(" fnv1a ");
        put_hex(fnv1a(data, hashed));
    }
    puts("\nleanvm-test-kernel: done\n");
    return 0;
}

int kmain(const u8 *bp)
{
    if (pvh_start_info)
        return pvh_main((const u8 *)(u64)pvh_start_info);
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
    maybe_panic((const char *)(u64)cmdline);
    puts("\nrsdp: ");
    put_hex(rd64(bp + 0x070)); /* acpi_rsdp_addr */
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
