"""Decoding the failing instruction (Capstone) and deciding whether the fallback may run it.

The fallback runs an instruction in Unicorn over a copy of the vCPU's general, SSE and x87
state and the guest memory the instruction touches. Anything whose effect lies outside that
copy (port I/O, HLT, control and debug registers, MSRs, descriptor tables, segment loads,
far transfers, TLB and cache control, CPUID, XSAVE state) would be lost or answered with
Unicorn's own machine state instead of the guest's, so it is refused: the VM stops with one
line naming the instruction.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

# Port I/O and HLT: never emulated (devices are the VMM's; HLT waits for interrupts).
IO_OR_HALT = frozenset({"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd", "hlt"})

# Instructions whose effect lives in state the fallback does not carry over.
SYSTEM = {
    **dict.fromkeys(("lgdt", "lidt", "lldt", "ltr", "sgdt", "sidt", "sldt", "str", "smsw",
                     "lmsw", "clts", "lar", "lsl", "verr", "verw", "arpl"),
                    "reads or writes descriptor tables or control registers"),
    **dict.fromkeys(("rdmsr", "wrmsr", "rdtsc", "rdtscp", "rdpmc", "rdpid", "swapgs",
                     "cpuid", "xgetbv", "xsetbv"), "reads or writes MSRs, TSC or CPUID"),
    **dict.fromkeys(("invd", "wbinvd", "wbnoinvd", "invlpg", "invlpga", "invpcid", "monitor",
                     "mwait", "monitorx", "mwaitx", "clflush", "clflushopt", "clwb"),
                    "controls caches or TLBs"),
    **dict.fromkeys(("syscall", "sysret", "sysretq", "sysenter", "sysexit", "sysexitq", "iret",
                     "iretd", "iretq", "retf", "retfq", "ljmp", "lcall", "int", "int1", "into",
                     "rsm", "lss", "lds", "les", "lfs", "lgs", "ud0", "ud1", "ud2"),
                    "changes privilege level, segments or raises an interrupt"),
    **dict.fromkeys(("vmcall", "vmmcall", "vmlaunch", "vmresume", "vmxon", "vmxoff", "vmread",
                     "vmwrite", "vmptrld", "vmptrst", "vmclear", "vmfunc", "vmrun", "vmload",
                     "vmsave", "invept", "invvpid", "stgi", "clgi", "skinit", "getsec",
                     "encls", "enclu", "enclv"), "is a virtualisation or enclave instruction"),
    **dict.fromkeys(("xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec", "xsavec64",
                     "xsaves", "xsaves64", "xrstor", "xrstor64", "xrstors", "xrstors64"),
                    "uses XSAVE state, which the fallback does not carry (Linux: boot with "
                    "noxsave)"),
}
_CONTROL_REGISTER = re.compile(r"\b(cr\d+|dr\d+)\b")
_SEGMENT_DESTINATION = re.compile(r"^(cs|ds|es|fs|gs|ss)\b(?!:)")
_DIRECT_FAR = re.compile(r"^0x[0-9a-f]+:0x")
# x87 and SSE state: loaded only for instructions that name such a register or use it
FPU_ALWAYS = frozenset({"ldmxcsr", "stmxcsr", "wait", "fwait", "fxsave", "fxsave64", "fxrstor",
                        "fxrstor64", "emms", "femms"})


class Decoded(NamedTuple):
    """One instruction: its length, Capstone's mnemonic (with prefixes such as "lock" or
    "rep") and operands."""

    size: int
    mnemonic: str
    operands: str
    data: bytes  # the instruction's bytes

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.operands}".strip()

    @property
    def base(self) -> str:
        """The mnemonic without prefixes: "cmpxchg16b" for "lock cmpxchg16b"."""
        return self.mnemonic.rsplit(" ", 1)[-1]

    @property
    def uses_fpu(self) -> bool:
        """Whether the x87/SSE state must be loaded (false positives only cost time)."""
        base = self.base
        return ("mm" in self.operands or "st(" in self.operands or base in FPU_ALWAYS
                or base.startswith("f"))


class Decoder:
    """Capstone for 64-bit and 32-bit code, created on first use (import costs ~30 ms)."""

    def __init__(self) -> None:
        self._engines: dict[int, Any] = {}

    def decode(self, code: bytes, bits: int) -> Decoded | None:
        """The first instruction of ``code``, or None if Capstone cannot decode it."""
        engine = self._engines.get(bits)
        if engine is None:
            import capstone

            mode = capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32
            engine = self._engines[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode)
        for _, size, mnemonic, operands in engine.disasm_lite(code, 0, 1):
            return Decoded(size, mnemonic, operands, bytes(code[:size]))
        return None


def refusal(insn: Decoded) -> str | None:
    """Why the fallback must not run ``insn``, or None if it may."""
    base = insn.base
    if base in IO_OR_HALT:
        return "is port I/O or HLT, which are never emulated"
    why = SYSTEM.get(base)
    if why is not None:
        return why
    operands = insn.operands
    if _CONTROL_REGISTER.search(operands):
        return "reads or writes control or debug registers"
    if base in ("mov", "pop") and _SEGMENT_DESTINATION.match(operands):
        return "loads a segment register"
    if base in ("jmp", "call") and (_DIRECT_FAR.match(operands)
                                    or operands.startswith(("ptr ", "fword ", "tbyte "))):
        return "is a far transfer (loads CS)"
    return None
