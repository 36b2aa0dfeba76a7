"""Catch the moment firmware enters a kernel, without breakpoints and without touching the
firmware.

Hardware breakpoints (KVM_SET_GUEST_DEBUG) do not fire on every host (they do not on nested
KVM that emulates guest supervisor code), so the trap uses memory slots instead: once armed,
the page that holds the kernel's entry point is taken out of KVM's memslots. The guest's data
accesses to that page then arrive as MMIO and are served from guest RAM (they behave exactly
as before, only slower), while an instruction fetch from it cannot be emulated from MMIO and
arrives as an emulation failure. On that exit, if the vCPU's linear RIP lies in the page,
the trap records the time and address, maps the page back and lets the vCPU go on: it
re-executes the same instruction from RAM. Any other emulation failure is not the trap's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from leanvm.memory.guest import GuestMemory

PAGE = 4096


class KernelEntry(NamedTuple):
    address: int  # linear address of the first instruction run from the page
    cs: int  # the code segment selector (real mode: the segment)
    rip: int
    time_ns: int  # CLOCK_MONOTONIC


class RamWindow:
    """Bus device: guest RAM behind an MMIO window, for accesses while the page is unmapped."""

    def __init__(self, memory: GuestMemory, base: int) -> None:
        self.memory = memory
        self.base = base

    def read(self, offset: int, size: int) -> int:
        return self.memory.read_int(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.memory.write_int(self.base + offset, size, value)


class EntryTrap:
    def __init__(self, entry: int, memory: GuestMemory,
                 unmap: Callable[[int, int], object], remap: Callable[[object], None],
                 register: Callable[[int, int, RamWindow], None],
                 unregister: Callable[[int], None]) -> None:
        self.entry = entry
        self.page = entry & ~(PAGE - 1)
        self._memory = memory
        self._unmap, self._remap = unmap, remap
        self._register, self._unregister = register, unregister
        self._pieces: object = None
        self.armed = False
        self.hit: KernelEntry | None = None

    def arm(self) -> None:
        if self.armed or self.hit is not None:
            return
        self._pieces = self._unmap(self.page, PAGE)
        self._register(self.page, PAGE, RamWindow(self._memory, self.page))
        self.armed = True

    def disarm(self) -> None:
        if not self.armed:
            return
        self._unregister(self.page)
        self._remap(self._pieces)
        self.armed = False

    def on_fault(self, linear_rip: int, cs: int, rip: int) -> bool:
        """An emulation failure at ``linear_rip``: True if it was this trap (now disarmed)."""
        if not self.armed or not self.page <= linear_rip < self.page + PAGE:
            return False
        self.hit = KernelEntry(linear_rip, cs, rip, time.monotonic_ns())
        self.disarm()
        return True
