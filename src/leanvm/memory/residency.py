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
    """(present pages, present anonymous pages mapped only here) among pagemap entries."""
    present = owned = 0
    for entry in entries:
        if entry & PM_PRESENT:
            present += 1
            if entry & PM_EXCLUSIVE and not entry & PM_FILE_OR_SHARED_ANON:
                owned += 1
    return present, owned


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
