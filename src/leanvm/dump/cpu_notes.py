"""The per-vCPU notes of a dump: NT_PRSTATUS (what gdb, crash and drgn read registers from)
and QEMU's "QEMU" CPU-state note (segments, control registers; crash's ``help -r``)."""

from __future__ import annotations

from leanvm.abi import elf
from leanvm.dump.source import CpuState, DumpSource

_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")


def prstatus(cpu: CpuState) -> bytes:
    """struct elf_prstatus with pr_pid = vCPU index + 1 (QEMU's numbering) and pr_reg the
    vCPU's registers in struct user_regs_struct order."""
    regs, segs = cpu.regs, cpu.segments
    values = dict(regs)
    values["eflags"] = regs.get("rflags", 0)
    values["orig_rax"] = regs.get("rax", 0)
    for name in _SELECTORS:
        values[name] = segs[name].selector if name in segs else 0
    values["fs_base"] = segs["fs"].base if "fs" in segs else 0
    values["gs_base"] = segs["gs"].base if "gs" in segs else 0
    gregs = [values.get(name, 0) & (1 << 64) - 1 for name in elf.USER_REGS]
    return elf.PRSTATUS.pack(0, 0, 0, 0, 0, 0, cpu.index + 1, 0, 0, 0, bytes(64), *gregs, 0)


def qemu_cpu_state(cpu: CpuState) -> bytes:
    """QEMUCPUState version 1 with kernel_gs_base."""
    out = [elf.QEMU_CPU_STATE_VERSION.to_bytes(4, "little"),
           elf.QEMU_CPU_STATE_SIZE.to_bytes(4, "little")]
    out += [(cpu.regs.get(name, 0) & (1 << 64) - 1).to_bytes(8, "little") for name in elf.QEMU_REGS]
    for name in elf.QEMU_SEGMENTS:
        seg = cpu.segments.get(name)
        out.append(elf.QEMU_SEGMENT.pack(seg.selector, seg.limit, seg.flags, 0, seg.base)
                   if seg is not None else bytes(elf.QEMU_SEGMENT.size))
    out += [value.to_bytes(8, "little") for value in cpu.cr]
    out.append(cpu.kernel_gs_base.to_bytes(8, "little"))
    blob = b"".join(out)
    assert len(blob) == elf.QEMU_CPU_STATE_SIZE
    return blob


def notes(source: DumpSource) -> tuple[bytes, int | None]:
    """Every note of the dump, as QEMU orders them: NT_PRSTATUS of each vCPU, then a QEMU
    note for each, then VMCOREINFO; and where VMCOREINFO's text starts in the blob (None
    without it)."""
    blob = b"".join(elf.note(b"CORE", elf.NT_PRSTATUS, prstatus(cpu)) for cpu in source.cpus)
    blob += b"".join(elf.note(b"QEMU", elf.NT_QEMU_CPU_STATE, qemu_cpu_state(cpu))
                     for cpu in source.cpus)
    if not source.vmcoreinfo:
        return blob, None
    text_at = len(blob) + elf.NHDR.size + elf.pad4(len(b"VMCOREINFO\0"))
    return blob + elf.note(b"VMCOREINFO", elf.NT_VMCOREINFO, source.vmcoreinfo), text_at
