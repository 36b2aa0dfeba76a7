"""CPUID tables: built from KVM_GET_SUPPORTED_CPUID, with named features that can be hidden."""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Iterable, Sequence

from leanvm.abi import kvm as abi
from leanvm.errors import ConfigError

# name -> (leaf, subleaf, register, bit); from the Intel SDM CPUID tables.
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "sse3": (1, 0, "ecx", 0),
    "pclmulqdq": (1, 0, "ecx", 1),
    "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13),
    "pcid": (1, 0, "ecx", 17),
    "sse4_1": (1, 0, "ecx", 19),
    "sse4_2": (1, 0, "ecx", 20),
    "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22),
    "popcnt": (1, 0, "ecx", 23),
    "tsc_deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25),
    "xsave": (1, 0, "ecx", 26),
    "osxsave": (1, 0, "ecx", 27),
    "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30),
    "hypervisor": (1, 0, "ecx", 31),
    "fpu": (1, 0, "edx", 0),
    "pse": (1, 0, "edx", 3),
    "tsc": (1, 0, "edx", 4),
    "msr": (1, 0, "edx", 5),
    "pae": (1, 0, "edx", 6),
    "apic": (1, 0, "edx", 9),
    "sep": (1, 0, "edx", 11),
    "mtrr": (1, 0, "edx", 12),
    "pge": (1, 0, "edx", 13),
    "cmov": (1, 0, "edx", 15),
    "pat": (1, 0, "edx", 16),
    "clflush": (1, 0, "edx", 19),
    "mmx": (1, 0, "edx", 23),
    "fxsr": (1, 0, "edx", 24),
    "sse": (1, 0, "edx", 25),
    "sse2": (1, 0, "edx", 26),
    "fsgsbase": (7, 0, "ebx", 0),
    "bmi1": (7, 0, "ebx", 3),
    "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7),
    "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9),
    "invpcid": (7, 0, "ebx", 10),
    "avx512f": (7, 0, "ebx", 16),
    "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20),
    "clflushopt": (7, 0, "ebx", 23),
    "sha": (7, 0, "ebx", 29),
    "umip": (7, 0, "ecx", 2),
    "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16),
    "rdpid": (7, 0, "ecx", 22),
    "lahf_lm": (0x80000001, 0, "ecx", 0),
    "abm": (0x80000001, 0, "ecx", 5),
    "syscall": (0x80000001, 0, "edx", 11),
    "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
    "invtsc": (0x80000007, 0, "edx", 8),  # invariant TSC (AMD APM / Intel SDM leaf 0x80000007)
    # KVM's paravirtual features, leaf 0x40000001 EAX (Linux
    # Documentation/virt/kvm/x86/cpuid.rst; docs/facts.md#kvm-abi-facts-the-code-uses)
    "kvmclock": (0x40000001, 0, "eax", 0),  # kvm-clock at the old MSRs 0x11/0x12
    "kvm_nopiodelay": (0x40000001, 0, "eax", 1),  # no delays needed on port I/O
    "kvmclock2": (0x40000001, 0, "eax", 3),  # kvm-clock at MSRs 0x4b564d00/01
    "kvm_asyncpf": (0x40000001, 0, "eax", 4),
    "kvm_steal_time": (0x40000001, 0, "eax", 5),
    "kvm_pv_eoi": (0x40000001, 0, "eax", 6),
    "kvm_pv_unhalt": (0x40000001, 0, "eax", 7),
    "kvm_pv_tlb_flush": (0x40000001, 0, "eax", 9),
    "kvm_asyncpf_vmexit": (0x40000001, 0, "eax", 10),
    "kvm_pv_ipi": (0x40000001, 0, "eax", 11),
    "kvm_poll_control": (0x40000001, 0, "eax", 12),
    "kvm_pv_sched_yield": (0x40000001, 0, "eax", 13),
    "kvm_asyncpf_int": (0x40000001, 0, "eax", 14),
    "kvm_msi_ext_dest_id": (0x40000001, 0, "eax", 15),
    "kvmclock_stable_bit": (0x40000001, 0, "eax", 24),
}
KVM_CPUID_SIGNATURE = 0x40000000  # EAX: highest KVM leaf; EBX, ECX, EDX: "KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0" as EBX, ECX, EDX

