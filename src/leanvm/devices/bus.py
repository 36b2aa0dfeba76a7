"""Port-I/O and MMIO buses: ranges mapped to devices, with overlap checks.

A device only ever sees an offset within its range and an access size of 1, 2, 4 or 8.
An access that no device claims wholly (nothing there, or straddling a device's end) is
counted; an unclaimed read returns all ones, as an empty ISA/PCI bus does.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import NamedTuple

from leanvm.errors import DeviceError

ACCESS_SIZES = (1, 2, 4, 8)
ALL_ONES = {size: (1 << (8 * size)) - 1 for size in ACCESS_SIZES}
_CACHE_LIMIT = 4096


from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from typing import Protocol

    class BusDevice(Protocol):
        """What a bus needs from a device: reads and writes at an offset in its range."""

        def read(self, offset: int, size: int) -> int: ...

        def write(self, offset: int, size: int, value: int) -> None: ...


class Mapping(NamedTuple):
    name: str
    base: int
    size: int
    device: "BusDevice"

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """An address space (``kind`` is "pio" or "mmio") of non-overlapping device ranges."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit  # one past the highest address (0x10000 for ports)
        self._maps: list[Mapping] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.unclaimed: Counter[int] = Counter()  # address -> count of unclaimed accesses
        self.accesses = 0
        # (address << 4 | size) -> (bound device method, base, mask) for accesses seen before:
        # one dict look-up instead of a bisect per exit. Cleared when the ranges change, and
        # when full (a guest walking MMIO addresses cannot grow it without bound).
        self._reads: dict[int, tuple] = {}
        self._writes: dict[int, tuple] = {}

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._maps)

    def register(self, base: int, size: int, device: "BusDevice", name: str) -> None:
        if size <= 0 or base < 0 or base + size > self.limit:
            raise DeviceError(f"{self.kind} range for {name} [{base:#x}, +{size:#x}) is outside "
                              f"the bus [0, {self.limit:#x})")
        for other in self._maps:
            if base < other.end and other.base < base + size:
                raise DeviceError(f"{self.kind} range for {name} [{base:#x}, {base + size:#x}) "
                                  f"overlaps {other.name} [{other.base:#x}, {other.end:#x})")
        index = bisect.bisect(self._bases, base)
        self._maps.insert(index, Mapping(name, base, size, device))
        self._bases.insert(index, base)
        self._reads.clear()
        self._writes.clear()

    def unregister(self, base: int) -> None:
        index = bisect.bisect_left(self._bases, base)
        if index == len(self._bases) or self._bases[index] != base:
            raise DeviceError(f"no {self.kind} device registered at {base:#x}")
        del self._maps[index], self._bases[index]
        self._reads.clear()
        self._writes.clear()

    def lookup(self, address: int, size: int = 1) -> Mapping | None:
        """The mapping that wholly holds ``[address, address + size)``."""
        index = bisect.bisect(self._bases, address) - 1
        if index >= 0:
            found = self._maps[index]
            if address + size <= found.base + found.size:
                return found
        return None

    def read(self, address: int, size: int) -> int:
        self.accesses += 1
        hit = self._reads.get(address << 4 | size)
        if hit is not None:
            return hit[0](address - hit[1], size) & hit[2]
        found = self._resolve(self._reads, address, size, read=True)
        if found is None:
            self.unclaimed_reads += 1
            self.unclaimed[address] += 1
            return ALL_ONES.get(size, 0)
        return found.device.read(address - found.base, size) & ALL_ONES[size]

    def write(self, address: int, size: int, value: int) -> None:
        self.accesses += 1
        hit = self._writes.get(address << 4 | size)
        if hit is not None:
            hit[0](address - hit[1], size, value & hit[2])
            return
        found = self._resolve(self._writes, address, size, read=False)
        if found is None:
            self.unclaimed_writes += 1
            self.unclaimed[address] += 1
            return
        found.device.write(address - found.base, size, value & ALL_ONES[size])

    def _resolve(self, cache: dict[int, tuple], address: int, size: int,
                 read: bool) -> Mapping | None:
        """The device for an access not in ``cache``, remembered there for next time."""
        mask = ALL_ONES.get(size)
        found = self.lookup(address, size) if mask is not None else None
        if found is not None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            method = found.device.read if read else found.device.write
            cache[address << 4 | size] = (method, found.base, mask)
        return found
