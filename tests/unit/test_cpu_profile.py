"""CPU profiles (machine/cpu_profile.py) over a CPUID table built here; bit positions are
the Intel SDM's, written out literally."""

from __future__ import annotations

import pytest

from leanvm.errors import ConfigError
from leanvm.kvm.cpuid import CpuidEntry, CpuidTable
from leanvm.machine import cpu_profile

ALL = 0xFFFF_FFFF
SIGNIFICANT_INDEX = 1


def host_table() -> CpuidTable:
    """A host that offers everything: all feature bits set."""
    return CpuidTable((
        CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
        CpuidEntry(1, 0, 0, 0x906EA, 0x800, ALL, ALL),
        CpuidEntry(7, 0, SIGNIFICANT_INDEX, 1, ALL, ALL, ALL),
        CpuidEntry(7, 1, SIGNIFICANT_INDEX, ALL, 0, 0, 0),
        CpuidEntry(0xD, 0, SIGNIFICANT_INDEX, 0x7, 0x340, 0x340, 0),
        CpuidEntry(0xD, 1, SIGNIFICANT_INDEX, 0xF, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, ALL, ALL),
        CpuidEntry(0x80000008, 0, 0, 0x3027, 0, 0, 0),
    ))


def leaf1_ecx(table: CpuidTable) -> int:
    entry = table.lookup(1)
    assert entry is not None
    return entry.ecx


def test_emulated_hides_the_listed_leaf1_features() -> None:
    table = cpu_profile.apply(host_table(), "emulated")
    hidden = {"pclmulqdq": 1, "ssse3": 9, "fma": 12, "cx16": 13, "sse4_1": 19, "sse4_2": 20,
              "movbe": 22, "popcnt": 23, "aes": 25, "xsave": 26, "osxsave": 27, "avx": 28,
              "f16c": 29, "rdrand": 30}
    ecx = leaf1_ecx(table)
    for name, bit in hidden.items():
        assert not ecx >> bit & 1, name
    kept = ALL & ~sum(1 << bit for bit in hidden.values())
    assert ecx == kept  # SSE3 (bit 0), hypervisor (31) and the rest stay
    assert table.lookup(1).edx == ALL  # type: ignore[union-attr]  # SSE, SSE2, FXSR...


def test_emulated_clears_every_leaf7_subleaf_but_erms_and_leaf_0xd() -> None:
    table = cpu_profile.apply(host_table(), "emulated")
    for entry in table.entries:
        if entry.function in (7, 0xD):
            ebx = entry.ebx if (entry.function, entry.index) != (7, 0) else entry.ebx & ~(1 << 9)
            assert (entry.eax, ebx, entry.ecx, entry.edx) == (0, 0, 0, 0), entry
    assert not table.has("smap") and not table.has("fsgsbase")
    assert table.has("erms")  # REP MOVSB: one emulated instruction per copy
    no_erms = cpu_profile.apply(host_table().without(("erms",)), "emulated")
    assert not no_erms.has("erms")  # kept, never added
    assert table.lookup(0x80000001).edx == ALL  # type: ignore[union-attr]  # untouched
    assert table.phys_addr_bits() == 0x27


def test_host_profile_is_what_kvm_offers() -> None:
    assert cpu_profile.apply(host_table(), "host") == host_table()


def test_cpu_hide_applies_on_top_of_either_profile() -> None:
    table = cpu_profile.apply(host_table(), "host", ("avx", "nx"))
    assert leaf1_ecx(table) == ALL & ~(1 << 28)
    assert not table.has("nx") and table.has("popcnt")
    table = cpu_profile.apply(host_table(), "emulated", ("sse3",))
    assert not leaf1_ecx(table) & 1


def test_hiding_xsave_alone_keeps_leaf_0xd_consistent() -> None:
    table = cpu_profile.apply(host_table(), "host", ("xsave",))
    assert not table.has("osxsave")
    assert all(e.eax == e.ebx == e.ecx == e.edx == 0 for e in table.entries if e.function == 0xD)
    assert table.lookup(7, 0).ebx == ALL  # type: ignore[union-attr]  # leaf 7 untouched


