"""What a dump takes from guest memory: pages the host holds (pagemap), less discarded
blocks, plus file overlays; page-table enumeration for ELF paging; the guest's VMCOREINFO
record, hostile or not; the dump file's atomic writing."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from leanvm.abi.elf import note
from leanvm.dump.output import DumpFile, DumpFileError
from leanvm.machine.dump import guest_vmcoreinfo, memory_runs
from leanvm.memory.discard import DiscardManager
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import PAGE_SIZE, map_anonymous
from leanvm.memory.paging import P, PS, RW, PagingContext, PagingMode, mappings
from leanvm.memory.populated import held_runs, merge
from leanvm.memory.residency import measure

MiB = 1 << 20


def test_held_runs_are_the_pages_written_and_nothing_else() -> None:
    mapping = map_anonymous(64 * PAGE_SIZE)
    try:
        view = mapping.view()
        for page in (3, 4, 10, 63):
            view[page * PAGE_SIZE] = 1
        assert held_runs(mapping.address, mapping.size) == [
            (3 * PAGE_SIZE, 2 * PAGE_SIZE), (10 * PAGE_SIZE, PAGE_SIZE), (63 * PAGE_SIZE, PAGE_SIZE)]
        view.release()
    finally:
        mapping.unmap()


def test_merge_joins_overlapping_and_adjacent_runs() -> None:
    assert merge([(0, 10), (30, 5)], [(5, 10), (35, 1)]) == [(0, 15), (30, 6)]


def test_memory_runs_skip_untouched_and_discarded_memory_without_touching_it(tmp_path: Path) -> None:
    memory = GuestMemory()
    low = memory.add(GuestRegion("ram", 0, map_anonymous(8 * MiB), RegionKind.RAM))
    discard = DiscardManager("vmem", 16 * MiB, 2 * MiB, populated=True)
    high = memory.add(GuestRegion("vmem", 1 << 32, map_anonymous(16 * MiB), RegionKind.RAM,
                                  discard=discard))
    image = tmp_path / "kernel"
    image.write_bytes(b"\x90" * 3 * PAGE_SIZE)
    try:
        memory.write(0x3000, b"x")
        memory.write((1 << 32) + 5 * MiB, b"y")  # block 2, discarded below
        memory.write((1 << 32) + 9 * MiB, b"z")  # block 4, kept
        discard.discard(4 * MiB, 2 * MiB)
        assert memory.map_file(0x100000, 3 * PAGE_SIZE, str(image))  # never read: still in
        before = measure([("ram", low.mapping.address, low.size),
                          ("vmem", high.mapping.address, high.size)])
        runs, ram = memory_runs(memory)
        after = measure([("ram", low.mapping.address, low.size),
                         ("vmem", high.mapping.address, high.size)])
        assert [(r.paddr, len(r.data)) for r in runs] == [
            (0x3000, PAGE_SIZE), (0x100000, 3 * PAGE_SIZE), ((1 << 32) + 9 * MiB, PAGE_SIZE)]
        assert bytes(runs[1].data[:2]) == b"\x90\x90"
        assert before == after  # finding the runs populated nothing
        assert ((1 << 32) + 4 * MiB, (1 << 32) + 6 * MiB) not in ram
        assert ((1 << 32) + 6 * MiB, (1 << 32) + 16 * MiB) in ram
    finally:
        memory.close()


# --- page tables -------------------------------------------------------------------------
class Tables:
    """Page tables in a bytearray (guest-physical address = offset)."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)

    def set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, table + index * 8, value)

    def read(self, address: int) -> bytes:
        from leanvm.errors import GuestError

        if address + 4096 > len(self.mem):
            raise GuestError("outside")
        return bytes(self.mem[address:address + 4096])


