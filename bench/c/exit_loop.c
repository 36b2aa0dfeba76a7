/* The floor for exit handling on this host: a C VMM loop on raw /dev/kvm running the same
 * bare guest (a flat binary) in the same long-mode setup leanvm uses, handling each OUT exit
 * with a counter. Prints: exits, nanoseconds from first KVM_RUN to the guest's exit write.
 *   exit_loop GUEST.bin ARGS */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define die(msg) do { perror(msg); exit(1); } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: %s GUEST.bin ARGS\n", argv[0]); return 2; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint64_t ident = 0xfeffc000;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0) die("identity map");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfeffd000ul) < 0) die("tss");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("irqchip");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("pit");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0,
        .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("memslot");

    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + 0x100000, 1, MEM_SIZE - 0x100000, f);
    fclose(f);
    if (n == 0) die("empty guest");

    /* GDT at 0x1000, args at 0x3000, page tables at 0x9000 (PML4), 0xa000 (PDPT), 0xb000.. */
    uint64_t *gdt = (uint64_t *)(mem + 0x1000);
    gdt[1] = 0x00af9b000000ffffull;
    gdt[2] = 0x00cf93000000ffffull;
    size_t alen = strlen(argv[2]);
    memcpy(mem + 0x3000, argv[2], alen + 1);
    uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000);
    pml4[0] = 0xa000 | 7;
    for (int g = 0; g < 4; g++) {
        pdpt[g] = (0xb000 + 0x1000 * g) | 7;
        uint64_t *pd = (uint64_t *)(mem + 0xb000 + 0x1000 * g);
        for (int i = 0; i < 512; i++)
            pd[i] = ((uint64_t)g << 30) + ((uint64_t)i << 21) + 0x87;
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("vcpu");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap run");

    struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = { .h.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("cpuid");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("set cpuid");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("sregs");
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
        .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment data = code;
    data.selector = 16; data.type = 3; data.l = 0; data.db = 1;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = 0x1000; sregs.gdt.limit = 23;
    sregs.cr3 = 0x9000;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    sregs.cr0 = 0x80050033;
    sregs.efer = 0x500 | 1;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("set sregs");
    struct kvm_regs regs = { .rip = 0x100000, .rsp = 0x80000, .rdi = 0x2000, .rsi = 0x3000,
        .rdx = alen, .rflags = 2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("set regs");

    uint64_t exits = 0, port80 = 0, start = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
            if (run->io.port == 0x80) { port80++; continue; }
            if (run->io.port == 0xf4) break;
            continue; /* anything else is ignored, as an unclaimed write */
        }
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        return 1;
    }
    uint64_t elapsed = now_ns() - start;
    printf("%llu %llu %llu\n", (unsigned long long)exits, (unsigned long long)port80,
           (unsigned long long)elapsed);
    return 0;
}
