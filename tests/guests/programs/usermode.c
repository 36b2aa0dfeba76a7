/* How this host enters the kernel from guest user mode: SYSCALL, INT 0x80, a page fault.
 *
 * The program builds a GDT (kernel code 0x08 / data 0x10, user data 0x23, user code 0x2b,
 * TSS 0x30), a TSS whose RSP0 is a kernel stack, an IDT whose gates all lead to one
 * reporter, and sets EFER.SCE, STAR, LSTAR and FMASK as Linux does (unless the argument
 * string says "vmm-msrs": the VMM then set them with KVM_SET_MSRS). It then IRETs to CPL 3
 * (IOPL 3, so user code may print) and does what the argument names:
 *   syscall   SYSCALL: LSTAR's code reports CS, SS, RSP, RCX, R11 as it finds them
 *   int80     INT 0x80 through a DPL-3 gate
 *   fault     a read of an unmapped address (#PF from CPL 3)
 *   bp        INT3 through a DPL-3 gate (#BP)
 *   esysenter SYSENTER with its MSRs left zero
 * Every report ends with "entered: cs=... ss=..." and the exit status is the CS the entry
 * code ran with (0x08 when the kernel was entered properly). */
#include "runtime.h"

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x23
#define USER_CS 0x2b
#define TSS_SEL 0x30
#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_FMASK 0xc0000084

static u64 gdt[8] __attribute__((aligned(16)));
static u8 tss[104] __attribute__((aligned(16)));
static u64 idt[256 * 2] __attribute__((aligned(16)));
static u8 kernel_stack[8192] __attribute__((aligned(16)));
static u8 user_stack[8192] __attribute__((aligned(16)));
static const char *action;

/* For SYSCALL: the registers at LSTAR. For a trap: cs, ss, rsp of the handler, then the
 * interrupted CS and RSP in the rcx/r11 slots, the vector, error code and interrupted RIP. */
struct frame { u64 cs, ss, rsp, rcx, r11, vector, error, rip; };
struct frame seen, trap;
static volatile u32 user_steps;

static void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return lo | (u64)hi << 32;
}

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* Called on whatever stack the entry path left us, with the registers it found. */
static void show(const char *what, struct frame *f)
{
    puts(what);
    puts(": cs=");
    put_hex(f->cs);
    puts(" ss=");
    put_hex(f->ss);
    puts(" rsp=");
    put_hex(f->rsp);
    puts(" rcx=");
    put_hex(f->rcx);
    puts(" r11=");
    put_hex(f->r11);
    puts(" vector=");
    put_hex(f->vector);
    puts(" error=");
    put_hex(f->error);
    puts(" rip=");
    put_hex(f->rip);
    puts("\n");
}

/* Called at CPL 0 on the kernel stack: from SYSCALL's entry when it reached CPL 0, else from
 * an exception or interrupt gate. Exit status: the CS the first entry ran with. */
__attribute__((used)) void report(struct frame *f)
{
    puts("user steps: ");
    put_hex(user_steps);
    puts("\n");
    if (seen.vector)
        show("syscall", &seen);
    if (f != &seen)
        show("trap", f);
    guest_exit((u32)((seen.vector ? seen.cs : f->cs) & 0xffff));
}

/* SYSCALL lands here (LSTAR). Save what we can see without touching the stack (it may
 * still be the user's), then report; if this runs at CPL 3 after all, it cannot print
 * (user-mode port I/O faults on this host even with IOPL 3): UD2 then enters the kernel
 * through an exception, whose handler prints both records. */
__asm__(
    ".globl syscall_entry\n"
    "syscall_entry:\n"
    "  mov %rsp, seen+16(%rip)\n"
    "  mov %rcx, seen+24(%rip)\n"
    "  mov %r11, seen+32(%rip)\n"
    "  xor %eax, %eax\n"
    "  mov %cs, %ax\n"
    "  mov %rax, seen+0(%rip)\n"
    "  mov %ss, %ax\n"
    "  mov %rax, seen+8(%rip)\n"
    "  movq $0x100, seen+40(%rip)\n"       /* vector 0x100: SYSCALL */
    "  lea syscall_entry(%rip), %rax\n"
    "  mov %rax, seen+56(%rip)\n"
    "  testb $3, seen+0(%rip)\n"
    "  jz 1f\n"
    "  ud2\n"
    "1:lea kernel_stack+8192(%rip), %rsp\n"
    "  lea seen(%rip), %rdi\n"
    "  call report\n"
);

/* Interrupt and exception gates: vectors with an error code push it; the stubs even out the
 * frame and pass the vector. */
#define STUB(n) __asm__(".globl vec" #n "\nvec" #n ":\n  pushq $0\n  pushq $" #n \
                        "\n  jmp common_entry\n");
#define STUB_ERR(n) __asm__(".globl vec" #n "\nvec" #n ":\n  pushq $" #n \
                            "\n  jmp common_entry\n");
STUB(3) STUB(6) STUB_ERR(8) STUB_ERR(13) STUB_ERR(14) STUB(128)

