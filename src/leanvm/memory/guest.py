"""Guest-physical memory: regions at guest addresses, with bounds-checked access.

Everything the VMM or a device reads or writes in the guest goes through GuestMemory, which
refuses any access that is not wholly inside one region with a GuestError, so a hostile
guest-supplied address or length can never reach host memory outside guest RAM.

A region whose memory can be given back (a virtio-mem region) has a discard manager
(memory/discard.py): reads of its discarded blocks return zeros without touching the host
pages (which would populate them again), and writes to them are refused.
"""

from __future__ import annotations

import bisect
import struct
from enum import Enum
from typing import TYPE_CHECKING

from leanvm.errors import DeviceError, GuestError
from leanvm.memory.host import PAGE_SIZE, HostMapping

if TYPE_CHECKING:
    from leanvm.memory.discard import DiscardManager


class RegionKind(Enum):
    RAM = "ram"  # anonymous guest RAM
    ROM = "rom"  # read-only to the guest
    FILE = "file"  # backed by a file (private copy-on-write or shared)


class GuestRegion:
    """``size`` bytes at guest-physical ``base``, backed by ``mapping``."""

    __slots__ = ("name", "base", "mapping", "kind", "readonly", "view", "discard")

    def __init__(self, name: str, base: int, mapping: HostMapping, kind: RegionKind,
                 readonly: bool = False, discard: "DiscardManager | None" = None) -> None:
        self.name = name
        self.base = base
        self.mapping = mapping
        self.kind = kind
        self.readonly = readonly  # read-only to the guest (a KVM_MEM_READONLY memslot)
        self.view = mapping.view()
        self.discard = discard  # which blocks hold memory, for regions that can give it back

    def __repr__(self) -> str:
        return (f"GuestRegion({self.name!r}, base={self.base:#x}, size={self.size:#x}, "
                f"kind={self.kind.value}, readonly={self.readonly})")

    @property
    def size(self) -> int:
        return self.mapping.size

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + self.mapping.size

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.end


class GuestMemory:
    """The set of regions of one guest; lookups by guest-physical address."""

    def __init__(self) -> None:
        self._regions: list[GuestRegion] = []
        self._bases: list[int] = []

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        return tuple(self._regions)

    def add(self, region: GuestRegion) -> GuestRegion:
        for other in self._regions:
            if region.base < other.end and other.base < region.end:
                raise DeviceError(
                    f"guest region {region.name} [{region.base:#x}, {region.end:#x}) overlaps "
                    f"{other.name} [{other.base:#x}, {other.end:#x})")
        index = bisect.bisect(self._bases, region.base)
        self._regions.insert(index, region)
        self._bases.insert(index, region.base)
        return region

    def find(self, address: int, length: int = 1) -> GuestRegion:
        """The region holding ``[address, address + length)``, or GuestError."""
        index = bisect.bisect(self._bases, address) - 1
        if index >= 0 and length >= 0:
            region = self._regions[index]
            if address + length <= region.end:
                return region
        raise GuestError(f"guest address range [{address:#x}, +{length:#x}) is not in guest memory")

    def read(self, address: int, length: int) -> bytes:
        region = self.find(address, length)
        offset = address - region.base
        if region.discard is None:
            return bytes(region.view[offset:offset + length])
        out = bytearray(length)  # discarded blocks read as zeros, their pages untouched
        view = region.view

        def copy(start: int, size: int) -> None:
            out[start - offset:start - offset + size] = view[start:start + size]

        region.discard.replay_populated(offset, length, copy)
        return bytes(out)

    def write(self, address: int, data: "bytes | memoryview", *, force: bool = False) -> None:
        """Write ``data``; regions read-only to the guest need ``force`` (the VMM loading them)."""
        region = self.find(address, len(data))
        if region.readonly and not force:
            raise GuestError(f"guest address {address:#x} is in read-only region {region.name}")
        offset = address - region.base
        if region.discard is not None and data and not _holds(region, offset, len(data)):
            raise GuestError(f"guest address range [{address:#x}, +{len(data):#x}) is in "
                             f"memory {region.name} has given back (unplugged)")
        if offset + len(data) > region.mapping.writable_limit:
            raise GuestError(f"region {region.name} is backed by read-only host memory at "
                             f"{address:#x}")
        region.view[offset:offset + len(data)] = data

    def map_file(self, address: int, length: int, path: str, file_offset: int = 0) -> bool:
        """Back [address, address + length) with ``path``'s pages from ``file_offset``,
        copy-on-write, instead of copying the bytes in: VMs mapping the same file share its
        page cache until they write. False (nothing done) where that cannot be done: an
        address or file offset that is not page aligned, or a range that is not wholly in
        one anonymous RAM region. The caller then copies."""
        page = PAGE_SIZE
        if address % page or file_offset % page or length <= 0:
            return False
        try:
            region = self.find(address, length)
        except GuestError:
            return False
        if (region.kind is not RegionKind.RAM or region.readonly or not region.mapping.writable
                or region.discard is not None):
            return False
        offset = address - region.base
        if -(-(offset + length) // page) * page > region.size:
            return False
        region.mapping.overlay_file(offset, length, path, file_offset)
        return True

    def holds(self, address: int, length: int) -> bool:
        """Whether [address, address + length) is in one region and holds memory: no block
        of it discarded."""
        try:
            region = self.find(address, length)
        except GuestError:
            return False
        return _holds(region, address - region.base, length)

    def populated_ranges(self) -> list[tuple[GuestRegion, int, int]]:
        """(region, offset, size) of every range that holds memory: whole regions, less what
        their discard managers have discarded. What dumps and accounting walk."""
        out: list[tuple[GuestRegion, int, int]] = []
        for region in self._regions:
            if region.discard is None:
                out.append((region, 0, region.size))
            else:
                region.discard.replay_populated(
                    0, region.size, lambda o, s, r=region: out.append((r, o, s)))
        return out

    def read_int(self, address: int, size: int) -> int:
        return int.from_bytes(self.read(address, size), "little")

    def write_int(self, address: int, size: int, value: int) -> None:
        self.write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_u64(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]

    def ram_regions(self) -> list[GuestRegion]:
        """The regions of guest RAM (not flash, ROM or device windows)."""
        return [r for r in self._regions if r.kind is RegionKind.RAM]

    @property
    def ram_size(self) -> int:
        return sum(r.size for r in self._regions  # boot RAM: not what virtio-mem holds
                   if r.kind is RegionKind.RAM and r.discard is None)

    def close(self) -> None:
        for region in self._regions:
            region.view.release()
            region.mapping.unmap()
        self._regions.clear()
        self._bases.clear()


def _holds(region: GuestRegion, offset: int, length: int) -> bool:
    """Whether no block of [offset, offset + length) in ``region`` is discarded."""
    if region.discard is None or length <= 0:
        return True
    block = region.discard.block_size
    first = offset // block * block
    return region.discard.is_populated(first, -(-(offset + length) // block) * block - first)
