from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from leanvm.devices.bus import Bus
from leanvm.errors import DeviceError


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x1122334455667788 & ((1 << (8 * size)) - 1)

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
def test_dispatch_gives_offset_and_size_and_masks_written_values(size: int) -> None:
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
        if holder and size <= 8:
            seen = devices[holder[0]][1].log[-1]
            assert 0 <= seen[1] and seen[1] + seen[2] <= devices[holder[0]][0]
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


class ByteDevice:
    """A RAM-like device over a bytearray that insists on the device contract: sizes 1, 2,
    4 or 8 only, inside its range."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.calls: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        assert size in (1, 2, 4, 8) and 0 <= offset and offset + size <= len(self.data)
        self.calls.append(("r", offset, size))
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        assert size in (1, 2, 4, 8) and 0 <= offset and offset + size <= len(self.data)
        assert 0 <= value < 1 << (8 * size)
        self.calls.append(("w", offset, size))
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def test_odd_sizes_reach_the_device_in_naturally_aligned_pieces() -> None:
    bus = Bus("mmio", 1 << 32)
    dev = ByteDevice(0x100)
    bus.register(0x5000, 0x100, dev, "dev")
    dev.data[0x10:0x18] = bytes.fromhex("0102030405060708")
    assert bus.read(0x5011, 7) == 0x08070605040302  # bytes 0x11..0x17, little-endian
    assert dev.calls == [("r", 0x11, 1), ("r", 0x12, 2), ("r", 0x14, 4)]
    dev.calls.clear()
    assert bus.read(0x5010, 3) == 0x030201
    assert dev.calls == [("r", 0x10, 2), ("r", 0x12, 1)]
    dev.calls.clear()
    bus.write(0x5023, 5, 0xAABBCCDDEE)
    assert dev.calls == [("w", 0x23, 1), ("w", 0x24, 4)]
    assert bytes(dev.data[0x22:0x29]) == bytes.fromhex("00eeddccbbaa00")
    bus.write(0x5032, 6, 0x665544332211)
    assert bytes(dev.data[0x32:0x38]) == bytes.fromhex("112233445566")
    assert bus.unclaimed_reads == bus.unclaimed_writes == 0
    assert bus.accesses == 4


def test_odd_sizes_that_straddle_a_device_end_are_unclaimed() -> None:
    bus = Bus("mmio", 1 << 32)
    dev = ByteDevice(0x10)
    bus.register(0x5000, 0x10, dev, "dev")
    assert bus.read(0x500E, 3) == 0xFFFFFF
    bus.write(0x500D, 5, 0)
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (1, 1) and dev.calls == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0x40 - 8), st.integers(1, 8),
                          st.integers(0, 2**64 - 1)), max_size=60))
def test_every_size_from_1_to_8_reads_and_writes_like_memory(
        ops: list[tuple[bool, int, int, int]]) -> None:
    """Against a plain bytearray model: every access of 1..8 bytes at any alignment reads
    back what was written, byte for byte; the device only ever sees 1, 2, 4 or 8 bytes
    (ByteDevice asserts it), and an odd size's pieces are naturally aligned."""
    bus = Bus("mmio", 1 << 32)
    dev = ByteDevice(0x40)
    bus.register(0x8000, 0x40, dev, "ram-like")
    model = bytearray(0x40)
    for is_write, offset, size, value in ops:
        dev.calls.clear()
        if is_write:
            bus.write(0x8000 + offset, size, value)
            model[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        else:
            assert bus.read(0x8000 + offset, size) == int.from_bytes(model[offset:offset + size], "little")
        if size not in (1, 2, 4, 8):
            assert all(at % piece == 0 for _, at, piece in dev.calls)
            assert sum(piece for *_, piece in dev.calls) == size
        assert bytes(dev.data) == bytes(model)


def test_pieces_cover_the_access_exactly() -> None:
    from leanvm.devices.bus import pieces

    for address in range(16):
        for size in range(1, 9):
            got = list(pieces(address, size))
            assert got[0][0] == address and sum(s for _, s in got) == size
            assert all(a % s == 0 and s in (1, 2, 4, 8) for a, s in got)
            assert all(a + s == b for (a, s), (b, _) in zip(got, got[1:]))


class Oversized:
    def __init__(self, value: int) -> None:
        self.value = value

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@pytest.mark.parametrize("value", [0x100, -1, 0x1_0000])
def test_a_device_returning_a_value_wider_than_the_read_is_a_device_error(value: int) -> None:
    bus = Bus("mmio", 1 << 32)
    bus.register(0x9000, 0x10, Oversized(value), "too-wide")
    for _ in range(2):  # the first look-up, then the remembered one
        with pytest.raises(DeviceError) as info:
            bus.read(0x9004, 1)
        text = str(info.value)
        assert "too-wide" in text and "offset 0x4" in text and "1-byte" in text
        assert f"{value:#x}" in text
    with pytest.raises(DeviceError, match="too-wide"):
        bus.read(0x9001, 3)  # through the odd-size path as well
    if value >= 0:
        assert bus.read(0x9000, 4) == value  # fits four bytes: fine


def test_unclaimed_counts_are_bounded_and_the_totals_exact() -> None:
    from leanvm.devices.bus import UNCLAIMED_LIMIT

    bus = Bus("mmio", 1 << 40)
    for address in range(0, 50_000 * 8, 8):
        bus.read(address, 4)
    for address in range(0, 10_000 * 8, 8):
        bus.write(address + 4, 4, 0)
    bus.read(0, 4)  # an address already counted keeps counting
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (50_001, 10_000)
    assert len(bus.unclaimed) == UNCLAIMED_LIMIT
    assert bus.unclaimed[0] == 2
    assert sum(bus.unclaimed.values()) + bus.unclaimed_other == 60_001
    summary = bus.unclaimed_summary(top=2)
    assert summary.startswith("0x0 x2, ")
    assert summary.endswith(f"{60_001 - 2 - 1} at other addresses")
    assert Bus("pio", 0x10000).unclaimed_summary() == ""

