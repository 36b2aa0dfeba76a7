"""Per-vCPU CPUID (machine/topology.py): APIC ids and one package of N cores, consistently in
leaves 1, 4, 0xB and 0x1F; and the fw_cfg CPU counts firmware reads."""

from __future__ import annotations

import struct

import pytest

from leanvm.abi import kvm as abi
from leanvm.kvm.cpuid import CpuidEntry, CpuidTable
from leanvm.machine.topology import AMD, id_bits, vcpu_cpuid

SIG = abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel": EBX, ECX, EDX


def host_like(vendor: tuple[int, int, int] = INTEL, with_0b: bool = True) -> CpuidTable:
    """Shaped like this host's KVM_GET_SUPPORTED_CPUID (host APIC id 3, 2 logical CPUs)."""
    entries = [
        CpuidEntry(0, 0, 0, 0x20, *vendor),
        CpuidEntry(1, 0, 0, 0xC06F2, 0x03020800, 0x81202000, 0x0F8BFBFF),
        CpuidEntry(4, 0, SIG, 0x4000121, 0x2C0003F, 0x3F, 0),  # L1d
        CpuidEntry(4, 1, SIG, 0x4000122, 0x1C0003F, 0x3F, 0),  # L1i
        CpuidEntry(4, 2, SIG, 0x4000143, 0x3C0003F, 0x7FF, 0),  # L2
        CpuidEntry(4, 3, SIG, 0x4004163, 0x4C0003F, 0x3BFFF, 4),  # L3
        CpuidEntry(4, 4, SIG, 0, 0, 0, 0),
        CpuidEntry(0x80000008, 0, 0, 0x392E, 0x100D200, 0, 0),
    ]
    if with_0b:
        entries += [CpuidEntry(0xB, 0, SIG, 0, 0, 0, 0), CpuidEntry(0x1F, 0, SIG, 0, 0, 0, 0)]
    return CpuidTable(tuple(entries))


def leaf(table: CpuidTable, function: int, index: int = 0) -> CpuidEntry:
    found = table.lookup(function, index)
    assert found is not None, (hex(function), index)
    return found


@pytest.mark.parametrize("count", [1, 2, 3, 4, 8, 64])
def test_each_vcpu_sees_its_apic_id_and_the_same_topology(count: int) -> None:
    base = host_like()
    for index in {0, count // 2, count - 1}:
        table = vcpu_cpuid(base, index, count)
        one = leaf(table, 1)
        assert one.ebx >> 24 == index and (one.ebx >> 16) & 0xFF == count
        assert one.ebx & 0xFFFF == 0x0800  # brand index, CLFLUSH size kept
        assert bool(one.edx & (1 << 28)) == (count > 1)  # HTT
        for function in (0xB, 0x1F):
            smt, core, end = (leaf(table, function, i) for i in range(3))
            assert (smt.eax, smt.ebx & 0xFFFF, smt.ecx) == (0, 1, 0x100)
            assert (core.eax, core.ebx & 0xFFFF, core.ecx) == (id_bits(count), count, 0x201)
            assert (end.eax, end.ebx, end.ecx & 0xFF00) == (0, 0, 0)
            assert smt.edx == core.edx == end.edx == index  # x2APIC id on every subleaf
            assert index >> core.eax == 0  # one package
        for cache in range(4):
            eax = leaf(table, 4, cache).eax
            assert eax >> 26 == count - 1  # cores per package - 1
            sharing = ((eax >> 14) & 0xFFF) + 1
            assert sharing == (count if (eax >> 5) & 7 == 3 else 1)
            assert eax & 0x3FFF == leaf(base, 4, cache).eax & 0x3FFF  # cache type/level kept
        assert leaf(table, 4, 4).eax == 0


def test_other_leaves_are_untouched_and_the_input_is_not_changed() -> None:
    base = host_like()
    table = vcpu_cpuid(base, 1, 2)
    assert leaf(table, 0) == leaf(base, 0) and leaf(table, 0x80000008) == leaf(base, 0x80000008)
    assert leaf(base, 1).ebx >> 24 == 3  # the host's value, still in the original
    assert len([e for e in table.entries if e.function == 0xB]) == 3


def test_topology_leaves_are_added_when_the_max_leaf_covers_them() -> None:
    table = vcpu_cpuid(host_like(with_0b=False), 2, 3)
    assert leaf(table, 0xB, 1).ebx == 3 and leaf(table, 0x1F, 0).edx == 2


def test_amd_core_count_in_leaf_0x80000008() -> None:
    table = vcpu_cpuid(host_like(AMD), 0, 6)
    ecx = leaf(table, 0x80000008).ecx
    assert ecx & 0xFF == 5 and (ecx >> 12) & 0xF == 3


def test_index_outside_the_count_is_refused() -> None:
    with pytest.raises(ValueError):
        vcpu_cpuid(host_like(), 2, 2)


def test_fw_cfg_reports_the_vcpu_count() -> None:
    from leanvm.devices import fw_cfg
    from leanvm.layout.x86 import plan_x86_layout
    from leanvm.machine.memory_manager import build_ram
    from leanvm.machine.platform import firmware_config as build_fw_cfg

    plan = plan_x86_layout(16 << 20, pa_bits=40)
    memory = build_ram(plan)
    try:
        config = build_fw_cfg(plan, memory, cpus=3)
        for key in (fw_cfg.NB_CPUS, fw_cfg.MAX_CPUS):
            config.write(fw_cfg.SELECTOR, 2, key)
            assert struct.unpack("<H", bytes(config.read(fw_cfg.DATA, 1) for _ in range(2))) == (3,)
    finally:
        memory.close()