def test_mappings_of_four_level_tables_with_every_page_size() -> None:
    t = Tables(0x20000)
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    t.set(pml4, 0, pdpt | P | RW)
    t.set(pml4, 511, pdpt | P | RW)  # the same PDPT in the upper half
    t.set(pdpt, 0, pd | P | RW)
    t.set(pdpt, 1, 0x40000000 | P | PS)  # a 1 GiB page
    t.set(pd, 1, 0x200000 | P | RW | PS)  # a 2 MiB page
    t.set(pd, 0, pt | P | RW)
    t.set(pt, 0, 0x5000 | P)
    t.set(pt, 1, 0x6000 | P)  # contiguous with the one before: merged
    t.set(pt, 3, 0x9000 | P)
    ctx = PagingContext(PagingMode.LONG4, pml4)
    found = mappings(ctx, t.read, limit=1 << 31)
    assert found == [(0, 0x5000, 0x2000), (0x3000, 0x9000, 0x1000),
                     (0x200000, 0x200000, 0x200000), (0x40000000, 0x40000000, 1 << 30)]
    # physical frames past the limit are left out (here: the 1 GiB page)
    assert (0x40000000, 0x40000000, 1 << 30) not in mappings(ctx, t.read, limit=1 << 30)


def test_mappings_with_paging_off_are_the_identity() -> None:
    assert mappings(PagingContext(PagingMode.OFF), lambda a: b"", limit=0x5000) == [(0, 0, 0x5000)]


_entry = st.one_of(st.integers(0, 3).map(lambda table: table * 0x1000 | P | RW),  # loops
                   st.integers(0, 3).map(lambda table: table * 0x1000 | P | PS),
                   st.integers(0, (1 << 64) - 1))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2047), _entry), max_size=300), st.integers(0, 3))
def test_hostile_page_tables_give_bounded_mappings_and_never_fail(
        entries: list[tuple[int, int]], root: int) -> None:
    t = Tables(0x4000)
    for slot, value in entries:
        struct.pack_into("<Q", t.mem, slot * 8, value)
    found = mappings(PagingContext(PagingMode.LONG4, root * 0x1000), t.read, limit=0x4000,
                     max_ranges=1000)
    assert len(found) <= 1000
    assert all(0 <= p < 0x4000 and n > 0 for _, p, n in found)


# --- VMCOREINFO ----------------------------------------------------------------------------
@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add(GuestRegion("ram", 0, map_anonymous(MiB), RegionKind.RAM))
    yield mem
    mem.close()


def test_vmcoreinfo_is_read_from_where_the_guest_says(memory: GuestMemory) -> None:
    memory.write(0x8000, note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n\0\0"))
    record = struct.pack("<HHIQ", 1, 1, 4096, 0x8000)
    assert guest_vmcoreinfo(memory, record) == b"OSRELEASE=6.1\n"


@given(st.binary(min_size=16, max_size=16), st.binary(max_size=64))
def test_hostile_vmcoreinfo_records_give_none_or_text(record: bytes, noise: bytes) -> None:
    mem = GuestMemory()
    mem.add(GuestRegion("ram", 0, map_anonymous(64 * 1024), RegionKind.RAM))
    try:
        mem.write(0, noise)
        found = guest_vmcoreinfo(mem, record)
        assert found is None or isinstance(found, bytes) and len(found) <= 1 << 16
    finally:
        mem.close()


def test_vmcoreinfo_pointing_outside_ram_or_oversized_is_ignored(memory: GuestMemory) -> None:
    assert guest_vmcoreinfo(memory, struct.pack("<HHIQ", 1, 1, 4096, 1 << 40)) is None
    assert guest_vmcoreinfo(memory, struct.pack("<HHIQ", 1, 1, 1 << 30, 0)) is None
    assert guest_vmcoreinfo(memory, struct.pack("<HHIQ", 1, 0, 4096, 0)) is None
    assert guest_vmcoreinfo(memory, None) is None


# --- the file ------------------------------------------------------------------------------
def test_dump_file_appears_only_when_committed(tmp_path: Path) -> None:
    target = tmp_path / "core"
    out = DumpFile(target)
    out.write(b"abc")
    assert not target.exists()
    assert out.commit() == 3
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["core"]


def test_dump_file_in_a_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no directory") as caught:
        DumpFile(tmp_path / "missing" / "core")
    assert "\n" not in str(caught.value)


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    import resource

    out = DumpFile(tmp_path / "core")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = __import__("signal").signal(__import__("signal").SIGXFSZ, __import__("signal").SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        with pytest.raises(DumpFileError, match="cannot write the dump") as caught:
            out.write(bytes(16384))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        __import__("signal").signal(__import__("signal").SIGXFSZ, old)
    assert "nothing was left behind" in str(caught.value)
    assert os.listdir(tmp_path) == []
