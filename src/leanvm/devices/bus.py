"""Port-I/O and MMIO buses: ranges mapped to devices, with overlap checks.

A device only ever sees an offset within its range and an access size of 1, 2, 4 or 8.
KVM hands over accesses of any size from 1 to 8 (an access straddling a page end arrives
in pieces, such as 3 or 5 bytes): the bus splits a 3-, 5-, 6- or 7-byte access into
naturally aligned pieces of 1, 2 or 4 bytes, calls the device once per piece and puts a
read's value together little-endian.

An access that no device claims wholly (nothing there, or straddling a device's end) is
counted; an unclaimed read returns all ones, as an empty ISA/PCI bus does. The totals are
exact; counts per address are kept for at most ``UNCLAIMED_LIMIT`` addresses, the rest add
up in ``unclaimed_other``, so a guest walking addresses cannot grow the VMM.

A device that returns a read value wider than the access (or negative) has a bug: the bus
raises DeviceError naming it rather than truncating the value.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from leanvm.errors import DeviceError

ACCESS_SIZES = (1, 2, 4, 8)  # what a device sees
BUS_SIZES = range(1, 9)  # what the bus accepts from the vCPU loop
ALL_ONES = {size: (1 << (8 * size)) - 1 for size in BUS_SIZES}
_CACHE_LIMIT = 4096  # remembered (address, size) look-ups per direction
UNCLAIMED_LIMIT = 256  # addresses with counts of their own; the rest go to unclaimed_other

if TYPE_CHECKING:
    from collections.abc import Iterator
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


def pieces(address: int, size: int) -> "Iterator[tuple[int, int]]":
    """(address, size) of the naturally aligned power-of-two pieces that make up
    ``[address, address + size)``, lowest first: each is the widest the address's alignment
    and the bytes left allow (7 bytes at 0x1001: 1 at 0x1001, 2 at 0x1002, 4 at 0x1004)."""
    end = address + size
    while address < end:
        piece = 8
        while address & (piece - 1) or address + piece > end:
            piece >>= 1
        yield address, piece
        address += piece


class Bus:
    """An address space (``kind`` is "pio" or "mmio") of non-overlapping device ranges."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit  # one past the highest address (0x10000 for ports)
        self._maps: list[Mapping] = []
        self._bases: list[int] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        self.unclaimed: Counter[int] = Counter()  # address -> unclaimed accesses (bounded)
        self.unclaimed_other = 0  # unclaimed accesses at addresses beyond UNCLAIMED_LIMIT
        self.accesses = 0
        # (address << 4 | size) -> (bound device method, base, bits or mask) for accesses
        # seen before: one dict look-up instead of a bisect per exit. Cleared when the ranges
        # change, and when full (a guest walking MMIO addresses cannot grow it without
        # bound). Reads keep the access's width in bits (a value shifted right by it must
        # be 0), writes the mask their value is cut to. Only sizes 1, 2, 4, 8 are kept.
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

    # --- accesses --------------------------------------------------------------------
    def read(self, address: int, size: int) -> int:
        self.accesses += 1
        hit = self._reads.get(address << 4 | size)
        if hit is not None:
            value = hit[0](address - hit[1], size)
            if value >> hit[2]:  # wider than the access, or negative: a device bug
                raise self._bad_value(address, size, value)
            return value
        return self._read(address, size)

    def write(self, address: int, size: int, value: int) -> None:
        self.accesses += 1
        hit = self._writes.get(address << 4 | size)
        if hit is not None:
            hit[0](address - hit[1], size, value & hit[2])
            return
        self._write(address, size, value)

    def _read(self, address: int, size: int) -> int:
        """A read not remembered yet: look the device up (and remember it)."""
        found = self.lookup(address, size) if size in ALL_ONES else None
        if found is None:
            self.unclaimed_reads += 1
            self._count_unclaimed(address)
            return ALL_ONES.get(size, 0)
        read, base = found.device.read, found.base
        if size & (size - 1) == 0:
            self._remember(self._reads, address, size, (read, base, 8 * size))
            value = read(address - base, size)
            if value >> (8 * size):
                raise self._bad_value(address, size, value)
            return value
        value = 0
        for at, piece in pieces(address, size):
            part = read(at - base, piece)
            if part >> (8 * piece):
                raise self._bad_value(at, piece, part)
            value |= part << (8 * (at - address))
        return value

    def _write(self, address: int, size: int, value: int) -> None:
        found = self.lookup(address, size) if size in ALL_ONES else None
        if found is None:
            self.unclaimed_writes += 1
            self._count_unclaimed(address)
            return
        write, base = found.device.write, found.base
        value &= ALL_ONES[size]
        if size & (size - 1) == 0:
            self._remember(self._writes, address, size, (write, base, ALL_ONES[size]))
            write(address - base, size, value)
            return
        for at, piece in pieces(address, size):
            write(at - base, piece, (value >> (8 * (at - address))) & ALL_ONES[piece])

    def _remember(self, cache: dict[int, tuple], address: int, size: int, entry: tuple) -> None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[address << 4 | size] = entry

    def _count_unclaimed(self, address: int) -> None:
        counts = self.unclaimed
        if len(counts) < UNCLAIMED_LIMIT or address in counts:
            counts[address] += 1
        else:
            self.unclaimed_other += 1

    def _bad_value(self, address: int, size: int, value: int) -> DeviceError:
        found = self.lookup(address, size)
        name, offset = (found.name, address - found.base) if found else ("?", address)
        return DeviceError(f"{self.kind} device {name} returned {value:#x} for a {size}-byte "
                           f"read at offset {offset:#x}: the value does not fit the access "
                           "(a bug in the device model)")

    def unclaimed_summary(self, top: int = 8) -> str:
        """The addresses most often accessed unclaimed, and the rest as one total:
        "0x80 x50, 0xed x2, 17 at other addresses" ("" when there were none)."""
        parts = [f"{address:#x} x{count}" for address, count in self.unclaimed.most_common(top)]
        rest = sum(self.unclaimed.values()) - sum(c for _, c in self.unclaimed.most_common(top))
        rest += self.unclaimed_other
        if rest:
            parts.append(f"{rest} at other addresses")
        return ", ".join(parts)
