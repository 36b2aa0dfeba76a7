"""What a machine tells whoever listens: its QMP events (STOP, RESUME, SHUTDOWN, POWERDOWN,
GUEST_PANICKED, DUMP_COMPLETED), named and shaped as QEMU's so that the QMP server sends
them as they are, with the wall-clock time they happened.

Listeners are called on the thread that emitted (a vCPU's, the QMP server's, the caller's);
they must be quick and must not raise (a QMP server only queues the event). The listener
list is bounded: a program that keeps adding listeners gets an error, not a slow VMM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from leanvm.errors import LeanvmError

MAX_LISTENERS = 64


class MachineEvent(NamedTuple):
    name: str  # QEMU's event name
    data: dict[str, Any]
    time_ns: int  # wall clock (CLOCK_REALTIME), as QMP's timestamp

    def qmp(self) -> dict[str, Any]:
        seconds, ns = divmod(self.time_ns, 1_000_000_000)
        message: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": ns // 1000},
                                   "event": self.name}
        if self.data:
            message["data"] = self.data
        return message


class MachineEvents:
    __slots__ = ("_listeners", "_lock", "history")

    def __init__(self) -> None:
        self._listeners: list[Callable[[MachineEvent], None]] = []
        self._lock = threading.Lock()
        self.history: list[str] = []  # names of the last events, for tests and people

    def listen(self, listener: Callable[[MachineEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with every event from now on; returns the undo."""
        with self._lock:
            if len(self._listeners) >= MAX_LISTENERS:
                raise LeanvmError(f"too many event listeners (at most {MAX_LISTENERS})")
            self._listeners.append(listener)

        def undo() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return undo

    def emit(self, name: str, data: dict[str, Any] | None = None) -> MachineEvent:
        event = MachineEvent(name, data or {}, time.time_ns())
        with self._lock:
            listeners = list(self._listeners)
            self.history = (self.history + [name])[-64:]
        for listener in listeners:
            listener(event)
        return event
