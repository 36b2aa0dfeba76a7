/* leanvm's test init: proves user space runs on a host where SYSCALL does not
 * (docs/facts.md#user-mode-cannot-enter-the-kernel).
 *
 * As PID 1 from an initramfs holding /dev/console, it writes a marker to fd 1, fires two
 * probes on port 0x404 (ioperm first) and powers the VM off with reboot(2), all through
 * int 0x80 (sys32.h). Every step reports on the console so a test can tell how far it got.
 */
#include "sys32.h"

#define PROBE_INIT_STARTED 3001   /* INIT_PROBES in src/leanvm/loader/initramfs.py */
#define PROBE_INIT_POWER_OFF 3003

static const char marker[] = "leanvm-test-init: user space is up (int 0x80)\n";

static void report(const char *what, int result) {
    write_str(1, "leanvm-test-init: ");
    write_str(1, what);
    if (result < 0) {
        write_str(1, " failed, errno ");
        write_str(1, decimal((unsigned)-result));
    } else {
        write_str(1, " ok");
    }
    write_str(1, "\n");
}

int start_main(long *stack) {
    (void)stack;
    int written = write_str(1, marker);
    if (written < 0)  /* no fd 1 (no /dev/console): say so on fd 2, the same console or none */
        report("write to fd 1", written);
    int io = sys32(NR32_ioperm, PROBE_PORT, PROBE_PORTS, 1, 0);
    report("ioperm(0x404)", io);
    if (io == 0) {
        outl(PROBE_INIT_STARTED, PROBE_PORT);
        outl(PROBE_INIT_POWER_OFF, PROBE_PORT);
        report("probes 3001 3003", 0);
    }
    write_str(1, "leanvm-test-init: powering off\n");
    int off = sys32(NR32_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                    LINUX_REBOOT_CMD_POWER_OFF, 0);
    report("reboot(POWER_OFF)", off);  /* only reached when reboot(2) failed */
    return 1;  /* init exits: the kernel panics, which also stops a test run */
}
