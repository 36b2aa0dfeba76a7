"""How much host memory guest regions really cost, page by page from /proc/<pid>/pagemap.

resident: pages of the range present in host RAM. private: resident pages mapped by this
process alone (pagemap bit 56, "exclusively mapped"): what this VM alone costs; the rest of
the resident pages are shared (page cache of a read-only image, pages shared with another VM).
pagemap works per page, so adjacent mappings the kernel merged into one VMA are still told
apart (smaps cannot do that).
"""

from __future__ import annotations

import array
from typing import NamedTuple
from collections.abc import Iterable

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
    """(present pages, present and exclusive pages) among pagemap entries."""
    present = exclusive = 0
    for entry in entries:
        if entry & PM_PRESENT:
            present += 1
            if entry & PM_EXCLUSIVE:
                exclusive += 1
    return present, exclusive


def measure(regions: Iterable[tuple[str, int, int]], pid: int | str = "self") -> list[Residency]:
    """Residency of each (name, host address, size) range of process ``pid``."""
    result = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for name, address, size in regions:
            first, pages = address // PAGE_SIZE, -(-size // PAGE_SIZE)
            present = exclusive = 0
            for start in range(0, pages, _CHUNK_PAGES):
                n = min(_CHUNK_PAGES, pages - start)
                pagemap.seek((first + start) * 8)
                entries = array.array("Q")
                entries.frombytes(pagemap.read(n * 8))
                p, e = count_pages(entries)
                present, exclusive = present + p, exclusive + e
            result.append(Residency(name, size, present * PAGE_SIZE, exclusive * PAGE_SIZE))
    return result
