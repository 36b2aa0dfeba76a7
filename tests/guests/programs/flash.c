/* Drives a CFI01 flash bank through MMIO and prints what it sees as key=value lines.
 * Arguments: "BASE IMAGE_SIZE" in hex, for a pc-geometry bank (byte-wide accesses).
 * Offsets used (relative to BASE): program 0x100, buffer 0x200, erase 0x3000 (a 4 KiB
 * sector), lock 0x5000, and IMAGE_SIZE + 0x10 (erased flash past the image, if any). */
#include "runtime.h"

static u64 base;
static void w(u64 off, u8 v) { mmio_write8(base + off, v); }
static u8 r(u64 off) { return mmio_read8(base + off); }
static void kv(const char *key, u64 value) { puts(key); putc('='); put_hex(value); putc('\n'); }

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    const char *p = args;
    base = parse_hex(&p);
    u64 image = parse_hex(&p);

    kv("array0", r(0));
    w(0x55, 0x98);                                   /* CFI query */
    kv("qry", (u64)r(0x10) << 16 | (u64)r(0x11) << 8 | r(0x12));
    kv("size_log2", r(0x27));
    kv("blocks_minus_1", (u64)r(0x2e) << 8 | r(0x2d));
    kv("block_size_256", (u64)r(0x30) << 8 | r(0x2f));
    kv("buffer_log2", r(0x2a));
    kv("pri", (u64)r(0x31) << 16 | (u64)r(0x32) << 8 | r(0x33));
    w(0, 0xff);
    kv("array0_after_query", r(0));

    w(0, 0x90);                                      /* identifier */
    kv("id", (u64)r(0) << 8 | r(1));
    w(0, 0xff);

    w(0x100, 0x40);                                  /* program one byte */
    w(0x100, 0x5a);
    kv("program_status", r(0));
    w(0, 0xff);
    kv("programmed", r(0x100));

    const char *text = "leanvm!!";                   /* write to buffer: 8 bytes */
    w(0x200, 0xe8);
    w(0x200, 7);
    for (int i = 0; i < 8; i++)
        w(0x200 + (u64)i, (u8)text[i]);
    w(0x200, 0xd0);
    kv("buffer_status", r(0));
    w(0, 0xff);
    u64 got = 0;
    for (int i = 7; i >= 0; i--)
        got = got << 8 | r(0x200 + (u64)i);
    kv("buffered", got);

    w(0x3000, 0x20);                                 /* block erase */
    w(0x3000, 0xd0);
    kv("erase_status", r(0));
    w(0, 0xff);
    kv("erased", (u64)r(0x3000) << 8 | r(0x3fff));

    w(0x5000, 0x60);                                 /* lock, then try to program */
    w(0x5000, 0x01);
    w(0x5010, 0x40);
    w(0x5010, 0x00);
    kv("locked_status", r(0));
    w(0, 0x50);
    w(0x5000, 0x60);                                 /* unlock all */
    w(0x5000, 0xd0);
    w(0, 0xff);
    kv("lock_kept", r(0x5010));

    w(image + 0x10, 0x40);                           /* past the image */
    w(image + 0x10, 0x00);
    kv("past_status", r(0));
    w(0, 0x50);
    kv("past_read", (u64)r(image + 0x10));

    kv("isa_window", mmio_read8(0x100000 - 0x10));   /* the last bytes of bank 0 at 0xfffxx */
    kv("top_of_4g", mmio_read8(0x100000000UL - 0x10));
    return 0;
}
