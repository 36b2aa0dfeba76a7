"""Boot probes: a guest (firmware, kernel or user space) marks a moment on leanvm's timeline.

Registers, at port 0x404 (8 ports) and at an MMIO twin (8 bytes) for guests without port
I/O (see docs/tracing.md for the address):

    offset 0, write (32-bit, or any width up to 8 bytes): fire probe ID = the value, with the
              arguments queued so far; the queue empties
    offset 4, write: queue one argument (up to MAX_ARGS; more are dropped and counted)
    offset 0, read (32-bit): "LVPB" (0x4250564c): the device is there

A plain 32-bit write of an id to port 0x404, as the 2011 SeaBIOS/LinuxBoot patches did, is a
probe without arguments. The device hands ``(id, args)`` to ``on_probe``; naming ids and
timestamping them is the tracer's business. Writes are cheap when tracing is off: the
machine installs ``on_probe`` only when tracing is on.
"""

from __future__ import annotations

from collections.abc import Callable

PORT_SIZE = 8  # where: machine/platform.py (port 0x404, after the 2011 patches)
MMIO_SIZE = 8
FIRE, ARG = 0, 4
MAGIC = 0x4250564C  # "LVPB"
MAX_ARGS = 4


class ProbePort:
    def __init__(self, on_probe: Callable[[int, tuple[int, ...]], None] | None = None) -> None:
        self.on_probe = on_probe
        self._args: list[int] = []
        self.fired = 0
        self.dropped_args = 0

    def read(self, offset: int, size: int) -> int:
        if offset == FIRE:
            return MAGIC & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == FIRE:
            self.fired += 1
            queued = self._args
            args = ()
            if queued:
                args = tuple(queued)
                queued.clear()
            on_probe = self.on_probe
            if on_probe is not None:
                on_probe(value, args)
        elif offset == ARG:
            if len(self._args) < MAX_ARGS:
                self._args.append(value)
            else:
                self.dropped_args += 1
