"""What one step of the emulation fallback takes and gives: the vCPU state in, and either
the instruction's effects (Done), an exception for the guest (Fault) or a reason to stop the
VM (Halt); plus the pages a step mapped."""

from __future__ import annotations

from typing import NamedTuple

from leanvm.memory.paging import PagingContext, Translation


class Fault(NamedTuple):
    """An exception the guest should see instead of the instruction completing."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None


class Halt(NamedTuple):
    """The step cannot go on: stop the VM with ``detail`` (one line)."""

    detail: str


class Done(NamedTuple):
    """The instruction completed: new register values and the writes to commit."""

    registers: dict[str, int]  # kvm_regs field names (64-bit names, also in 32-bit mode)
    fs_base: int
    gs_base: int
    fpu: "FpuState | None"
    writes: list[tuple[int, bytes]]  # (guest-physical address, bytes), in order
    flag_updates: list[tuple[int, int]]  # page-table entries: (address, accessed/dirty bits)
    device_writes: "list[tuple[int, int, int]] | tuple[()]" = ()  # MMIO (address, size, value)


class FpuState(NamedTuple):
    """The SSE and x87 state the fallback carries: XMM registers (ints), MXCSR, x87 control,
    status and abridged tag words, and ST(0)-ST(7) as 10-byte values (FXSAVE order)."""

    xmm: tuple[int, ...]
    mxcsr: int
    fcw: int
    fsw: int
    ftw: int  # abridged: bit i set = physical register i valid
    st: tuple[bytes, ...]


class Mapped(NamedTuple):
    linear: int
    physical: int
    translation: Translation
    writable: bool  # the guest may write it (page tables and region)
    ram: bool  # writable RAM (false: ROM or a read-only mapping)
    buffer: int  # host address of the copy Unicorn works on (0: a device page)


class StepInput(NamedTuple):
    """What the engine needs from the vCPU for one step."""

    registers: dict[str, int]  # kvm_regs field values
    fs_base: int
    gs_base: int
    fpu: FpuState | None
    paging: PagingContext
    user: bool  # CPL 3
    rip: int
    size: int  # the instruction's length
