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

import threading
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
        self._ring = ring
        self._kick = kick
        self._interval = interval
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.kicks = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="leanvm-flusher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        ring, seen = self._ring, -1
        while not self._done.wait(self._interval):
            if not ring.pending():
                seen = -1
                continue
            consumed = ring.consumed
            if consumed == seen:  # nothing consumed since the last look: nobody is exiting
                self.kicks += 1
                self._kick()
            seen = consumed
