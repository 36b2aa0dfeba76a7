"""CPU profiles: which CPUID features a guest sees (``--cpu-profile``).

A host whose KVM emulates guest supervisor code instruction by instruction (docs/emulation.md)
cannot emulate many of the newer instructions. A kernel that finds a feature in CPUID uses it
at CPL 0, so every use ends in an emulation failure: the "emulated" profile hides those
features, and the kernel takes its older code paths that the host can run.

    host      what KVM_GET_SUPPORTED_CPUID offers
    emulated  host, without EMULATED_HIDDEN and the leaf-7 feature words
    auto      emulated on hosts that need it (machine/host_check.py), else host

``--cpu-hide`` (MachineConfig.hide_cpu_features) applies on top of any profile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from leanvm.errors import ConfigError
from leanvm.kvm.cpuid import FEATURES, KVM_CPUID_FEATURES, CpuidTable

PROFILES = ("host", "emulated")  # "auto" resolves to one of these

# Leaf-1 features whose instructions the host could not emulate at CPL 0 (a stock Debian
# kernel needed each hidden to get this far: docs/facts.md#what-it-cannot-emulate):
# CMPXCHG16B, XSAVE/XRSTOR and what needs them (OSXSAVE, AVX, FMA, F16C), RDRAND, POPCNT,
# MOVBE, and the SSE3+ extensions.
EMULATED_HIDDEN: tuple[str, ...] = (
    "cx16", "xsave", "osxsave", "avx", "fma", "f16c", "rdrand", "popcnt", "movbe",
    "sse4_1", "sse4_2", "ssse3", "pclmulqdq", "aes",
)
STRUCTURED_FEATURES_LEAF = 7  # Intel SDM: structured extended feature flags (all subleaves)
# Leaf-7 features the emulated profile keeps: with ERMS the kernel copies and clears memory
# with one REP MOVSB/STOSB, which such a host emulates as one instruction; without it, with
# loops of moves, each emulated on its own (the minimal kernel then took minutes longer
# to reach "Run /init" here, measured).
EMULATED_KEEP: tuple[str, ...] = ("erms",)
XSAVE_LEAF = 0xD  # Intel SDM: processor extended state enumeration


def resolve(setting: str, host_needs_emulated: Callable[[], bool]) -> str:
    """"host" or "emulated" for a MachineConfig.cpu_profile setting; ``host_needs_emulated``
    is only called for "auto" (it may run the host check)."""
    if setting == "auto":
        return "emulated" if host_needs_emulated() else "host"
    if setting not in PROFILES:
        raise ConfigError(f"bad CPU profile {setting!r}: expected auto, {', '.join(PROFILES)}")
    return setting


# KVM's paravirtual features a guest gets, where the host's KVM offers them: what QEMU
# enables for a KVM guest by default (kvm-clock with the stable bit, no port-I/O delays,
# steal time, PV EOI, PV unhalt, PV TLB flush, PV IPIs, poll control). With kvm-clock,
# Linux reads the TSC frequency from KVM instead of calibrating it against the PIT, and
# keeps the TSC as its clock source: clock reads stay in the guest.
PARAVIRT: tuple[str, ...] = (
    "kvmclock", "kvmclock2", "kvmclock_stable_bit", "kvm_nopiodelay", "kvm_steal_time",
    "kvm_pv_eoi", "kvm_pv_unhalt", "kvm_pv_tlb_flush", "kvm_pv_ipi", "kvm_poll_control",
)


def paravirtual(table: CpuidTable, tsc_deadline: bool) -> CpuidTable:
    """What a VMM adds to KVM's supported CPUID: the hypervisor bit (leaf 1 ECX[31], which
    KVM leaves to the VMM and without which Linux never looks at the KVM leaves), KVM's
    feature leaf reduced to PARAVIRT (of what KVM offers), and the TSC-deadline timer mode
    of the in-kernel LAPIC where KVM has it (KVM_CAP_TSC_DEADLINE_TIMER)."""
    features = table.lookup(KVM_CPUID_FEATURES)
    if features is not None:
        wanted = sum(1 << FEATURES[name][3] for name in PARAVIRT)
        table = table.with_register(KVM_CPUID_FEATURES, features.index, "eax",
                                    features.eax & wanted)
    return table.with_features(("hypervisor", "tsc_deadline") if tsc_deadline
                               else ("hypervisor",))


def apply(table: CpuidTable, profile: str, hide: Sequence[str] = (),
          tsc_deadline: bool = False) -> CpuidTable:
    """``table`` (KVM's supported CPUID) as a guest with ``profile`` sees it (with the
    paravirtual leaves), then without the features named in ``hide``."""
    table = paravirtual(table, tsc_deadline)
    if profile == "emulated":
        kept = [name for name in EMULATED_KEEP if table.has(name)]
        table = (table.without(EMULATED_HIDDEN).with_leaf_cleared(STRUCTURED_FEATURES_LEAF)
                 .with_features(kept))
    elif profile != "host":
        raise ConfigError(f"bad CPU profile {profile!r}: expected {', '.join(PROFILES)}")
    if hide:
        table = table.without(hide)
    if not table.has("xsave"):
        table = table.without(("osxsave",)).with_leaf_cleared(XSAVE_LEAF)  # nothing to enumerate
    return table


def describe(profile: str) -> str:
    """One line saying what ``profile`` hides (for `leanvm version` and messages)."""
    if profile == "emulated":
        return ("emulated CPU profile: hides " + ", ".join(EMULATED_HIDDEN)
                + " and the leaf-7 feature words but ERMS (leaf 0xD cleared with XSAVE)")
    return "host CPU profile: every feature KVM offers"


# Features Linux disables as a group with "noxsave" (XSAVE and what needs it).
XSAVE_FAMILY = frozenset({"xsave", "osxsave", "avx", "avx2", "avx512f", "fma", "f16c"})
LINUX_NAMES = {"sha": "sha_ni"}  # our name -> Linux's (/proc/cpuinfo, clearcpuid=)


# What the emulated profile asks of Linux whatever the host shows: skip the crypto API's
# boot-time self-tests. Debian's kernel runs RSA private-key test vectors that take over half
# an hour of emulated kernel code on such a host (RIP samples: mpihelp_* through the whole
# gap), while the X.509 certificate load waiting for them times out (-110); with the tests
# skipped its boot to "Run /init" took 17 min instead of 45-54 (docs/linux.md).
EMULATED_HOST_PARAMETERS = ("cryptomgr.notests",)


def linux_parameters(profile: str, unhidden: Sequence[str]) -> tuple[str, ...]:
    """Kernel parameters for the emulated profile: EMULATED_HOST_PARAMETERS, then what
    makes Linux itself leave alone the features the profile meant to hide but this host's
    CPUID shows anyway (``unhidden``, from the host check): ``noxsave`` for XSAVE and its
    family, ``clearcpuid=`` for the rest (Linux 6.x takes feature names). Nothing for the
    host profile."""
    if profile != "emulated":
        return ()
    params = list(EMULATED_HOST_PARAMETERS)
    if XSAVE_FAMILY & set(unhidden):
        params.append("noxsave")
    rest = [LINUX_NAMES.get(name, name) for name in unhidden
            if name not in XSAVE_FAMILY and name not in EMULATED_KEEP]
    if rest:
        params.append("clearcpuid=" + ",".join(rest))
    return tuple(params)


def reasons_for(added: Sequence[str]) -> list[str]:
    """Why the emulated profile added each kind of parameter in ``added``, for people."""
    why = []
    if any(p in EMULATED_HOST_PARAMETERS for p in added):
        why.append("no crypto self-tests")
    if any(p == "noxsave" or p.startswith("clearcpuid=") for p in added):
        why.append("features this host shows whatever CPUID says")
    return why


def with_parameters(cmdline: str, params: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """(``cmdline`` with the ``params`` it does not already set, the ones added). A
    parameter the user gave (same name before "=") wins."""
    given = {word.split("=", 1)[0] for word in cmdline.split()}
    added = tuple(p for p in params if p.split("=", 1)[0] not in given)
    return " ".join([cmdline.strip(), *added]).strip(), added
