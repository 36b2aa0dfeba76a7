/* Instructions a KVM that emulates supervisor code cannot emulate, run at CPL 0, each
 * printed as "name value" for tests/kvm/test_fallback.py to check. An IDT catches #BP
 * (INT3), #UD, #GP and #PF: a handler records what it saw and skips the faulting
 * instruction by skip_len bytes, so the program goes on after an exception. */
#include "runtime.h"

struct gate {
    u16 offset0, selector;
    u8 ist, type;
    u16 offset1;
    u32 offset2, zero;
} __attribute__((packed));

static struct gate idt[32] __attribute__((aligned(16)));

volatile u64 bp_count, ud_count, gp_count, gp_error, pf_count, pf_error, pf_cr2, skip_len;

void bp_entry(void);
void ud_entry(void);
void gp_entry(void);
void pf_entry(void);

__asm__(
    ".text\n"
    "bp_entry:\n"                       /* a trap: the saved RIP is already past INT3 */
    "  incq bp_count(%rip)\n"
    "  iretq\n"
    "ud_entry:\n"
    "  push %rax\n"
    "  incq ud_count(%rip)\n"
    "  mov skip_len(%rip), %rax\n"
    "  add %rax, 8(%rsp)\n"             /* saved RIP */
    "  pop %rax\n"
    "  iretq\n"
    "gp_entry:\n"
    "  push %rax\n"
    "  incq gp_count(%rip)\n"
    "  mov 8(%rsp), %rax\n"             /* error code */
    "  mov %rax, gp_error(%rip)\n"
    "  mov skip_len(%rip), %rax\n"
    "  add %rax, 16(%rsp)\n"
    "  pop %rax\n"
    "  add $8, %rsp\n"
    "  iretq\n"
    "pf_entry:\n"
    "  push %rax\n"
    "  incq pf_count(%rip)\n"
    "  mov 8(%rsp), %rax\n"
    "  mov %rax, pf_error(%rip)\n"
    "  mov %cr2, %rax\n"
    "  mov %rax, pf_cr2(%rip)\n"
    "  mov skip_len(%rip), %rax\n"
    "  add %rax, 16(%rsp)\n"
    "  pop %rax\n"
    "  add $8, %rsp\n"
    "  iretq\n");

static void set_gate(int vector, void (*handler)(void))
{
    u64 address = (u64)handler;
    idt[vector].offset0 = (u16)address;
    idt[vector].selector = 0x08;
    idt[vector].ist = 0;
    idt[vector].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[vector].offset1 = (u16)(address >> 16);
    idt[vector].offset2 = (u32)(address >> 32);
    idt[vector].zero = 0;
}

static void load_idt(void)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) descriptor = {
        sizeof(idt) - 1, (u64)idt};
    set_gate(3, bp_entry);
    set_gate(6, ud_entry);
    set_gate(13, gp_entry);
    set_gate(14, pf_entry);
    __asm__ volatile("lidt %0" :: "m"(descriptor));
}

static void show(const char *name, u64 value)
{
    puts(name);
    putc(' ');
    put_hex(value);
    putc('\n');
}

static u64 rflags(void)
{
    u64 flags;
    __asm__ volatile("pushfq; popq %0" : "=r"(flags));
    return flags;
}

static u64 popcnt_source = 0xf0f0000000000001UL; /* 9 bits set */
static u8 block[32] __attribute__((aligned(16)));

#define PAGE_DIRECTORY 0xb000UL /* leanvm's bare-guest page tables (docs/guest-abi.md) */
#define HOLE 0x2800000UL        /* 40 MiB: its 2 MiB page is unmapped for the #PF test */

