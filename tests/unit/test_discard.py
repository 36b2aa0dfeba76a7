"""The discard manager: state per block, listeners in order (populate forwards, discard in
reverse), a refused populate undone, replay of populated and discarded runs; and guest
memory reads that never touch discarded host pages."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from leanvm.errors import DeviceError, GuestError
from leanvm.memory.discard import DiscardManager
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous
from leanvm.memory.residency import measure

MB = 1 << 20
BLOCK = 2 * MB


class Log:
    def __init__(self, name: str, events: list, refuse: bool = False) -> None:
        self.name, self.events, self.refuse = name, events, refuse

    def on_populate(self, offset: int, size: int) -> None:
        if self.refuse:
            raise DeviceError(f"{self.name} refuses")
        self.events.append((self.name, "populate", offset, size))

    def on_discard(self, offset: int, size: int) -> None:
        self.events.append((self.name, "discard", offset, size))


def test_populate_forwards_discard_in_reverse_and_only_changes() -> None:
    events: list = []
    dm = DiscardManager("vmem0", 8 * BLOCK, BLOCK)
    dm.add_listener(Log("a", events))
    dm.add_listener(Log("b", events))
    dm.populate(2 * BLOCK, 2 * BLOCK)
    dm.populate(0, 6 * BLOCK)  # blocks 2-3 populated already: two runs change
    assert events == [("a", "populate", 2 * BLOCK, 2 * BLOCK),
                      ("b", "populate", 2 * BLOCK, 2 * BLOCK),
                      ("a", "populate", 0, 2 * BLOCK), ("b", "populate", 0, 2 * BLOCK),
                      ("a", "populate", 4 * BLOCK, 2 * BLOCK),
                      ("b", "populate", 4 * BLOCK, 2 * BLOCK)]
    events.clear()
    dm.discard(BLOCK, BLOCK)
    assert events == [("b", "discard", BLOCK, BLOCK), ("a", "discard", BLOCK, BLOCK)]
    assert dm.populated_ranges() == [(0, BLOCK), (2 * BLOCK, 4 * BLOCK)]
    assert dm.discarded_ranges() == [(BLOCK, BLOCK), (6 * BLOCK, 2 * BLOCK)]
    assert dm.populated_bytes == 5 * BLOCK


def test_refused_populate_is_undone_for_listeners_already_told() -> None:
    events: list = []
    dm = DiscardManager("vmem0", 4 * BLOCK, BLOCK)
    dm.add_listener(Log("a", events))
    dm.add_listener(Log("b", events, refuse=True))
    with pytest.raises(DeviceError, match="b refuses"):
        dm.populate(0, BLOCK)
    assert events == [("a", "populate", 0, BLOCK), ("a", "discard", 0, BLOCK)]
    assert dm.is_discarded(0, 4 * BLOCK)


def test_late_listener_hears_what_is_populated() -> None:
    events: list = []
    dm = DiscardManager("vmem0", 4 * BLOCK, BLOCK)
    dm.populate(BLOCK, 2 * BLOCK)
    dm.add_listener(Log("late", events))
    assert events == [("late", "populate", BLOCK, 2 * BLOCK)]


@pytest.mark.parametrize("offset, size", [(1, BLOCK), (0, BLOCK + 1), (0, 0), (-BLOCK, BLOCK),
                                          (3 * BLOCK, 2 * BLOCK)])
def test_bad_ranges_are_refused(offset: int, size: int) -> None:
    dm = DiscardManager("vmem0", 4 * BLOCK, BLOCK)
    with pytest.raises(DeviceError, match="vmem0: range"):
        dm.populate(offset, size)


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(DeviceError, match="power of two"):
        DiscardManager("x", 6 * MB, 3 * MB)
    with pytest.raises(DeviceError, match="multiple of the block size"):
        DiscardManager("x", 3 * MB, BLOCK)


SMALL = 16  # the model test's block size: byte-exact checks stay cheap


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(1, 16)), max_size=40),
       st.integers(0, 16 * SMALL - 1), st.integers(1, 16 * SMALL))
def test_replay_matches_a_model(ops: list, start: int, length: int) -> None:
    dm = DiscardManager("m", 16 * SMALL, SMALL)
    model = [False] * 16
    for populate, first, count in ops:
        count = min(count, 16 - first)
        (dm.populate if populate else dm.discard)(first * SMALL, count * SMALL)
        model[first:first + count] = [populate] * count
    length = min(length, 16 * SMALL - start)
    seen = bytearray(length)
    runs: list = []
    dm.replay_populated(start, length, lambda o, s: runs.append((o, s)))
    for offset, size in runs:
        assert size > 0 and start <= offset and offset + size <= start + length
        seen[offset - start:offset - start + size] = b"\1" * size
    expected = bytes(model[(start + i) // SMALL] for i in range(length))
    assert bytes(seen) == expected
    for (a, b), (c, _) in zip(runs, runs[1:]):
        assert a + b < c  # maximal: runs never touch
    assert dm.populated_bytes == sum(model) * SMALL
    holes: list = []
    dm.replay_discarded(start, length, lambda o, s: holes.append((o, s)))
    assert sum(s for _, s in holes) + sum(s for _, s in runs) == length


def _memory_with_region(blocks: int = 8) -> tuple[GuestMemory, GuestRegion, DiscardManager]:
    memory = GuestMemory()
    dm = DiscardManager("vmem0", blocks * BLOCK, BLOCK)
    region = memory.add(GuestRegion("vmem0", 1 << 32, map_anonymous(blocks * BLOCK),
                                    RegionKind.RAM, discard=dm))
    return memory, region, dm


def _resident(region: GuestRegion, offset: int, size: int) -> int:
    return measure([(region.name, region.mapping.address + offset, size)])[0].resident


def test_reads_of_discarded_memory_are_zeros_and_populate_nothing() -> None:
    memory, region, dm = _memory_with_region()
    try:
        dm.populate(0, BLOCK)
        memory.write((1 << 32) + BLOCK - 4, b"\xaa" * 4)
        assert _resident(region, BLOCK, region.size - BLOCK) == 0
        data = memory.read((1 << 32) + BLOCK - 8, 16)  # straddles into a discarded block
        assert data == bytes(4) + b"\xaa" * 4 + bytes(8)
        whole = memory.read(1 << 32, region.size)  # the whole region: only block 0 read
        assert len(whole) == region.size and whole.count(0xAA) == 4
        assert _resident(region, BLOCK, region.size - BLOCK) == 0  # discarded: untouched
        with pytest.raises(GuestError, match="given back"):
            memory.write((1 << 32) + BLOCK, b"x")
        assert not memory.holds((1 << 32) + BLOCK - 1, 2)
        assert memory.holds(1 << 32, BLOCK)
        assert [(r.name, o, s) for r, o, s in memory.populated_ranges()] == [("vmem0", 0, BLOCK)]
    finally:
        memory.close()


def test_huge_mappings_are_aligned_and_give_blocks_back() -> None:
    from leanvm.memory.host import HUGE_PAGE, ReleasePages, map_anonymous_huge

    mapping = map_anonymous_huge(4 * HUGE_PAGE)
    try:
        assert mapping.address % HUGE_PAGE == 0 and mapping.size == 4 * HUGE_PAGE
        view = mapping.view()
        view[HUGE_PAGE:2 * HUGE_PAGE] = b"\x01" * HUGE_PAGE
        release = ReleasePages(mapping)
        assert measure([("m", mapping.address, mapping.size)])[0].resident >= HUGE_PAGE
        release.on_discard(HUGE_PAGE, HUGE_PAGE)
        assert measure([("m", mapping.address, mapping.size)])[0].resident == 0
        assert view[HUGE_PAGE] == 0
        view.release()
    finally:
        mapping.unmap()
