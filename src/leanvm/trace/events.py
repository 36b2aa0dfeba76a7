"""Trace events with host CLOCK_MONOTONIC nanosecond timestamps.

Every trace site in leanvm is written ``if tracer.enabled: tracer.instant(...)``: with tracing
off, a site costs one attribute check. Events go to an in-memory list capped at ``limit``
(a guest firing probes forever cannot exhaust host memory); the overflow is counted.

Categories: "vmm" (leanvm's own phases), "firmware" (recognised firmware lines), "probe"
(guest probes on port 0x404 or its MMIO twin), "fw_cfg" (item transfers, as spans),
"guest" (recognised kernel and userspace console lines); details, left out of the
timeline table unless asked for: "debugcon" and "console" (every line of the firmware debug
console and of the serial console) and "fw_cfg-item" (every other fw_cfg read).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

DEFAULT_LIMIT = 1_000_000
PHASE_CATEGORIES = ("vmm", "firmware", "probe", "fw_cfg", "guest")  # the timeline's rows
# details, shown with --all: lines, fw_cfg items, RIP samples (--sample-rip)
LINE_CATEGORIES = ("debugcon", "console", "fw_cfg-item", "sample")


class Event(NamedTuple):
    ts: int  # CLOCK_MONOTONIC ns; a span's start
    cat: str
    name: str
    dur: int = 0  # ns; 0 for an instant
    args: dict[str, Any] | None = None


class Tracer:
    """Records events as plain tuples (ts, cat, name, dur, args), and probes, the one kind a
    guest can fire at exit rate, as integers in an array: ts, id, argument count, arguments
    (24 bytes for a probe without arguments, so a long run of probes costs little host memory
    and few page faults). ``events`` gives everything as Event values, in time order."""

    __slots__ = ("enabled", "_records", "_probes", "probe_names", "dropped",
                 "limit", "origin", "_room")

    def __init__(self, enabled: bool = False, origin: int = 0, limit: int = DEFAULT_LIMIT) -> None:
        from array import array

        self.enabled = enabled
        self._records: list[tuple[int, str, str, int, dict[str, Any] | None]] = []
        self._probes = array("Q")
        self.probe_names: dict[int, str] = {}
        self.dropped = 0
        self.limit = limit
        self._room = limit  # events that may still be recorded
        self.origin = origin  # the process start: times are shown relative to it

    def __len__(self) -> int:
        return self.limit - self._room

    def instant(self, cat: str, name: str, ts: int | None = None,
                args: dict[str, Any] | None = None) -> None:
        if self._room <= 0:
            self.dropped += 1
            return
        self._room -= 1
        self._records.append((_now() if ts is None else ts, cat, name, 0, args))

    def span(self, cat: str, name: str, start: int, end: int,
             args: dict[str, Any] | None = None) -> None:
        if self._room <= 0:
            self.dropped += 1
            return
        self._room -= 1
        self._records.append((start, cat, name, max(end - start, 0), args))

    def probe(self, probe_id: int, args: tuple[int, ...] = ()) -> None:
        """A guest probe (category "probe"), named from ``probe_names`` when read back.
        ``probe_id`` and ``args`` are unsigned 64-bit values (what a port or MMIO write
        carries). The hot path of a probe-heavy guest: keep it short."""
        if self._room <= 0:
            self.dropped += 1
            return
        self._room -= 1
        if args:
            self._probes.extend((_now(), probe_id, len(args), *args))
        else:
            self._probes.extend((_now(), probe_id, 0))

    def _probe_events(self) -> list[Event]:
        out = []
        data, index, names = self._probes, 0, self.probe_names
        while index < len(data):
            ts, ident, count = data[index], data[index + 1], data[index + 2]
            args: dict[str, Any] = {"id": ident}
            if count:
                args["args"] = list(data[index + 3:index + 3 + count])
            out.append(Event(ts, "probe", names.get(ident, f"probe {ident}"), 0, args))
            index += 3 + count
        return out

    @property
    def events(self) -> list[Event]:
        """Everything recorded, in time order (ties in the order recorded)."""
        merged = [Event(*record) for record in self._records] + self._probe_events()
        return sorted(merged, key=lambda e: e.ts)

    def sorted_events(self) -> list[Event]:
        return self.events


_now = time.monotonic_ns


# Probe ids of the 2011 boot-time hack (SeaBIOS and LinuxBoot writing to port 0x404).
BUILTIN_PROBES = {
    1001: "BIOS post", 1002: "BIOS int 18", 1003: "BIOS int 19", 1004: "BIOS boot OS",
    2001: "LinuxBoot copy kernel", 2002: "LinuxBoot copy initrd", 2003: "LinuxBoot boot OS",
    # the /init of `leanvm initrd build` (loader/initramfs.py INIT_PROBES)
    3001: "init started", 3002: "init mounted file systems", 3003: "init powering off",
}
