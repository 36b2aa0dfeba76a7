"""The /dev/kvm ABI for x86-64 (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).

Only ctypes structures, ioctl numbers and constants live here; each structure quotes the C
declaration it mirrors. tests/unit/test_abi_kvm.py checks sizes and ioctl numbers against
the C headers when a compiler and the headers are present.
"""

from __future__ import annotations

import ctypes

# --- ioctl number encoding (asm-generic/ioctl.h) ------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype))


def _ior(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype))


u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32

KVM_API_VERSION = 12  # the only stable API version

# --- structures ----------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    """struct kvm_userspace_memory_region { __u32 slot; __u32 flags; __u64 guest_phys_addr;
    __u64 memory_size; __u64 userspace_addr; };"""

    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0  # track dirty pages
KVM_MEM_READONLY = 1 << 1  # guest writes exit as MMIO


class kvm_regs(ctypes.Structure):
    """struct kvm_regs { __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp; __u64 r8 ... r15;
    __u64 rip, rflags; };"""

    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    """struct kvm_segment { __u64 base; __u32 limit; __u16 selector; __u8 type; __u8 present,
    dpl, db, s, l, g, avl; __u8 unusable; __u8 padding; };"""

    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    """struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };"""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    """struct kvm_sregs { struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt; __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64]; };"""

    _fields_ = [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    """struct kvm_fpu { __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1;
    __u16 last_opcode; __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr;
    __u32 pad2; };"""

    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
                ("mxcsr", u32), ("pad2", u32)]


class kvm_xsave(ctypes.Structure):
    """struct kvm_xsave { __u32 region[1024]; __u32 extra[0]; }: an XSAVE image, the legacy
    FXSAVE area (FCW at byte 0, MXCSR at 24, ST0-7 at 32, XMM0-15 at 160) then the XSAVE
    header (XSTATE_BV at byte 512). KVM_GET_FPU/KVM_SET_FPU leave MXCSR out (measured: the
    field reads 0 and writes are ignored); this carries it."""

    _fields_ = [("region", u32 * 1024)]


class kvm_msr_entry(ctypes.Structure):
    """struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };"""

    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[0]; };"""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs_with(n: int) -> type[ctypes.Structure]:
    """kvm_msrs followed by room for ``n`` entries (a flexible array member in C)."""

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return _Msrs


class kvm_cpuid_entry2(ctypes.Structure):
    """struct kvm_cpuid_entry2 { __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx;
    __u32 ecx; __u32 edx; __u32 padding[3]; };"""

    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # entry depends on ECX (the subleaf); sic, kernel spelling


class kvm_cpuid2(ctypes.Structure):
    """struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[0]; };"""

    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2_with(n: int) -> type[ctypes.Structure]:
    """kvm_cpuid2 followed by room for ``n`` entries."""

    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    return _Cpuid2


KVM_MAX_CPUID_ENTRIES = 256


