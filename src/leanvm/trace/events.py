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
LINE_CATEGORIES = ("debugcon", "console", "fw_cfg-item")  # details: shown with --all


class Event(NamedTuple):
    ts: int  # CLOCK_MONOTONIC ns; a span's start
    cat: str
    name: str
    dur: int = 0  # ns; 0 for an instant
    args: dict[str, Any] | None = None


class Tracer:
    __slots__ = ("enabled", "events", "dropped", "limit", "origin")

    def __init__(self, enabled: bool = False, origin: int = 0, limit: int = DEFAULT_LIMIT) -> None:
        self.enabled = enabled
        self.events: list[Event] = []
        self.dropped = 0
        self.limit = limit
        self.origin = origin  # the process start: times are shown relative to it

    def instant(self, cat: str, name: str, ts: int | None = None,
                args: dict[str, Any] | None = None) -> None:
        if len(self.events) >= self.limit:
            self.dropped += 1
            return
        self.events.append(Event(time.monotonic_ns() if ts is None else ts, cat, name, 0, args))

    def span(self, cat: str, name: str, start: int, end: int,
             args: dict[str, Any] | None = None) -> None:
        if len(self.events) >= self.limit:
            self.dropped += 1
            return
        self.events.append(Event(start, cat, name, max(end - start, 0), args))

    def sorted_events(self) -> list[Event]:
        return sorted(self.events, key=lambda e: e.ts)


# Probe ids of the 2011 boot-time hack (SeaBIOS and LinuxBoot writing to port 0x404).
BUILTIN_PROBES = {
    1001: "BIOS post", 1002: "BIOS int 18", 1003: "BIOS int 19", 1004: "BIOS boot OS",
    2001: "LinuxBoot copy kernel", 2002: "LinuxBoot copy initrd", 2003: "LinuxBoot boot OS",
}
