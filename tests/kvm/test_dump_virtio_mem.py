"""A dump of a guest with 1 GiB of virtio-mem of which 896 MiB is unplugged holds none of the
unplugged memory, and dumping populates no host page (the discard manager's unplugged
blocks and the pages nobody touched are never read).

The minimal kernel plugs 128 MiB at boot (its init spins in user mode here); the test makes
every plugged page present from the VMM's side by reading it (each maps the host's zero
page), as tests/kvm/test_virtio_mem_guest.py does, so that the plugged memory is in the
dump and the unplugged is not, whatever the pagemap says about it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from leanvm.machine.machine import Machine
from leanvm.memory.residency import measure, process_memory

from test_virtio_mem_guest import CMDLINE, wait_plugged

pytestmark = pytest.mark.slow
MB = 1 << 20
PAGE = 4096


def loads(core: Path) -> list[tuple[int, int]]:
    with open(core, "rb") as handle:
        return [(s["p_paddr"], s["p_filesz"]) for s in ELFFile(handle).iter_segments()
                if s["p_type"] == "PT_LOAD"]


def kdump_pages(core: Path) -> set[int]:
    """Page frame numbers in the kdump's second bitmap (the pages the file holds)."""
    data = core.read_bytes()
    block, sub_blocks, bitmap_blocks = struct.unpack_from("<iiI", data, 8 + 4 + 6 * 65 + 6 + 16 + 4)
    half = bitmap_blocks * block // 2
    start = (1 + sub_blocks) * block + half
    bitmap = data[start:start + half]
    return {i * 8 + bit for i, byte in enumerate(bitmap) if byte for bit in range(8)
            if byte >> bit & 1}


def overlap(ranges: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(a + n, end) - max(a, start)) for a, n in ranges)


def test_a_dump_skips_unplugged_memory_and_populates_nothing(minimal_kernel: Path,
                                                             spin_initrd: Path,
                                                             tmp_path: Path) -> None:
    with Machine(memory="256M,maxmem=1280M", kernel=minimal_kernel, initrd=spin_initrd,
                 cmdline=CMDLINE, virtio_mem=("size=1G,requested=128M",)) as vm:
        handle = vm.virtio_mem[0]
        vm.start(timeout=900)
        wait_plugged(vm, 128 * MB)
        blocks = handle.state()
        for index, plugged in enumerate(blocks):  # every plugged page present
            if plugged:
                vm.memory.read(handle.address + index * handle.block_size, handle.block_size)
        live = vm.dump(tmp_path / "live.elf", "elf")  # the guest runs on
        vm.stop("the live dump is written")
        vm.wait(60)
        region = handle.region
        regions = [(r.name, r.mapping.address, r.size) for r in vm.memory.regions]
        before, rss_before = measure(regions), process_memory().rss
        elf = vm.dump(tmp_path / "stopped.elf", "elf")
        kdump = vm.dump(tmp_path / "stopped.kdump", "kdump-raw-zlib")
        after, rss_after = measure(regions), process_memory().rss
        base, size, block = handle.address, region.size, handle.block_size
    assert sum(blocks) * block == 128 * MB and len(blocks) * block == 1024 * MB
    unplugged = [(base + i * block, base + (i + 1) * block) for i, b in enumerate(blocks) if not b]
    assert sum(end - start for start, end in unplugged) == 896 * MB
    for core in (live.path, elf.path):
        segments = loads(core)
        assert overlap(segments, base, base + size) == 128 * MB  # all plugged, nothing more
        assert sum(overlap(segments, s, e) for s, e in unplugged) == 0
    inside = [pfn for pfn in kdump_pages(kdump.path) if base // PAGE <= pfn < (base + size) // PAGE]
    assert all(blocks[(pfn * PAGE - base) // block] for pfn in inside)  # none unplugged
    assert len(inside) == 128 * MB // PAGE
    assert [r.resident for r in after] == [r.resident for r in before], "dumping populated pages"
    assert rss_after - rss_before < 8 * MB, f"RSS grew {(rss_after - rss_before) >> 10} KiB"
    assert elf.size < elf.memory + MB and elf.memory < 256 * MB
