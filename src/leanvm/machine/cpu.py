"""Entering a guest: the states a vCPU starts in (64-bit long mode at CPL 0, 32-bit flat
protected mode for PVH, or the reset vector for firmware), and the one function that puts
vCPU 0 there."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from leanvm.abi import kvm as abi

if TYPE_CHECKING:  # the loaders load only for the boot path that needs them
    from leanvm.kvm.cpuid import CpuidTable
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.loader.bare import BootState
    from leanvm.loader.pvh import ProtectedModeState

class EntryMode(Enum):
    LONG = "long"  # bare guests and Linux's 64-bit boot protocol (loader.bare.BootState)
    PROTECTED = "protected"  # PVH: 32-bit flat, paging off (loader.pvh.ProtectedModeState)
    RESET = "reset"  # firmware: the architectural reset state, F000:FFF0


class Entry:
    """How vCPU 0 starts, as a boot path decided."""

    __slots__ = ("mode", "state")

    def __init__(self, mode: EntryMode, state: "BootState | ProtectedModeState | None") -> None:
        self.mode, self.state = mode, state


def enter(vcpu: "Vcpu", entry: Entry, cpuid: "CpuidTable") -> None:
    """Give ``vcpu`` its CPUID and the state ``entry`` names."""
    if entry.mode is EntryMode.LONG:
        setup_long_mode(vcpu, entry.state, cpuid)  # type: ignore[arg-type]
    elif entry.mode is EntryMode.PROTECTED:
        setup_protected_mode(vcpu, entry.state, cpuid)  # type: ignore[arg-type]
    else:  # KVM creates vCPUs in the reset state already
        vcpu.set_cpuid(cpuid)


FCW_DEFAULT = 0x37F  # x87 control word after FNINIT
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked


def setup_long_mode(vcpu: "Vcpu", state: "BootState", cpuid: "CpuidTable") -> None:
    vcpu.set_cpuid(cpuid)
    sregs = vcpu.get_sregs()
    code = abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=state.code_selector, type=0xB,
                           present=1, dpl=0, db=0, s=1, l=1, g=1)
    data = abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=state.data_selector, type=0x3,
                           present=1, dpl=0, db=1, s=1, l=0, g=1)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = state.gdt_base, state.gdt_limit
    sregs.cr3 = state.cr3
    sregs.cr4 = abi.X86_CR4_PAE | abi.X86_CR4_OSFXSR | abi.X86_CR4_OSXMMEXCPT
    sregs.cr0 = (abi.X86_CR0_PE | abi.X86_CR0_MP | abi.X86_CR0_ET | abi.X86_CR0_NE
                 | abi.X86_CR0_WP | abi.X86_CR0_AM | abi.X86_CR0_PG)
    sregs.efer = abi.EFER_LME | abi.EFER_LMA | abi.EFER_SCE | (abi.EFER_NX if cpuid.has("nx") else 0)
    vcpu.set_sregs(sregs)

    regs = abi.kvm_regs()
    regs.rip, regs.rsp, regs.rbp = state.rip, state.rsp, 0
    regs.rdi, regs.rsi, regs.rdx = state.rdi, state.rsi, state.rdx
    regs.rflags = 0x2  # reserved bit 1 set; interrupts off
    vcpu.set_regs(regs)

    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.mxcsr = FCW_DEFAULT, MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def setup_protected_mode(vcpu: "Vcpu", state: "ProtectedModeState", cpuid: "CpuidTable"
                         ) -> None:
    """32-bit flat protected mode, paging off, interrupts off, EBX set: the PVH entry state
    (TR a busy 32-bit TSS at base 0, limit 0x67, as the ABI asks)."""
    vcpu.set_cpuid(cpuid)
    sregs = vcpu.get_sregs()
    sregs.cs = abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=state.code_selector, type=0xB,
                               present=1, dpl=0, db=1, s=1, l=0, g=1)
    data = abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=state.data_selector, type=0x3,
                           present=1, dpl=0, db=1, s=1, l=0, g=1)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = abi.kvm_segment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
    sregs.gdt.base, sregs.gdt.limit = state.gdt_base, state.gdt_limit
    sregs.cr0 = abi.X86_CR0_PE | abi.X86_CR0_ET
    sregs.cr4 = 0
    sregs.cr3 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = abi.kvm_regs()
    regs.rip, regs.rbx, regs.rflags = state.eip, state.ebx, 0x2
    vcpu.set_regs(regs)
