from __future__ import annotations

import os

import pytest
from hypothesis import given, strategies as st

from leanvm.errors import ConfigError, DeviceError, GuestError
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import PAGE_SIZE, map_anonymous, map_file
from leanvm.memory.residency import measure

MiB = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add(GuestRegion("low", 0, map_anonymous(2 * MiB), RegionKind.RAM))
    mem.add(GuestRegion("high", 4 << 30, map_anonymous(1 * MiB), RegionKind.RAM))
    yield mem
    mem.close()


def test_read_write_round_trip(memory: GuestMemory) -> None:
    memory.write(0x1234, b"hello")
    assert memory.read(0x1234, 5) == b"hello"
    memory.write_int((4 << 30) + 8, 8, 0x1122334455667788)
    assert memory.read_u64((4 << 30) + 8) == 0x1122334455667788
    assert memory.read_int((4 << 30) + 8, 2) == 0x7788
    assert memory.ram_size == 3 * MiB


@pytest.mark.parametrize("address,length", [
    (2 * MiB - 4, 8),  # runs off the end of low RAM
    (2 * MiB, 1),  # the gap
    (-1, 2),
    ((4 << 30) + MiB, 1),
    (0, 2 * MiB + 1),
    (5, -1),
])
def test_out_of_bounds_is_a_guest_error(memory: GuestMemory, address: int, length: int) -> None:
    with pytest.raises(GuestError, match="not in guest memory"):
        memory.read(address, length)
    if length > 0:
        with pytest.raises(GuestError):
            memory.write(address, b"\0" * length)


@given(st.integers(-(1 << 33), 1 << 34), st.integers(-10, 3 * MiB))
def test_any_range_is_either_inside_one_region_or_refused(address: int, length: int) -> None:
    mem = GuestMemory()
    mem.add(GuestRegion("low", 0, map_anonymous(MiB), RegionKind.RAM))
    try:
        try:
            data = mem.read(address, length)
        except GuestError:
            assert not (0 <= address and length >= 0 and address + length <= MiB)
        else:
            assert 0 <= address and address + length <= MiB and len(data) == length
    finally:
        mem.close()


def test_overlapping_regions_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(DeviceError, match="overlaps low"):
        memory.add(GuestRegion("x", MiB, map_anonymous(2 * MiB), RegionKind.RAM))


def test_readonly_regions_need_force(tmp_path) -> None:
    mem = GuestMemory()
    mem.add(GuestRegion("rom", 0x1000, map_anonymous(PAGE_SIZE), RegionKind.ROM, readonly=True))
    with pytest.raises(GuestError, match="read-only"):
        mem.write(0x1000, b"x")
    mem.write(0x1000, b"x", force=True)
    assert mem.read(0x1000, 1) == b"x"
    mem.close()


def test_sizes_must_be_whole_pages() -> None:
    with pytest.raises(ConfigError, match="multiple of 4096"):
        map_anonymous(1000)


def test_residency_counts_touched_pages_only() -> None:
    mapping = map_anonymous(16 * MiB)
    view = mapping.view()
    view[0:10 * PAGE_SIZE] = b"\1" * (10 * PAGE_SIZE)
    (item,) = measure([("ram", mapping.address, mapping.size)])
    assert item.resident == 10 * PAGE_SIZE
    assert item.private == 10 * PAGE_SIZE and item.shared == 0
    mapping.discard(0, 4 * PAGE_SIZE)
    (item,) = measure([("ram", mapping.address, mapping.size)])
    assert item.resident == 6 * PAGE_SIZE
    view.release()
    mapping.unmap()


def test_file_pages_mapped_twice_count_as_shared(tmp_path) -> None:
    image = tmp_path / "image"
    image.write_bytes(os.urandom(8 * PAGE_SIZE))
    first = map_file(str(image), 8 * PAGE_SIZE, writable=False, shared=False)
    second = map_file(str(image), 8 * PAGE_SIZE, writable=False, shared=False)
    a, b = first.view(), second.view()
    assert bytes(a[:PAGE_SIZE]) == image.read_bytes()[:PAGE_SIZE]
    for page in range(8):
        _ = a[page * PAGE_SIZE], b[page * PAGE_SIZE]
    items = measure([("a", first.address, first.size), ("b", second.address, second.size)])
    for item in items:
        assert item.resident == 8 * PAGE_SIZE
        assert item.private == 0  # each page is mapped by both: nothing is ours alone
    with pytest.raises(TypeError):
        a[0] = 1  # read-only mapping gives a read-only view
    a.release(), b.release()
    first.unmap(), second.unmap()


def test_private_file_mapping_is_copy_on_write(tmp_path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"A" * PAGE_SIZE)
    mapping = map_file(str(image), PAGE_SIZE, writable=True, shared=False)
    view = mapping.view()
    view[0:1] = b"B"
    assert image.read_bytes()[:1] == b"A"
    view.release()
    mapping.unmap()


