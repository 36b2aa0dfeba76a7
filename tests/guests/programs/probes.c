/* Fires boot probes (docs/tracing.md). Arguments: "MMIO_ADDR" runs a fixed sequence of
 * debug-console lines, serial lines and probes (port and MMIO, with and without arguments);
 * "MMIO_ADDR N" instead fires N argument-less probes on port 0x404 as fast as it can. */
#include "runtime.h"

#define PROBE_PORT 0x404
#define DEBUGCON 0x402

static void debug_line(const char *s)
{
    while (*s)
        outb(DEBUGCON, (u8)*s++);
    outb(DEBUGCON, '\n');
}

static void probe(u32 id) { outl(PROBE_PORT, id); }
static void probe_arg(u32 v) { outl(PROBE_PORT + 4, v); }

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    u64 mmio = parse_hex(&args);
    u64 n = parse_hex(&args);
    if (inl(PROBE_PORT) != 0x4250564c)
        return 2; /* no probe device */
    if (n) {
        for (u64 i = 0; i < n; i++)
            probe(5000);
        return 0;
    }
    debug_line("probes: start");
    probe(1001);                       /* built-in name: BIOS post */
    probe_arg(1);
    probe_arg(2);
    probe_arg(0xdeadbeef);
    probe(7);                          /* named by the test's probe table */
    puts("probes: serial line\n");
    mmio_write32(mmio + 4, 0xabc);     /* the MMIO twin */
    mmio_write64(mmio, 9);
    debug_line("probes: done");
    for (int i = 0; i < 6; i++)        /* more arguments than the device keeps */
        probe_arg((u32)i);
    probe(8);
    return 0;
}
