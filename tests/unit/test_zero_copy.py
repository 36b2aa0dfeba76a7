"""Zero-copy loading: file pages mapped copy-on-write into anonymous guest RAM."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanvm.errors import ConfigError
from leanvm.loader.files import place, place_range
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous, map_file
from leanvm.memory.residency import measure

MiB, PAGE = 1 << 20, 4096


def content(size: int) -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(size))


def ram_cost(memory: GuestMemory, address: int, length: int) -> tuple[int, int]:
    region = memory.find(address, length)
    [row] = measure([("r", region.mapping.address + address - region.base, length)])
    return row.resident, row.private


def test_mapped_file_reads_back_and_costs_no_private_memory(memory, tmp_path: Path) -> None:
    data = content(5 * PAGE + 100)  # a ragged last page reads as zeros past the end
    path = tmp_path / "initrd"
    path.write_bytes(data)
    assert place(memory, 1 * MiB, data, path)
    assert memory.read(1 * MiB, len(data)) == data
    assert memory.read(1 * MiB + len(data), PAGE - 100) == bytes(PAGE - 100)
    resident, private = ram_cost(memory, 1 * MiB, 6 * PAGE)
    assert resident == 6 * PAGE and private == 0  # all page cache, none owned by this VM


def test_guest_writes_copy_one_page_and_leave_the_file_alone(memory, tmp_path: Path) -> None:
    data = content(8 * PAGE)
    path = tmp_path / "initrd"
    path.write_bytes(data)
    assert place(memory, 2 * MiB, data, path)
    memory.write(2 * MiB + 3 * PAGE + 5, b"guest was here")
    assert path.read_bytes() == data
    assert memory.read(2 * MiB + 3 * PAGE + 5, 14) == b"guest was here"
    memory.read(2 * MiB, 8 * PAGE)
    assert ram_cost(memory, 2 * MiB, 8 * PAGE) == (8 * PAGE, PAGE)


def test_two_guests_share_the_page_cache(tmp_path: Path) -> None:
    data = content(16 * PAGE)
    path = tmp_path / "initrd"
    path.write_bytes(data)
    guests = []
    try:
        for _ in range(2):
            mem = GuestMemory()
            mem.add(GuestRegion("ram", 0, map_anonymous(1 * MiB), RegionKind.RAM))
            guests.append(mem)
            assert place(mem, 0x40000, data, path)
            assert mem.read(0x40000, len(data)) == data
        frames = [page_frames(g.regions[0].mapping.address + 0x40000, 16) for g in guests]
        if not any(frames[0]):
            pytest.skip("pagemap hides page frame numbers from this user (needs CAP_SYS_ADMIN)")
        assert frames[0] == frames[1]  # the very same host pages
    finally:
        for mem in guests:
            mem.close()


def page_frames(address: int, pages: int) -> list[int]:
    import struct

    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE * 8)
        entries = struct.unpack(f"<{pages}Q", pagemap.read(8 * pages))
    return [entry & ((1 << 55) - 1) for entry in entries]


@pytest.mark.parametrize("address, file_offset", [(1 * MiB + 16, 0), (1 * MiB, 16)])
def test_unaligned_places_are_copied(memory, tmp_path: Path, address: int,
                                     file_offset: int) -> None:
    data = content(3 * PAGE)
    path = tmp_path / "initrd"
    path.write_bytes(bytes(file_offset) + data)
    assert not place(memory, address, data, path, file_offset)
    assert memory.read(address, len(data)) == data
    assert ram_cost(memory, 1 * MiB, 4 * PAGE)[1] >= 3 * PAGE  # copied: owned by this VM


def test_no_file_or_no_ram_means_a_copy(memory, tmp_path: Path) -> None:
    data = content(2 * PAGE)
    assert not place(memory, 1 * MiB, data, None)
    assert memory.read(1 * MiB, len(data)) == data
    path = tmp_path / "rom"
    path.write_bytes(bytes(PAGE))
    rom = memory.add(GuestRegion("rom", 8 * MiB, map_file(str(path), PAGE, writable=False,
                                                          shared=False), RegionKind.ROM,
                                 readonly=True))
    assert not memory.map_file(rom.base, PAGE, str(path))
    assert not memory.map_file(4 * MiB - PAGE, 2 * PAGE, str(path))  # runs past the region


def test_segment_with_ragged_ends_maps_the_middle(memory, tmp_path: Path) -> None:
    image = content(64 * PAGE)
    path = tmp_path / "vmlinux"
    path.write_bytes(image)
    # a segment at guest 0x100800 from file offset 0x2800: the same offset within a page
    length = 10 * PAGE + 0x123
    mapped = place_range(memory, 0x100800, memoryview(image), 0x2800, length, str(path))
    assert mapped == 9 * PAGE  # whole pages from 0x101000; the head and the tail are copied
    assert memory.read(0x100800, length) == image[0x2800:0x2800 + length]
    assert memory.read(0x100800 + length, 64) == bytes(64)  # past the segment: still zero
    # a different offset within the page: everything copied
    assert place_range(memory, 0x200000, memoryview(image), 0x10, 4 * PAGE, str(path)) == 0
    assert memory.read(0x200000, 4 * PAGE) == image[0x10:0x10 + 4 * PAGE]


def test_missing_or_short_files_are_refused_with_their_name(memory, tmp_path: Path) -> None:
    path = tmp_path / "gone"
    with pytest.raises(ConfigError, match="gone: cannot open"):
        memory.map_file(1 * MiB, PAGE, str(path))
    path.write_bytes(bytes(PAGE))  # shorter than asked: mapping it would fault on access
    with pytest.raises(ConfigError, match="gone: shorter than"):
        memory.map_file(1 * MiB, 2 * PAGE, str(path))
    assert memory.read(1 * MiB, 2 * PAGE) == bytes(2 * PAGE)
