"""How much host memory guest regions really cost, page by page from /proc/<pid>/pagemap.

resident: pages of the range present in host RAM. private: resident anonymous pages that
this process alone maps (pagemap bit 56, "exclusively mapped", without bit 61, "file page or
shared anonymous"): memory this VM alone owns, such as RAM it touched or its copy-on-write
copies of flash blocks it wrote. The rest of the resident pages are shared: page cache of
image files (which outlives the VM and serves every VM mapping the same file) and shared
memory.
pagemap works per page, so adjacent mappings the kernel merged into one VMA are still told
apart (smaps cannot do that).
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from leanvm.memory.host import PAGE_SIZE

PM_PRESENT = 1 << 63  # page present in RAM
PM_SWAPPED = 1 << 62  # page in swap
PM_FILE_OR_SHARED_ANON = 1 << 61
PM_EXCLUSIVE = 1 << 56  # page mapped exactly once
_CHUNK_PAGES = 1 << 16  # read 512 KiB of pagemap at a time


class Residency(NamedTuple):
    name: str
    size: int
    resident: int
    private: int

    @property
    def shared(self) -> int:
        return self.resident - self.private


def count_pages(entries: Iterable[int]) -> tuple[int, int]:
    """(present pages, present anonymous pages mapped only here) among pagemap entries."""
    present = owned = 0
    for entry in entries:
        if entry & PM_PRESENT:
            present += 1
            if entry & PM_EXCLUSIVE and not entry & PM_FILE_OR_SHARED_ANON:
                owned += 1
    return present, owned


def pagemap_chunks(pagemap: BinaryIO, address: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(first page's index from ``address``, raw 64-bit entries) of the pages of
    [address, address + size), 512 KiB of pagemap at a time."""
    first, pages = address // PAGE_SIZE, -(-size // PAGE_SIZE)
    for start in range(0, pages, _CHUNK_PAGES):
        n = min(_CHUNK_PAGES, pages - start)
        pagemap.seek((first + start) * 8)
        yield start, pagemap.read(n * 8)


def measure(regions: Iterable[tuple[str, int, int]], pid: int | str = "self") -> list[Residency]:
    """Residency of each (name, host address, size) range of process ``pid``."""
    result = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for name, address, size in regions:
            present = exclusive = 0
            for _, raw in pagemap_chunks(pagemap, address, size):
                entries = array.array("Q")
                entries.frombytes(raw)
                p, e = count_pages(entries)
                present, exclusive = present + p, exclusive + e
            result.append(Residency(name, size, present * PAGE_SIZE, exclusive * PAGE_SIZE))
    return result


class ProcessMemory(NamedTuple):
    """A whole process's (or some of its mappings') memory from /proc/<pid>/smaps, in bytes."""

    rss: int  # resident, shared pages counted in full
    pss: int  # resident, shared pages split among the processes mapping them
    private: int  # resident pages no other process maps (Private_Clean + Private_Dirty)
    private_dirty: int  # of those, the written ones: what no other VM can ever share
    # (Private_Clean pages are file pages only this process maps now: page cache, libraries)


_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")


def _figures(totals: dict[str, int]) -> ProcessMemory:
    return ProcessMemory(totals["Rss"], totals["Pss"],
                         totals["Private_Clean"] + totals["Private_Dirty"],
                         totals["Private_Dirty"])


def process_memory(pid: int | str = "self") -> ProcessMemory:
    totals = dict.fromkeys(_FIELDS, 0)
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if name in totals and len(parts) == 2 and parts[1] == "kB":
                totals[name] = int(parts[0]) * 1024
    return _figures(totals)


def mapping_memory(pid: int | str, ranges: Iterable[tuple[int, int]]) -> ProcessMemory:
    """The same figures for the mappings of /proc/<pid>/smaps that overlap any of the
    [start, end) ranges (a VMM's guest RAM: a mapping the kernel merged with a neighbour
    counts whole)."""
    spans = list(ranges)
    totals = dict.fromkeys(_FIELDS, 0)
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = any(low < end and start < high for start, end in spans)
            elif inside and head[:-1] in totals:
                totals[head[:-1]] += int(line.split()[1]) * 1024
    return _figures(totals)