def test_missing_file_names_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope: cannot open"):
        map_file(str(tmp_path / "nope"), PAGE_SIZE, writable=False, shared=False)


def test_page_cache_pages_are_not_private_even_when_mapped_once(tmp_path) -> None:
    image = tmp_path / "image"
    data = os.urandom(4 * PAGE_SIZE)
    image.write_bytes(data)
    mapping = map_file(str(image), 4 * PAGE_SIZE, writable=True, shared=False)
    view = mapping.view()
    for i in range(4):  # fault every page in, and see the file's bytes there
        assert view[i * PAGE_SIZE] == data[i * PAGE_SIZE]
    (item,) = measure([("f", mapping.address, mapping.size)])
    assert (item.resident, item.private) == (4 * PAGE_SIZE, 0)
    view[0:1] = b"x"  # copy-on-write: this page is now the VM's own
    (item,) = measure([("f", mapping.address, mapping.size)])
    assert (item.resident, item.private) == (4 * PAGE_SIZE, PAGE_SIZE)
    view.release()
    mapping.unmap()


def test_flash_bank_holes_read_as_zero_and_cost_nothing(tmp_path) -> None:
    from leanvm.firmware.image import data_extents
    from leanvm.memory.host import map_flash_bank

    image = tmp_path / "sparse.fd"
    with open(image, "wb") as handle:
        handle.write(b"\x42" * PAGE_SIZE)
        handle.truncate(64 * PAGE_SIZE)  # 63 pages of hole
    fd = os.open(image, os.O_RDONLY)
    extents = [(e.offset, e.length) for e in data_extents(fd, 64 * PAGE_SIZE)]
    os.close(fd)
    bank = map_flash_bank(128 * PAGE_SIZE, str(image), 64 * PAGE_SIZE, writable=False,
                          data_extents=extents)
    view = bank.view()
    assert bytes(view[:4]) == b"\x42" * 4
    assert bytes(view[PAGE_SIZE:64 * PAGE_SIZE]) == bytes(63 * PAGE_SIZE)  # read every hole
    assert bytes(view[64 * PAGE_SIZE:]) == b"\xff" * (64 * PAGE_SIZE)  # erased tail
    (item,) = measure([("bank", bank.address, bank.size)])
    assert item.private == 0  # zero page, page cache, shared erased file: nothing of its own
    # The holes read as zero without being backed: each hole page is either not present or
    # the kernel's one shared zero page (not a page-cache page of the file's hole).
    hole = pagemap_entries(bank.address + PAGE_SIZE, 63)
    zero_pfn = shared_zero_pfn()
    for entry in hole:
        assert not entry & PM_PRESENT or (entry & PFN_MASK == zero_pfn
                                          and not entry & PM_FILE_OR_SHARED_ANON), hex(entry)
    assert os.stat(image).st_blocks * 512 <= 2 * PAGE_SIZE  # and the file gained no blocks
    view.release()
    bank.unmap()


PM_PRESENT, PM_FILE_OR_SHARED_ANON, PFN_MASK = 1 << 63, 1 << 61, (1 << 55) - 1


def pagemap_entries(address: int, pages: int) -> list[int]:
    import struct

    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE_SIZE * 8)
        return list(struct.unpack(f"<{pages}Q", pagemap.read(8 * pages)))


def shared_zero_pfn() -> int:
    """The page frame a read of untouched anonymous memory maps: the shared zero page."""
    from leanvm.memory.host import map_anonymous

    probe = map_anonymous(PAGE_SIZE)
    view = probe.view()
    try:
        assert view[0] == 0  # a read fault maps the zero page
        (entry,) = pagemap_entries(probe.address, 1)
    finally:
        view.release()
        probe.unmap()
    pfn = entry & PFN_MASK
    if not entry & PM_PRESENT or pfn == 0:
        pytest.skip("pagemap hides page frame numbers from this user (needs CAP_SYS_ADMIN)")
    return pfn


def test_process_and_mapping_memory_see_touched_pages(tmp_path) -> None:
    from leanvm.memory.residency import mapping_memory, process_memory

    image = tmp_path / "image"
    image.write_bytes(bytes(8 << 20))
    # a file mapping: its VMA never merges with neighbours, so smaps shows it alone
    mapping = map_file(str(image), 8 << 20, writable=True, shared=False)
    try:
        span = [(mapping.address, mapping.address + mapping.size)]
        before = mapping_memory("self", span)
        whole_before = process_memory()
        view = mapping.view()
        for offset in range(0, 4 << 20, 4096):
            view[offset] = 1  # copy-on-write: a private page each
        view.release()
        after = mapping_memory("self", span)
        assert after.private - before.private == 4 << 20
        assert after.private_dirty - before.private_dirty == 4 << 20
        assert after.rss >= 4 << 20
        assert process_memory().private - whole_before.private >= 4 << 20
    finally:
        mapping.unmap()
