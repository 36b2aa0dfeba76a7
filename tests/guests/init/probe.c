/* leanvm-probe ID [ARG...]: fire a leanvm boot probe from user space (docs/tracing.md).
 *
 * The default initramfs's /init runs it at its milestones. It asks for the 8 probe ports with
 * ioperm(2), queues up to four arguments at port 0x408 and fires ID at port 0x404. Numbers
 * are decimal or 0x-hex. System calls go through int 0x80 (sys32.h) so that it works on
 * hosts where SYSCALL from guest user mode does not (and needs CONFIG_IA32_EMULATION).
 */
#include "sys32.h"

static int parse(const char *s, unsigned *out) {
    unsigned base = 10, value = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return -1;
    for (; *s; s++) {
        unsigned digit;
        if (*s >= '0' && *s <= '9')
            digit = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            digit = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            digit = (unsigned)(*s - 'A' + 10);
        else
            return -1;
        if (value > (0xffffffffU - digit) / base)
            return -1;
        value = value * base + digit;
    }
    *out = value;
    return 0;
}

static unsigned values[5];  /* the id and up to four arguments */

int start_main(long *stack) {
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    if (argc < 2 || argc > 6) {
        write_str(2, "usage: leanvm-probe ID [ARG...] (at most 4 arguments)\n");
        return 2;
    }
    for (long i = 1; i < argc; i++) {
        if (parse(argv[i], &values[i - 1]) != 0) {
            write_str(2, "leanvm-probe: not a 32-bit number (decimal or 0x-hex)\n");
            return 2;
        }
    }
    int io = sys32(NR32_ioperm, PROBE_PORT, PROBE_PORTS, 1, 0);
    if (io < 0) {
        write_str(2, "leanvm-probe: ioperm(0x404) failed, errno ");
        write_str(2, decimal((unsigned)-io));
        write_str(2, "\n");
        return 1;
    }
    for (long i = 2; i < argc; i++)
        outl(values[i - 1], PROBE_ARG);
    outl(values[0], PROBE_PORT);
    return 0;
}
