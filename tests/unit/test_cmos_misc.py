from __future__ import annotations

import calendar

from hypothesis import given, strategies as st

from leanvm.devices import cmos
from leanvm.devices.cmos import Cmos
from leanvm.devices.debugcon import DebugCon
from leanvm.devices.port92 import Port92

MiB = 1 << 20


def reg(dev: Cmos, index: int) -> int:
    dev.write(cmos.INDEX, 1, index)
    return dev.read(cmos.DATA, 1)


def test_memory_sizes_as_pc_firmware_expects() -> None:
    dev = Cmos(low_ram=3 << 30, high_ram=1 << 30, cpus=2)
    assert reg(dev, 0x15) | reg(dev, 0x16) << 8 == 640
    assert reg(dev, 0x17) | reg(dev, 0x18) << 8 == 0xFC00  # capped at 63 MiB
    assert reg(dev, 0x34) | reg(dev, 0x35) << 8 == ((3 << 30) - (16 << 20)) // 65536
    assert reg(dev, 0x5B) | reg(dev, 0x5C) << 8 | reg(dev, 0x5D) << 16 == (1 << 30) // 65536
    assert reg(dev, 0x5F) == 1
    small = Cmos(low_ram=8 * MiB, high_ram=0)
    assert reg(small, 0x17) | reg(small, 0x18) << 8 == 7 * 1024
    assert reg(small, 0x34) == 0 and reg(small, 0x35) == 0


def test_clock_is_bcd_utc() -> None:
    when = calendar.timegm((2026, 11, 21, 13, 45, 59, 0, 0, 0))
    dev = Cmos(low_ram=MiB, high_ram=0, clock=lambda: when)
    assert [reg(dev, i) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == [
        0x59, 0x45, 0x13, 0x21, 0x11, 0x26, 0x20]
    assert reg(dev, 0x0A) & 0x80 == 0 and reg(dev, 0x0D) == 0x80


def test_nmi_bit_is_not_part_of_the_index_and_ram_is_writable() -> None:
    dev = Cmos(low_ram=MiB, high_ram=0)
    dev.write(cmos.INDEX, 1, 0x80 | 0x40)
    dev.write(cmos.DATA, 1, 0x5A)
    assert reg(dev, 0x40) == 0x5A


@given(st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.integers(0, 255)), max_size=200))
def test_random_traffic_never_raises(ops: list[tuple[int, bool, int]]) -> None:
    dev = Cmos(low_ram=64 * MiB, high_ram=0)
    for offset, is_write, value in ops:
        if is_write:
            dev.write(offset, 1, value)
        else:
            assert 0 <= dev.read(offset, 1) <= 0xFF


def test_port92_and_debugcon() -> None:
    resets = []
    port = Port92(lambda: resets.append(1))
    assert port.read(0, 1) & 0x02
    port.write(0, 1, 0x00)
    assert port.read(0, 1) == 0x02 and resets == []
    port.write(0, 1, 0x01)
    assert resets == [1]
    out = bytearray()
    con = DebugCon(out.extend)
    con.write(0, 1, ord("A"))
    assert out == b"A" and con.read(0, 1) == 0xE9