int main(struct leanvm_boot_info *info, const char *args, u64 args_len)
{
    u64 r, a, d;
    u32 m;
    load_idt();
    if (args_len > 5 && args[0] == 'l' && args[1] == 'o' && args[2] == 'o' && args[3] == 'p') {
        const char *p = args + 4; /* "loop 0xN": N rounds of POPCNT and LDMXCSR, for timing */
        u64 rounds = parse_hex(&p), sum = 0;
        m = 0x1f80;
        for (u64 i = 0; i < rounds; i++) {
            __asm__ volatile("popcnt %%rbx, %%rax" : "=a"(r) : "b"(i));
            __asm__ volatile("ldmxcsr %0" :: "m"(m));
            sum += r;
        }
        show("loop-sum", sum);
        return 0;
    }
    puts("insns start\n");

    __asm__ volatile("popcnt %%rbx, %%rax" : "=a"(r) : "b"(0xff00ff00ff00ff01UL));
    show("popcnt-reg", r); /* 33 = 0x21 */
    __asm__ volatile("popcnt (%%rbx), %%rax" : "=a"(r) : "b"(&popcnt_source) : "memory");
    show("popcnt-mem", r); /* 9 */
    __asm__ volatile("popcnt popcnt_source(%%rip), %%rax" : "=a"(r) :: "memory");
    show("popcnt-rip", r); /* 9 */

    m = 0x7f80; /* round toward zero */
    __asm__ volatile("ldmxcsr %0" :: "m"(m));
    m = 0;
    __asm__ volatile("stmxcsr %0" : "=m"(m));
    show("mxcsr", m); /* 0x7f80 */
    m = 0x1f80;
    __asm__ volatile("ldmxcsr %0" :: "m"(m));

    __asm__ volatile("stac" ::: "cc");
    show("ac-after-stac", (rflags() >> 18) & 1); /* 1 */
    __asm__ volatile("clac" ::: "cc");
    show("ac-after-clac", (rflags() >> 18) & 1); /* 0 */

    __asm__ volatile("fwait");
    show("fwait", 1);

    block[0] = 0x11; block[1] = 0x22; block[2] = 0x33; block[3] = 0x44;
    skip_len = 4; /* movbe (%rsi), %eax is 4 bytes; a CPU without MOVBE raises #UD */
    r = 0;
    __asm__ volatile("movbe (%%rsi), %%eax" : "+a"(r) : "S"(block) : "memory");
    show("movbe", ud_count ? 0xdeadUL : r); /* 0x11223344, or 0xdead after #UD */

    for (int i = 0; i < 16; i++)
        block[i] = 0;
    ((u64 *)block)[0] = 5;
    ((u64 *)block)[1] = 6;
    a = 5; d = 6;
    u64 zf;
    __asm__ volatile("lock cmpxchg16b (%%rsi); setz %%cl; movzbq %%cl, %%rcx"
                     : "+a"(a), "+d"(d), "=c"(zf)
                     : "S"(block), "b"(7UL), "2"(8UL) : "memory", "cc");
    show("cmpxchg16b-zf", zf); /* 1 */
    show("cmpxchg16b-mem", ((u64 *)block)[0] << 8 | ((u64 *)block)[1]); /* 0x708 */

    __asm__ volatile("int3");
    show("int3-count", bp_count); /* 1 */

    m = 0x11f80; /* a reserved MXCSR bit: #GP(0) */
    skip_len = 3; /* ldmxcsr (%rsi) */
    __asm__ volatile("ldmxcsr (%%rsi)" :: "S"(&m) : "memory");
    show("gp-count", gp_count); /* 1 */
    show("gp-error", gp_error); /* 0 */

    volatile u64 *pde = (volatile u64 *)(PAGE_DIRECTORY + (HOLE >> 21) * 8);
    u64 saved = *pde;
    *pde = saved & ~1UL; /* not present */
    __asm__ volatile("invlpg (%0)" :: "r"(HOLE) : "memory");
    skip_len = 5; /* popcnt (%rbx), %rax */
    __asm__ volatile("popcnt (%%rbx), %%rax" : "=a"(r) : "b"(HOLE + 0x10) : "memory");
    *pde = saved;
    __asm__ volatile("invlpg (%0)" :: "r"(HOLE) : "memory");
    show("pf-count", pf_count); /* 1 */
    show("pf-cr2", pf_cr2); /* 0x2800010 */
    show("pf-error", pf_error); /* 0: read, supervisor, not present */

    puts("insns done\n");
    return 0;
}
