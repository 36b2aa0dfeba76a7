"""KVM's coalesced I/O ring: writes to registered port or MMIO ranges that KVM queues in a
page shared with the VMM instead of exiting (Linux Documentation/virt/kvm/api.rst,
KVM_REGISTER_COALESCED_MMIO). The VMM must consume the queue, in order, before it handles
any exit, so that a device sees every write before a later read; KVM exits normally when
the ring is full.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from leanvm.abi import kvm as abi

_FIRST_LAST = struct.Struct("<II")
_ENTRY = struct.Struct("<QII8s")  # phys_addr, len, pio, data


class CoalescedRing:
    """The ring page, in a vCPU's mapping (every vCPU maps the same page)."""

    __slots__ = ("_view", "_lock", "consumed")

    def __init__(self, view: memoryview) -> None:
        self._view = view  # the whole page
        self._lock = threading.Lock()  # vCPU threads drain in turn
        self.consumed = 0

    def release(self) -> None:
        self._view.release()

    def pending(self) -> bool:
        first, last = _FIRST_LAST.unpack_from(self._view, 0)
        return first != last

    def drain(self, deliver: Callable[[bool, int, int, int], None]) -> int:
        """Hand every queued write, oldest first, to ``deliver(pio, address, size, value)``;
        how many there were. Entries KVM wrote with an impossible length (nothing a guest
        can cause) are skipped, never read past."""
        view = self._view
        with self._lock:
            first, last = _FIRST_LAST.unpack_from(view, 0)
            done = 0
            while first != last and first < abi.COALESCED_MAX:
                address, size, pio, data = _ENTRY.unpack_from(
                    view, abi.COALESCED_RING_HEADER + first * abi.COALESCED_ENTRY)
                if 0 < size <= 8:
                    deliver(bool(pio), address, size, int.from_bytes(data[:size], "little"))
                first = (first + 1) % abi.COALESCED_MAX
                done += 1
            struct.pack_into("<I", view, 0, first)  # KVM may reuse the entries now
            self.consumed += done
        return done
