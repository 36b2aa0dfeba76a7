"""Timestamps on CLOCK_MONOTONIC, including this process's start time."""

from __future__ import annotations

import os
import time


def process_start_ns() -> int:
    """When this process started, on the CLOCK_MONOTONIC scale.

    From /proc/self/stat's starttime (clock ticks since boot, usually 10 ms resolution),
    moved from the boot clock to the monotonic clock. Falls back to now.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            stat = handle.read()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        hz = os.sysconf("SC_CLK_TCK")
        boot_to_mono = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
        return ticks * 1_000_000_000 // hz - boot_to_mono
    except (OSError, ValueError, IndexError):
        return time.monotonic_ns()