class kvm_irq_level(ctypes.Structure):
    """struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; };"""

    _fields_ = [("irq", u32), ("level", u32)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    """struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; union { __u32 pad;
    __u32 pio; }; };"""

    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


# struct kvm_coalesced_mmio_ring { __u32 first, last; struct kvm_coalesced_mmio
# coalesced_mmio[]; } with struct kvm_coalesced_mmio { __u64 phys_addr; __u32 len;
# union { __u32 pad; __u32 pio; }; __u8 data[8]; }: KVM appends at ``last``, the VMM
# consumes from ``first``; the ring fills one page.
COALESCED_RING_HEADER = 8
COALESCED_ENTRY = 24  # "<QII8s"
COALESCED_MAX = (4096 - COALESCED_RING_HEADER) // COALESCED_ENTRY


class kvm_pit_config(ctypes.Structure):
    """struct kvm_pit_config { __u32 flags; __u32 pad[15]; };"""

    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_signal_mask(ctypes.Structure):
    """struct kvm_signal_mask { __u32 len; __u8 sigset[0]; }; (the kernel's sigset_t, 8
    bytes on x86-64, follows: bit N-1 stands for signal N)."""

    _fields_ = [("len", u32)]


class kvm_signal_mask_64(ctypes.Structure):
    """kvm_signal_mask with its 8-byte sigset, as KVM_SET_SIGNAL_MASK takes it."""

    _pack_ = 4
    _fields_ = [("len", u32), ("sigset", ctypes.c_uint64)]


KVM_SIGSET_BYTES = 8  # sizeof(kernel sigset_t) on x86-64

KVM_PIT_SPEAKER_DUMMY = 1  # speaker port 0x61 handled as a dummy in the kernel


class kvm_irqfd(ctypes.Structure):
    """struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; __u8 pad[16]; };"""

    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(ctypes.Structure):
    """struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags;
    __u8 pad[36]; };"""

    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32),
                ("pad", u8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0  # signal only when the written value matches
KVM_IOEVENTFD_FLAG_PIO = 1 << 1  # port I/O rather than MMIO
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_vcpu_events(ctypes.Structure):
    """struct kvm_vcpu_events { struct { __u8 injected, nr, has_error_code, pending;
    __u32 error_code; } exception; struct { __u8 injected, nr, soft, shadow; } interrupt;
    struct { __u8 injected, pending, masked, pad; } nmi; __u32 sipi_vector; __u32 flags;
    struct { __u8 smm, pending, smm_inside_nmi, latched_init; } smi; __u8 reserved[27];
    __u8 exception_has_payload; __u64 exception_payload; };"""

    _fields_ = [
        ("exception_injected", u8), ("exception_nr", u8), ("exception_has_error_code", u8),
        ("exception_pending", u8), ("exception_error_code", u32),
        ("interrupt_injected", u8), ("interrupt_nr", u8), ("interrupt_soft", u8),
        ("interrupt_shadow", u8),
        ("nmi_injected", u8), ("nmi_pending", u8), ("nmi_masked", u8), ("nmi_pad", u8),
        ("sipi_vector", u32), ("flags", u32),
        ("smi_smm", u8), ("smi_pending", u8), ("smi_inside_nmi", u8), ("smi_latched_init", u8),
        ("reserved", u8 * 27), ("exception_has_payload", u8), ("exception_payload", u64),
    ]


# --- kvm_run (the page shared with the kernel per vCPU) --------------------------------
# struct kvm_run { __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6];
#   __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags;
#   __u64 cr8; __u64 apic_base; union { ... } (256 bytes at offset 32); ... };
RUN_REQUEST_INTERRUPT_WINDOW = 0  # u8
RUN_IMMEDIATE_EXIT = 1  # u8
RUN_EXIT_REASON = 8  # u32
RUN_READY_FOR_INTERRUPT_INJECTION = 12  # u8
RUN_IF_FLAG = 13  # u8
RUN_UNION = 32  # start of the exit-specific union
# io: { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; }
# mmio: { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; }
# internal / emulation_failure: { __u32 suberror; __u32 ndata; __u64 flags;
#   __u8 insn_size; __u8 insn_bytes[15]; }
# fail_entry: { __u64 hardware_entry_failure_reason; __u32 cpu; }
# system_event: { __u32 type; __u32 ndata; __u64 data[16]; }
# hw: { __u64 hardware_exit_reason; }   ex: { __u32 exception; __u32 error_code; }
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8  # triple fault
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10  # a signal interrupted KVM_RUN
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_INTERNAL_ERROR_EMULATION = 1  # the host could not emulate an instruction
KVM_INTERNAL_ERROR_SIMUL_EX = 2  # exception while delivering an exception
KVM_INTERNAL_ERROR_DELIVERY_EV = 3  # error while delivering an event
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0  # insn_size/insn_bytes valid

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --- capabilities (KVM_CHECK_EXTENSION) ------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9  # recommended vCPUs per VM
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_COALESCED_MMIO = 15  # returns the ring's page offset in the vCPU mapping
KVM_CAP_TSC_CONTROL = 60  # KVM_SET_TSC_KHZ
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_TSC_DEADLINE_TIMER = 72  # the in-kernel LAPIC has the TSC-deadline timer mode
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_GUEST_MEMFD = 234

# --- ioctls: system (/dev/kvm) -------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# --- ioctls: VM ------------------------------------------------------------------------
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_IRQFD = _iow(0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, kvm_coalesced_mmio_zone)
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)
# --- ioctls: vCPU ----------------------------------------------------------------------
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_SIGNAL_MASK = _iow(0x8B, kvm_signal_mask)  # the mask while this vCPU is in KVM_RUN
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_TSC_KHZ = _io(0xA2)  # the guest's TSC frequency, kHz (vCPU)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)

KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_VCPUEVENT_VALID_SMM = 1 << 3
KVM_VCPUEVENT_VALID_PAYLOAD = 1 << 4

# --- x86 architectural constants used when setting up a vCPU -----------------------------
X86_CR0_PE = 1 << 0  # protection enable
X86_CR0_MP = 1 << 1  # monitor coprocessor
X86_CR0_ET = 1 << 4  # extension type (always 1)
X86_CR0_NE = 1 << 5  # native x87 error reporting
X86_CR0_WP = 1 << 16  # supervisor write protection
X86_CR0_AM = 1 << 18  # alignment mask
X86_CR0_PG = 1 << 31  # paging
X86_CR4_PAE = 1 << 5  # physical address extension
X86_CR4_OSFXSR = 1 << 9  # FXSAVE/FXRSTOR and SSE enabled
X86_CR4_OSXMMEXCPT = 1 << 10  # unmasked SSE exceptions
EFER_SCE = 1 << 0  # SYSCALL enable
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active
EFER_NX = 1 << 11  # no-execute enable

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
