from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from leanvm.devices.bus import Bus
from leanvm.errors import DeviceError


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x1122334455667788

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_overlapping_ranges_are_refused_with_both_names() -> None:
    bus = Bus("mmio", 1 << 32)
    bus.register(0x1000, 0x100, Recorder(), "a")
    with pytest.raises(DeviceError, match=r"overlaps a"):
        bus.register(0x10FF, 0x10, Recorder(), "b")
    with pytest.raises(DeviceError, match="overlaps a"):
        bus.register(0x0F00, 0x101, Recorder(), "c")
    bus.register(0x1100, 0x10, Recorder(), "adjacent")  # touching is fine
    bus.register(0x0F00, 0x100, Recorder(), "below")
    assert [m.name for m in bus.mappings] == ["below", "a", "adjacent"]


def test_ranges_outside_the_bus_are_refused() -> None:
    bus = Bus("pio", 0x10000)
    with pytest.raises(DeviceError, match="outside"):
        bus.register(0xFFFF, 2, Recorder(), "x")
    with pytest.raises(DeviceError):
        bus.register(0x10, 0, Recorder(), "empty")


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_dispatch_gives_offset_and_size_and_masks_values(size: int) -> None:
    bus = Bus("mmio", 1 << 32)
    dev = Recorder()
    bus.register(0x5000, 0x100, dev, "dev")
    assert bus.read(0x5010, size) == 0x1122334455667788 & ((1 << (8 * size)) - 1)
    bus.write(0x5020, size, -1)
    assert dev.log == [("r", 0x10, size), ("w", 0x20, size, (1 << (8 * size)) - 1)]


def test_unclaimed_accesses_read_all_ones_and_are_counted() -> None:
    bus = Bus("pio", 0x10000)
    dev = Recorder()
    bus.register(0x100, 4, dev, "dev")
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x80, 2, 5)
    assert bus.read(0x103, 2) == 0xFFFF  # straddles the device's end: nobody claims it
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (3, 1)
    assert bus.unclaimed[0x80] == 3 and bus.unclaimed[0x103] == 1
    assert dev.log == []


def test_unregister() -> None:
    bus = Bus("pio", 0x10000)
    bus.register(0x100, 4, Recorder(), "dev")
    bus.unregister(0x100)
    assert bus.lookup(0x100) is None
    with pytest.raises(DeviceError):
        bus.unregister(0x100)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 64)), max_size=30),
       st.lists(st.tuples(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 3, 4, 8, 16]),
                          st.integers(0, 2**64 - 1)), max_size=50))
def test_random_maps_and_traffic(ranges: list[tuple[int, int]], traffic: list[tuple[int, int, int]]) -> None:
    """Whatever gets registered never overlaps; any access either reaches exactly the device
    that wholly holds it, with an in-range offset, or is counted as unclaimed."""
    bus = Bus("pio", 0x10000)
    devices = {}
    for base, size in ranges:
        dev = Recorder()
        try:
            bus.register(base, size, dev, f"d{base}")
        except DeviceError:
            continue
        devices[base] = (size, dev)
    maps = sorted((m.base, m.end) for m in bus.mappings)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(maps, maps[1:]))
    for address, size, value in traffic:
        before = bus.unclaimed_reads
        result = bus.read(address, size)
        holder = [b for b, (s, _) in devices.items() if b <= address and address + size <= b + s]
        if holder and size in (1, 2, 4, 8):
            offset = devices[holder[0]][1].log[-1][1]
            assert 0 <= offset and offset + size <= devices[holder[0]][0]
        else:
            assert bus.unclaimed_reads == before + 1
        assert 0 <= result < (1 << (8 * size)) if size <= 8 else result == 0
        bus.write(address, size, value)


def test_remembered_accesses_follow_the_ranges_as_they_change() -> None:
    bus = Bus("pio", 0x10000)
    first, second = Recorder(), Recorder()
    bus.register(0x80, 4, first, "first")
    bus.write(0x81, 1, 0x1FF)
    bus.write(0x81, 1, 0x2)  # the second time from the remembered look-up
    assert bus.read(0x82, 2) == 0x7788
    assert first.log == [("w", 1, 1, 0xFF), ("w", 1, 1, 0x2), ("r", 2, 2)]
    bus.unregister(0x80)
    bus.write(0x81, 1, 3)
    assert bus.read(0x82, 2) == 0xFFFF
    assert (bus.unclaimed_writes, bus.unclaimed_reads) == (1, 1)
    bus.register(0x7F, 8, second, "second")
    bus.write(0x81, 1, 4)
    assert bus.read(0x82, 2) == 0x7788
    assert second.log == [("w", 2, 1, 4), ("r", 3, 2)] and len(first.log) == 3
    assert bus.accesses == 7


@given(st.lists(st.tuples(st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4, 8, 3])),
                max_size=300))
def test_remembered_and_fresh_look_ups_agree(accesses: list[tuple[int, int]]) -> None:
    cached, fresh = Bus("mmio", 0x4000), Bus("mmio", 0x4000)
    logs = []
    for bus in (cached, fresh):
        log = Recorder()
        logs.append(log)
        bus.register(0x100, 0x800, log, "a")
        bus.register(0x1000, 0x10, log, "b")
    for address, size in accesses:
        cached.write(address, size, address)
        fresh.write(address, size, address)
        assert cached.read(address, size) == fresh.read(address, size)
        fresh._reads.clear()  # the reference bus never remembers
        fresh._writes.clear()
    assert logs[0].log == logs[1].log
    assert cached.unclaimed == fresh.unclaimed


def test_a_guest_walking_addresses_cannot_grow_the_memory_of_look_ups() -> None:
    bus = Bus("mmio", 1 << 32)
    bus.register(0, 1 << 30, Recorder(), "ram-like")
    for address in range(0, 20_000 * 8, 8):
        bus.read(address, 8)
    assert len(bus._reads) <= 4096
