from __future__ import annotations

from hypothesis import given, strategies as st

from leanvm.devices import pci
from leanvm.devices.pci import PciHost


def cfg_read(host: PciHost, dev: int, fn: int, reg: int, size: int = 4) -> int:
    host.write(pci.ADDRESS, 4, pci.ENABLE | dev << 11 | fn << 8 | (reg & 0xFC))
    return host.read(pci.DATA + (reg & 3), size)


def cfg_write(host: PciHost, dev: int, fn: int, reg: int, size: int, value: int) -> None:
    host.write(pci.ADDRESS, 4, pci.ENABLE | dev << 11 | fn << 8 | (reg & 0xFC))
    host.write(pci.DATA + (reg & 3), size, value)


def test_i440fx_and_piix3_identify() -> None:
    host = PciHost()
    assert cfg_read(host, 0, 0, 0) == 0x1237_8086
    assert cfg_read(host, 0, 0, 0x08) >> 8 == 0x060000
    assert cfg_read(host, 1, 0, 0) == 0x7000_8086
    assert cfg_read(host, 1, 0, 0x0E, 1) & 0x80  # multi-function
    assert cfg_read(host, 2, 0, 0) == 0xFFFFFFFF  # nothing there
    assert cfg_read(host, 0, 0, 0x72, 1) == pci.SMRAM_DEFAULT


def test_pam_writes_are_reported_and_ids_are_read_only() -> None:
    seen = []
    host = PciHost(lambda register, value: seen.append((register, value)))
    cfg_write(host, 0, 0, 0x59, 1, 0x30)
    cfg_write(host, 0, 0, 0x5A, 4, 0x33333333)  # 0x5A-0x5D in one dword write
    assert seen == [(0x59, 0x30), (0x5A, 0x33), (0x5B, 0x33), (0x5C, 0x33), (0x5D, 0x33)]
    assert cfg_read(host, 0, 0, 0x59, 1) == 0x30
    cfg_write(host, 0, 0, 0x00, 4, 0)
    assert cfg_read(host, 0, 0, 0x00) == 0x1237_8086


def test_disabled_or_other_bus_reads_all_ones() -> None:
    host = PciHost()
    host.write(pci.ADDRESS, 4, 0)  # enable bit clear
    assert host.read(pci.DATA, 4) == 0xFFFFFFFF
    host.write(pci.ADDRESS, 4, pci.ENABLE | 1 << 16)
    assert host.read(pci.DATA, 2) == 0xFFFF


@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.booleans(),
                          st.integers(0, 2**32 - 1)), max_size=200))
def test_random_traffic_never_raises(ops: list[tuple[int, int, bool, int]]) -> None:
    host = PciHost()
    for offset, size, is_write, value in ops:
        if is_write:
            host.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= host.read(offset, size) < 1 << (8 * size)
    assert cfg_read(host, 0, 0, 0) == 0x1237_8086
