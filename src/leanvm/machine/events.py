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


SIZE_EVENT_PERIOD = 1.0  # seconds: QEMU sends MEMORY_DEVICE_SIZE_CHANGE at most once a second


class SizeChangeEvents:
    """MEMORY_DEVICE_SIZE_CHANGE for one virtio-mem device, as a discard-manager listener
    (memory/discard.py): a plug or unplug sends the device's plugged size, at most once a
    period, as QEMU rate-limits it per device; changes within a period are folded into one
    event at its end, which carries the size then."""

    def __init__(self, events: MachineEvents, name: str, size: Callable[[], int],
                 period: float = SIZE_EVENT_PERIOD) -> None:
        self._events, self._name, self._size, self._period = events, name, size, period
        self._lock = threading.Lock()
        self._next = 0.0  # time.monotonic() before which no event goes out at once
        self._timer: threading.Timer | None = None
        self._last_sent: int | None = None

    def on_populate(self, offset: int, size: int) -> None:
        self.changed(size)  # told before the blocks are marked: they count already

    def on_discard(self, offset: int, size: int) -> None:
        self.changed()  # told after they are marked

    def changed(self, coming: int = 0) -> None:
        """The plugged size changed (``coming``: bytes about to count that do not yet)."""
        with self._lock:
            now = time.monotonic()
            if self._timer is not None:
                return  # folded into the event at the end of this period
            if now >= self._next:
                self._next = now + self._period
                send = True
            else:
                self._timer = threading.Timer(self._next - now, self._flush)
                self._timer.daemon = True
                self._timer.start()
                send = False
        if send:
            self._send(coming)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            self._next = time.monotonic() + self._period
        self._send()

    def _send(self, coming: int = 0) -> None:
        size = self._size() + coming
        if size == self._last_sent:
            return
        self._last_sent = size
        self._events.emit("MEMORY_DEVICE_SIZE_CHANGE", {
            "id": self._name, "size": size, "qom-path": f"/machine/peripheral/{self._name}"})

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
