"""Bochs/QEMU debug console (port 0x402 for SeaBIOS, 0xE9 for others): bytes the firmware
writes go to ``output``; a read returns 0xE9 so firmware can tell the port is there."""

from __future__ import annotations

from collections.abc import Callable

PRESENT = 0xE9  # what a read returns


class DebugCon:
    def __init__(self, output: Callable[[bytes], None]) -> None:
        self._output = output
        self.written = 0

    def read(self, offset: int, size: int) -> int:
        return PRESENT

    def write(self, offset: int, size: int, value: int) -> None:
        self.written += 1
        self._output(bytes((value & 0xFF,)))