__asm__(
    "common_entry:\n"
    /* stack: vector, error, rip, cs, rflags, rsp, ss */
    "  xor %eax, %eax\n"
    "  mov %cs, %ax\n"
    "  mov %rax, trap+0(%rip)\n"
    "  mov %ss, %ax\n"
    "  mov %rax, trap+8(%rip)\n"
    "  mov %rsp, trap+16(%rip)\n"
    "  mov 24(%rsp), %rax\n"
    "  mov %rax, trap+24(%rip)\n"             /* the interrupted CS */
    "  mov 40(%rsp), %rax\n"
    "  mov %rax, trap+32(%rip)\n"             /* the interrupted RSP */
    "  mov (%rsp), %rax\n"
    "  mov %rax, trap+40(%rip)\n"
    "  mov 8(%rsp), %rax\n"
    "  mov %rax, trap+48(%rip)\n"
    "  mov 16(%rsp), %rax\n"
    "  mov %rax, trap+56(%rip)\n"
    "  lea trap(%rip), %rdi\n"
    "  call report\n"
);

extern void syscall_entry(void), vec3(void), vec6(void), vec8(void), vec13(void),
    vec14(void), vec128(void);

static void gate(int vector, void (*handler)(void), int dpl)
{
    u64 addr = (u64)handler;
    idt[2 * vector] = (addr & 0xffff) | (u64)KERNEL_CS << 16 | (u64)(0x8e | dpl << 5) << 40
        | (addr >> 16 & 0xffff) << 48;
    idt[2 * vector + 1] = addr >> 32;
}

/* At CPL 3 nothing can print here, so progress goes to memory. */
__attribute__((used)) void user_main(void)
{
    user_steps = 1;
    if (action[0] == 's')  /* syscall */
        __asm__ volatile("mov $39, %%eax\n syscall" ::: "rax", "rcx", "r11", "memory");
    else if (action[0] == 'i')  /* int80 */
        __asm__ volatile("mov $20, %%eax\n int $0x80" ::: "rax", "memory");
    else if (action[0] == 'b')  /* breakpoint: INT3 through a DPL-3 gate */
        __asm__ volatile("int3" ::: "memory");
    else if (action[0] == 'e')  /* sysenter (MSRs not set up: expect #GP if it is checked) */
        __asm__ volatile("sysenter" ::: "rcx", "r11", "memory");
    else if (action[0] == 'f')  /* fault */
        (void)*(volatile u64 *)0x7ffffff0000ULL;
    user_steps = 2;  /* the entry attempt returned to user mode */
    __asm__ volatile("ud2");
}

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    const char *vmm = 0;
    action = args;
    for (const char *p = args; *p; p++)  /* "ACTION vmm-msrs" */
        if (*p == ' ') {
            *(char *)p = 0;
            vmm = p + 1;
            break;
        }
    gdt[1] = 0x00af9a000000ffffULL;  /* 0x08 kernel code, 64-bit */
    gdt[2] = 0x00cf92000000ffffULL;  /* 0x10 kernel data */
    gdt[3] = 0x00cffa000000ffffULL;  /* 0x18 user code, 32-bit (SYSRET base) */
    gdt[4] = 0x00cff2000000ffffULL;  /* 0x20 user data (0x23 with RPL 3) */
    gdt[5] = 0x00affa000000ffffULL;  /* 0x28 user code, 64-bit (0x2b) */
    u64 tss_base = (u64)tss;
    *(u64 *)(tss + 4) = (u64)(kernel_stack + sizeof kernel_stack);  /* RSP0 */
    *(u16 *)(tss + 102) = sizeof tss;  /* no I/O bitmap */
    gdt[6] = (sizeof tss - 1) | (tss_base & 0xffffff) << 16 | 0x89ULL << 40
        | (tss_base >> 24 & 0xff) << 56;
    gdt[7] = tss_base >> 32;
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = { sizeof gdt - 1, (u64)gdt };
    __asm__ volatile("lgdt %0\n"
                     "pushq $0x08\n lea 1f(%%rip), %%rax\n pushq %%rax\n lretq\n1:\n"
                     "mov $0x10, %%ax\n mov %%ax, %%ds\n mov %%ax, %%es\n mov %%ax, %%ss\n"
                     "mov $0x30, %%ax\n ltr %%ax" :: "m"(gdtr) : "rax", "memory");
    gate(3, vec3, 3);
    gate(6, vec6, 0);
    gate(8, vec8, 0);
    gate(13, vec13, 0);
    gate(14, vec14, 0);
    gate(128, vec128, 3);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof idt - 1, (u64)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));
    if (!vmm || !same(vmm, "vmm-msrs")) {
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1);  /* SCE */
        wrmsr(MSR_STAR, (u64)0x18 << 48 | (u64)KERNEL_CS << 32);
        wrmsr(MSR_LSTAR, (u64)syscall_entry);
        wrmsr(MSR_FMASK, 0x40700);  /* TF IF DF AC cleared (IOPL kept, so the entry can print) */
    }
    puts("kernel: efer=");
    put_hex(rdmsr(MSR_EFER));
    puts(" star=");
    put_hex(rdmsr(MSR_STAR));
    puts(" lstar=");
    put_hex(rdmsr(MSR_LSTAR));
    puts(" syscall_entry=");
    put_hex((u64)syscall_entry);
    puts("\n");
    /* to CPL 3 with IOPL 3: SS, RSP, RFLAGS, CS, RIP */
    __asm__ volatile("pushq $0x23\n pushq %0\n pushq $0x3002\n pushq $0x2b\n pushq %1\n iretq"
                     :: "r"((u64)(user_stack + sizeof user_stack)), "r"((u64)user_main)
                     : "memory");
    return 1;
}
