"""human-monitor-command: the few HMP commands leanvm answers, in QEMU's text layout (lines
end in CR LF, as QEMU's monitor writes them).

    info registers [-a]   the vCPU's registers (cpu-index, default 0; -a: every vCPU),
                          read while the vCPUs are held (a running guest pauses for it)
    info status           VM status: running / paused / ...
    info version          leanvm's version
    info name, info kvm, info cpus, help
Anything else: "unknown command: 'TEXT'", as QEMU answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanvm.errors import QmpError

if TYPE_CHECKING:
    from leanvm.dump.source import CpuState, Segment
    from leanvm.machine.machine import Machine

HELP = ("info registers [-a] -- show the cpu registers (-a: all vCPUs)\r\n"
        "info status -- show the current VM status (running|paused)\r\n"
        "info version -- show the version of leanvm\r\n"
        "info name -- show the current VM name\r\n"
        "info kvm -- show KVM information\r\n"
        "info cpus -- show infos for each CPU\r\n")
MAX_COMMAND = 4096  # characters of one command line


def run_hmp(machine: "Machine", line: str, cpu_index: int | None) -> str:
    if len(line) > MAX_COMMAND:
        raise QmpError(f"command line too long (at most {MAX_COMMAND} characters)")
    words = line.split()
    if not words:
        return ""
    if words == ["help"] or words == ["info"]:
        return HELP
    if words[0] != "info" or len(words) < 2:
        return f"unknown command: '{line}'\r\n"
    what, rest = words[1], words[2:]
    if what == "registers":
        return _registers(machine, cpu_index, "-a" in rest)
    if what == "status":
        status = machine.status
        shown = {"prelaunch": "paused (prelaunch)", "guest-panicked": "paused (guest-panicked)",
                 "internal-error": "paused (internal-error)"}.get(status, status)
        return f"VM status: {shown}\r\n"
    if what == "version":
        from leanvm.version import __version__

        return f"leanvm {__version__}\r\n"
    if what == "name":
        return f"{machine.config.name}\r\n" if machine.config.name else ""
    if what == "kvm":
        return "kvm support: enabled\r\n"
    if what == "cpus":
        threads = machine.loop_control.thread_ids
        return "".join(f"{'*' if index == 0 else ' '} CPU #{index}: thread_id={threads.get(index, 0)}\r\n"
                       for index in range(len(machine.vcpus)))
    return f"unknown command: 'info {what}'\r\n"


def _registers(machine: "Machine", cpu_index: int | None, every: bool) -> str:
    from leanvm.machine.dump import cpu_state

    vcpus = list(machine.vcpus)
    index = 0 if cpu_index is None else cpu_index
    if not 0 <= index < len(vcpus):
        raise QmpError(f"Parameter 'cpu-index' expects a CPU index from 0 to {len(vcpus) - 1}")
    chosen = vcpus if every else [vcpus[index]]
    with machine.held():
        states = [cpu_state(vcpu) for vcpu in chosen]
    return "".join(format_registers(state) for state in states)


def _segment(name: str, seg: "Segment") -> str:
    flags = seg.flags
    dpl = (flags >> 13) & 3
    if name in ("ldt", "tr"):
        kind = "LDT" if name == "ldt" else "TSS64-busy" if (flags >> 8) & 0xF == 0xB else "TSS"
        return (f"{name.upper():<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} "
                f"{flags:08x} DPL={dpl} {kind}\r\n")
    if not (flags >> 15) & 1:  # not present
        return f"{name.upper():<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {flags:08x}\r\n"
    code = (flags >> 11) & 1
    if code:
        kind = "CS64" if (flags >> 21) & 1 else "CS32" if (flags >> 22) & 1 else "CS16"
        bits = f"[{'C' if (flags >> 10) & 1 else '-'}{'R' if (flags >> 9) & 1 else '-'}" \
               f"{'A' if (flags >> 8) & 1 else '-'}]"
    else:
        kind = "DS  " if (flags >> 22) & 1 else "DS16"
        bits = f"[{'E' if (flags >> 10) & 1 else '-'}{'W' if (flags >> 9) & 1 else '-'}" \
               f"{'A' if (flags >> 8) & 1 else '-'}]"
    return (f"{name.upper():<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} "
            f"{flags:08x} DPL={dpl} {kind} {bits}\r\n")


def _rflags(value: int) -> str:
    return "[" + "".join(letter if value & bit else "-" for letter, bit in
                         (("D", 1 << 10), ("O", 1 << 11), ("S", 1 << 7), ("Z", 1 << 6),
                          ("A", 1 << 4), ("P", 1 << 2), ("C", 1))) + "]"


def format_registers(cpu: "CpuState") -> str:
    """One vCPU's registers as QEMU's ``info registers`` shows a 64-bit CPU."""
    r = cpu.regs
    names = [("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"),
             ("RSI", "rsi"), ("RDI", "rdi"), ("RBP", "rbp"), ("RSP", "rsp"),
             ("R8 ", "r8"), ("R9 ", "r9"), ("R10", "r10"), ("R11", "r11"),
             ("R12", "r12"), ("R13", "r13"), ("R14", "r14"), ("R15", "r15")]
    lines = [f"\r\nCPU#{cpu.index}\r\n"]
    for row in range(0, 16, 4):
        lines.append(" ".join(f"{label}={r[key]:016x}" for label, key in names[row:row + 4])
                     + "\r\n")
    cpl = cpu.segments["cs"].selector & 3
    lines.append(f"RIP={r['rip']:016x} RFL={r['rflags']:08x} {_rflags(r['rflags'])} "
                 f"CPL={cpl} II=0 A20=1 SMM=0 HLT=0\r\n")
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        lines.append(_segment(name, cpu.segments[name]))
    for name in ("gdt", "idt"):
        seg = cpu.segments[name]
        lines.append(f"{name.upper()}=     {seg.base:016x} {seg.limit:08x}\r\n")
    cr0, _, cr2, cr3, cr4 = cpu.cr
    lines.append(f"CR0={cr0:08x} CR2={cr2:016x} CR3={cr3:016x} CR4={cr4:08x}\r\n")
    lines.append(f"EFER={cpu.efer:016x}\r\n")
    return "".join(lines)
