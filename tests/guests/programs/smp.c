/* SMP bring-up the way an OS does it: the bootstrap processor (BSP) copies a real-mode
 * trampoline below 1 MiB and starts every application processor (AP) with INIT, SIPI, SIPI
 * through its xAPIC (MMIO at 0xfee00000, KVM's in-kernel local APIC; Intel SDM vol. 3,
 * 8.4.4 "MP initialization example"). Each AP reads its initial APIC id (CPUID leaf 1
 * EBX[31:24]) and x2APIC id (leaf 0xb EDX), reports both on port 0x700, stores them in a
 * table, counts itself in, and halts. The BSP learns the vCPU count from CPUID leaf 0xb
 * (core level), waits for every AP and prints the table; status 0 when all reported.
 *
 * Argument "ap-exit": the APs end the VM themselves (exit port, status 0x40 + APIC id)
 * while the BSP spins forever, so the host must stop a vCPU that makes no exits.
 * Argument "ap-fault": the APs load an empty real-mode IDT and execute INT 0x10 (a triple fault,
 * KVM_EXIT_SHUTDOWN on that vCPU) while the BSP spins. */
#include "runtime.h"

#define LAPIC 0xfee00000UL
#define LAPIC_ID 0x020
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_ALL_BUT_SELF (3u << 18)  /* destination shorthand */
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)           /* delivery mode */
#define ICR_STARTUP (6u << 8)
#define ICR_PENDING (1u << 12)       /* delivery status */
#define TRAMPOLINE 0x10000UL         /* SIPI vector 0x10: the AP starts at 1000:0000 */
#define AP_FLAGS (TRAMPOLINE + 0x7f8)
#define AP_COUNT (TRAMPOLINE + 0x7fc)
#define AP_TABLE (TRAMPOLINE + 0x800) /* u32 per APIC id */
#define REPORT_PORT 0x700

extern const u8 trampoline_start[], trampoline_end[];

/* Real mode, CS = 0x1000 (base 0x10000), so offsets from trampoline_start are addresses. */
__asm__(
    ".pushsection .rodata.trampoline, \"a\"\n"
    ".code16\n"
    ".globl trampoline_start, trampoline_end\n"
    "trampoline_start:\n"
    "    cli\n"
    "    mov %cs, %ax\n"
    "    mov %ax, %ds\n"
    "    mov $1, %eax\n"
    "    cpuid\n"
    "    shr $24, %ebx\n"              /* initial APIC id */
    "    mov %ebx, %esi\n"
    "    mov $0xb, %eax\n"
    "    xor %ecx, %ecx\n"
    "    cpuid\n"                      /* EDX: x2APIC id */
    "    shl $8, %edx\n"
    "    or %esi, %edx\n"
    "    or $0xa5000000, %edx\n"       /* marker | x2APIC id << 8 | APIC id */
    "    mov %edx, %eax\n"
    "    mov $0x700, %dx\n"
    "    out %eax, %dx\n"
    "    mov %si, %bx\n"
    "    shl $2, %bx\n"
    "    mov %eax, 0x800(%bx)\n"
    "    lock incl 0x7fc\n"
    "    testl $2, 0x7f8\n"
    "    jz 2f\n"
    "    lidt 0x7f0\n"                 /* limit 0: every exception faults again */
    "    int $0x10\n"
    "2:  testl $1, 0x7f8\n"
    "    jz 1f\n"
    "    mov %esi, %eax\n"
    "    or $0x40, %eax\n"
    "    mov $0xf4, %dx\n"
    "    out %eax, %dx\n"              /* ap-exit: end the VM from this AP */
    "1:  hlt\n"
    "    jmp 1b\n"
    "trampoline_end:\n"
    ".code64\n"
    ".popsection\n");

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static void send_ipi(u32 command)
{
    mmio_write32(LAPIC + LAPIC_ICR_HI, 0);
    mmio_write32(LAPIC + LAPIC_ICR_LO, command);
    while (mmio_read32(LAPIC + LAPIC_ICR_LO) & ICR_PENDING)
        ;
}

static void delay(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        __asm__ volatile("pause");
}

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    volatile u32 *count = (volatile u32 *)AP_COUNT;
    volatile u32 *table = (volatile u32 *)AP_TABLE;
    u32 a, b, c, d;
    int ap_exit = streq(args, "ap-exit"), ap_fault = streq(args, "ap-fault");

    for (u64 i = 0; i < (u64)(trampoline_end - trampoline_start); i++)
        ((volatile u8 *)TRAMPOLINE)[i] = trampoline_start[i];
    for (int i = 0; i < 256; i++)
        table[i] = 0;
    *count = 0;
    *(volatile u32 *)AP_FLAGS = ap_exit | ap_fault << 1;
    *(volatile u64 *)(TRAMPOLINE + 0x7f0) = 0;  /* the empty IDT register image for ap-fault */

    cpuid(0xb, 1, &a, &b, &c, &d);
    u32 cpus = b & 0xffff;
    u32 bsp = mmio_read32(LAPIC + LAPIC_ID) >> 24;
    cpuid(1, 0, &a, &b, &c, &d);
    puts("bsp apic ");
    put_dec(bsp);
    puts(" cpuid ");
    put_dec(b >> 24);
    puts(" cpus ");
    put_dec(cpus);
    puts("\n");

    mmio_write32(LAPIC + LAPIC_SVR, 0x1ff);  /* APIC software enable, spurious vector 0xff */
    send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
    delay(1000);
    for (int i = 0; i < 2; i++) {
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | (u32)(TRAMPOLINE >> 12));
        delay(200);
    }
    if (ap_exit || ap_fault)
        for (;;)
            __asm__ volatile("pause");
    for (u64 spins = 0; *count < cpus - 1 && spins < 200000000; spins++)
        __asm__ volatile("pause");
    puts("aps ");
    put_dec(*count);
    puts("\n");
    for (u32 id = 0; id < 256; id++) {
        if (!table[id])
            continue;
        puts("ap ");
        put_dec(id);
        puts(" report ");
        put_hex(table[id]);
        puts("\n");
    }
    return *count == cpus - 1 ? 0 : 1;
}