def test_resolve_auto_asks_the_host_only_for_auto() -> None:
    asked = []

    def needs() -> bool:
        asked.append(1)
        return True

    assert cpu_profile.resolve("auto", needs) == "emulated" and asked == [1]
    assert cpu_profile.resolve("auto", lambda: False) == "host"
    assert cpu_profile.resolve("host", needs) == "host" and asked == [1]
    assert cpu_profile.resolve("emulated", needs) == "emulated"
    with pytest.raises(ConfigError, match="bad CPU profile 'fast'"):
        cpu_profile.resolve("fast", needs)


def test_with_leaf_cleared_rejects_unknown_registers() -> None:
    with pytest.raises(ConfigError, match="bad CPUID register 'esi'"):
        host_table().with_leaf_cleared(7, ("esi",))
    cleared = host_table().with_leaf_cleared(7, ("ebx",))
    assert cleared.lookup(7, 0).ecx == ALL and cleared.lookup(7, 0).ebx == 0  # type: ignore[union-attr]


def test_describe_names_the_hidden_features() -> None:
    text = cpu_profile.describe("emulated")
    assert "cx16" in text and "leaf-7" in text
    assert "every feature" in cpu_profile.describe("host")


def test_linux_parameters_for_unhidden_features() -> None:
    from leanvm.machine.cpu_profile import linux_parameters, with_parameters

    assert linux_parameters("host", ("xsave", "smap")) == ()
    assert linux_parameters("emulated", ()) == ("cryptomgr.notests",)
    assert linux_parameters("emulated", ("avx", "smap", "sha", "erms")) == (
        "cryptomgr.notests", "noxsave", "clearcpuid=smap,sha_ni")  # ERMS stays: REP MOVSB
    assert linux_parameters("emulated", ("popcnt",)) == ("cryptomgr.notests",
                                                         "clearcpuid=popcnt")
    # a user who wants the self-tests says so, and that wins
    line, added = with_parameters("cryptomgr.notests=0", linux_parameters("emulated", ()))
    assert line == "cryptomgr.notests=0" and added == ()
    line, added = with_parameters("console=ttyS0 noxsave", ("noxsave", "clearcpuid=smap"))
    assert line == "console=ttyS0 noxsave clearcpuid=smap" and added == ("clearcpuid=smap",)
    assert with_parameters("", ("noxsave",)) == ("noxsave", ("noxsave",))


def kvm_like_table(pv_eax: int) -> "CpuidTable":
    from leanvm.kvm.cpuid import CpuidEntry, CpuidTable

    return CpuidTable((CpuidEntry(1, 0, 0, 0xA00F11, 0, 0x00202001, 0x78BFBFF),
                       CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
                       CpuidEntry(0x40000001, 0, 0, pv_eax, 0, 0, 0)))


def test_guests_get_the_hypervisor_bit_and_kvms_paravirtual_features_it_offers() -> None:
    from leanvm.machine.cpu_profile import apply

    offered = 0x1007EFB  # what this project's host's KVM offers (measured 2026-12-01)
    table = apply(kvm_like_table(offered), "host")
    leaf1, pv = table.lookup(1), table.lookup(0x40000001)
    assert leaf1.ecx >> 31 & 1  # without it Linux never reads the KVM leaves
    assert not leaf1.ecx >> 24 & 1  # TSC-deadline only where KVM says the LAPIC has it
    # kvm-clock (0, 3), its stable bit (24), no-I/O-delay (1), steal time (5), PV EOI (6),
    # PV unhalt (7), PV TLB flush (9), PV IPI (11), poll control (12); not async PF (4)
    expected = sum(1 << bit for bit in (0, 1, 3, 5, 6, 7, 9, 11, 12, 24)) & offered
    assert pv.eax == expected and not pv.eax >> 4 & 1
    assert table.lookup(0x40000000).ebx == 0x4B4D564B  # "KVMK": the signature stays
    assert apply(kvm_like_table(offered), "host", tsc_deadline=True).lookup(1).ecx >> 24 & 1


def test_what_the_host_does_not_offer_is_not_given_and_cpu_hide_can_take_it_away() -> None:
    from leanvm.machine.cpu_profile import apply

    table = apply(kvm_like_table(1 << 3), "host")  # only kvmclock2 offered
    assert table.lookup(0x40000001).eax == 1 << 3
    hidden = apply(kvm_like_table(0x1007EFB), "host", hide=("kvmclock", "kvmclock2"))
    assert not hidden.lookup(0x40000001).eax & 0b1001
