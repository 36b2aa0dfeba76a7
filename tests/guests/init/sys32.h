/* System calls through `int 0x80` (the i386 ABI) from a static 64-bit program, and port output.
 *
 * Why int 0x80: on leanvm's development host (nested KVM), SYSCALL from guest user mode never
 * reaches the guest kernel (docs/facts.md#user-mode-cannot-enter-the-kernel), while
 * interrupts from CPL 3 do. A 64-bit kernel with
 * CONFIG_IA32_EMULATION accepts int 0x80 from any process: eax = number (i386 table,
 * arch/x86/entry/syscalls/syscall_32.tbl), arguments in ebx, ecx, edx, esi, edi; result in
 * eax. Only the low 32 bits of each register are read, so every pointer passed must lie below
 * 4 GiB: use strings and buffers in .rodata/.data/.bss of this non-PIE binary (linked at
 * 0x400000), never on the stack (near the top of the 47-bit user address space).
 */
#ifndef LEANVM_SYS32_H
#define LEANVM_SYS32_H

#define NR32_exit 1      /* i386 syscall_32.tbl */
#define NR32_write 4
#define NR32_reboot 88
#define NR32_ioperm 101

#define LINUX_REBOOT_MAGIC1 0xfee1deadU  /* include/uapi/linux/reboot.h */
#define LINUX_REBOOT_MAGIC2 672274793U   /* 0x28121969 */
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321FEDCU

#define PROBE_PORT 0x404  /* leanvm's probe device (docs/tracing.md): outl(id) fires */
#define PROBE_ARG 0x408   /* offset 4: queue one argument for the next probe */
#define PROBE_PORTS 8

static inline int sys32(unsigned nr, unsigned a, unsigned b, unsigned c, unsigned d) {
    int ret;
    /* r8-r11 are clobbered by int 0x80 from 64-bit code on older kernels. */
    __asm__ volatile("int $0x80"
                     : "=a"(ret)
                     : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d)
                     : "memory", "r8", "r9", "r10", "r11");
    return ret;
}

static inline unsigned low32(const void *p) {
    return (unsigned)(unsigned long)p;  /* callers pass .rodata/.data/.bss addresses only */
}

static inline void outl(unsigned value, unsigned short port) {
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned length(const char *s) {
    unsigned n = 0;
    while (s[n])
        n++;
    return n;
}

static inline int write_str(int fd, const char *s) {
    return sys32(NR32_write, (unsigned)fd, low32(s), length(s), 0);
}

/* Decimal of a non-negative number into a static buffer (below 4 GiB), for messages. */
static inline const char *decimal(unsigned value) {
    static char digits[12];
    char *p = digits + sizeof digits - 1;
    *p = 0;
    do {
        *--p = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    return p;
}

static inline void __attribute__((noreturn)) sys_exit(int status) {
    for (;;)
        sys32(NR32_exit, (unsigned)status, 0, 0, 0);
}

#endif
