"""Keeps KVM's coalesced I/O queue moving while a guest makes no exits.

The vCPU loop empties the queue at every exit, which a guest printing on a polled console
makes after each byte anyway, and a guest that uses the transmit interrupt gets no queue
(platform.ConsoleQueue). A guest that writes without polling and then halts with
interrupts off makes no exit at all: its bytes would sit in the queue until the VM stops.
So a host thread looks every ``interval`` seconds and,
when it finds writes still queued that were queued at its last look, kicks the vCPUs, whose
loop empties the queue (machine/vcpu_loop.py). A busy console never waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.kvm.coalesced import CoalescedRing

# s: at most twice this before queued writes reach the device. A safety net only: a guest
# that waits for the transmit interrupt has its writes exit anyway (platform.ConsoleQueue),
# and a polled console exits at its next status read; long, since in a guest of a nested
# KVM a thread that wakes often costs the vCPU its time.
INTERVAL = 0.05


class RingFlusher:
    def __init__(self, ring: "CoalescedRing", kick: Callable[[], None],
                 interval: float = INTERVAL) -> None:
        from leanvm.machine.ticker import Ticker

        self._ring = ring
        self._kick = kick
        self._seen = -1
        self._ticker = Ticker(interval, self._look, "leanvm-flusher")
        self.kicks = 0

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def _look(self) -> None:
        ring = self._ring
        if not ring.pending():
            self._seen = -1
            return
        consumed = ring.consumed
        if consumed == self._seen:  # nothing consumed since the last look: nobody is exiting
            self.kicks += 1
            self._kick()
        self._seen = consumed
