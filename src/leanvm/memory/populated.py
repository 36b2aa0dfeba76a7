"""Which pages of host memory hold anything: present in RAM or in swap, from
/proc/<pid>/pagemap (bits 63 and 62 of each page's 64-bit entry). A page the guest never
touched has neither bit and reads as zeros; dumps leave such pages out without reading
them (reading would fault them in)."""

from __future__ import annotations

from leanvm.memory.host import PAGE_SIZE
from leanvm.memory.residency import pagemap_chunks

# byte 7 of an entry (its top byte, little-endian) -> 1 where present (0x80) or swapped (0x40)
_HELD = bytes(1 if b & 0xC0 else 0 for b in range(256))
_PRESENT = bytes(1 if b & 0x80 else 0 for b in range(256))


def held_flags(address: int, size: int, pid: int | str = "self", *,
               present_only: bool = False) -> bytearray:
    """One byte per page of [address, address + size): 1 where it holds memory (present,
    or swapped unless ``present_only``: a userfaultfd's protection of a page never
    populated reads as swapped), else 0."""
    table = _PRESENT if present_only else _HELD
    flags = bytearray()
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for _, raw in pagemap_chunks(pagemap, address, size):
            flags += raw[7::8].translate(table)
    return flags


def flag_runs(flags: "bytes | bytearray", base: int = 0) -> list[tuple[int, int]]:
    """(offset, length) runs of the pages whose flag is 1, offsets from ``base`` bytes,
    adjacent pages merged."""
    runs: list[tuple[int, int]] = []
    at = flags.find(1)
    while at >= 0:
        end = flags.find(0, at)
        if end < 0:
            end = len(flags)
        runs.append((base + at * PAGE_SIZE, (end - at) * PAGE_SIZE))
        at = flags.find(1, end)
    return runs


def held_runs(address: int, size: int, pid: int | str = "self") -> list[tuple[int, int]]:
    """(offset, length) runs of pages in [address, address + size) that hold memory,
    offsets from ``address`` (page aligned), in order, adjacent pages merged."""
    return flag_runs(held_flags(address, size, pid))


def merge(*run_lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of (offset, length) runs, sorted and merged."""
    spans = sorted((o, o + n) for runs in run_lists for o, n in runs if n > 0)
    out: list[list[int]] = []
    for low, high in spans:
        if out and low <= out[-1][1]:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return [(low, high - low) for low, high in out]


def intersect(runs: list[tuple[int, int]], low: int, high: int) -> list[tuple[int, int]]:
    """The parts of sorted ``runs`` inside [low, high)."""
    out = []
    for offset, length in runs:
        a, b = max(offset, low), min(offset + length, high)
        if a < b:
            out.append((a, b - a))
    return out