_REGS = ("eax", "ebx", "ecx", "edx")


class CpuidEntry(NamedTuple):
    """One CPUID answer: leaf (EAX input), subleaf (ECX input) and the four outputs."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class CpuidTable(NamedTuple):
    """An immutable CPUID table; ``without`` returns a copy with features hidden."""

    entries: tuple[CpuidEntry, ...]

    @classmethod
    def from_entries(cls, raw: Iterable[abi.kvm_cpuid_entry2]) -> "CpuidTable":
        return cls(tuple(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                         for e in raw))

    def lookup(self, function: int, index: int = 0) -> CpuidEntry | None:
        for entry in self.entries:
            if entry.function != function:
                continue
            if entry.flags & abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX and entry.index != index:
                continue
            return entry
        return None

    def has(self, feature: str) -> bool:
        leaf, sub, reg, bit = _feature(feature)
        entry = self.lookup(leaf, sub)
        return entry is not None and bool(getattr(entry, reg) >> bit & 1)

    def without(self, features: Sequence[str]) -> "CpuidTable":
        """A copy with each named feature's bit cleared (unknown names are a ConfigError)."""
        clear: dict[tuple[int, int, str], int] = {}
        for name in features:
            leaf, sub, reg, bit = _feature(name)
            clear[(leaf, sub, reg)] = clear.get((leaf, sub, reg), 0) | (1 << bit)
        out = []
        for entry in self.entries:
            for (leaf, sub, reg), mask in clear.items():
                if entry.function == leaf and entry.index == sub:
                    entry = entry._replace(**{reg: getattr(entry, reg) & ~mask})
            out.append(entry)
        return CpuidTable(tuple(out))

    def with_features(self, features: Sequence[str]) -> "CpuidTable":
        """A copy with each named feature's bit set (in leaves the table has)."""
        out = list(self.entries)
        for name in features:
            leaf, sub, reg, bit = _feature(name)
            out = [e._replace(**{reg: getattr(e, reg) | 1 << bit})
                   if e.function == leaf and e.index == sub else e for e in out]
        return CpuidTable(tuple(out))

    def with_leaf_cleared(self, function: int,
                          registers: Sequence[str] = _REGS) -> "CpuidTable":
        """A copy with the named output registers of every subleaf of ``function`` zeroed:
        hides whole feature words (leaf 7) or a leaf that must agree with a hidden bit
        (leaf 0xD, XSAVE state components, when XSAVE is hidden)."""
        for reg in registers:
            if reg not in _REGS:
                raise ConfigError(f"bad CPUID register {reg!r}: expected one of {', '.join(_REGS)}")
        zero = dict.fromkeys(registers, 0)
        return CpuidTable(tuple(entry._replace(**zero) if entry.function == function else entry
                                for entry in self.entries))

    def with_register(self, function: int, index: int, register: str,
                      value: int) -> "CpuidTable":
        """A copy with one register of one leaf (and subleaf) set to ``value``."""
        return CpuidTable(tuple(e._replace(**{register: value})
                                if e.function == function and e.index == index else e
                                for e in self.entries))

    def phys_addr_bits(self) -> int:
        """Guest physical address width from leaf 0x80000008 (36 if the leaf is absent)."""
        entry = self.lookup(0x80000008)
        return entry.eax & 0xFF if entry is not None else 36

    def to_struct(self) -> object:
        """A kvm_cpuid2 with entries, ready for KVM_SET_CPUID2."""
        buf = abi.kvm_cpuid2_with(len(self.entries))()
        buf.nent = len(self.entries)
        for slot, entry in zip(buf.entries, self.entries):
            slot.function, slot.index, slot.flags = entry.function, entry.index, entry.flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
        return buf


def _feature(name: str) -> tuple[int, int, str, int]:
    try:
        return FEATURES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(FEATURES))
        raise ConfigError(f"unknown CPU feature {name!r}: expected one of {known}") from None
