"""System control port A (0x92): bit 1 is the A20 gate, bit 0 a fast reset."""

from __future__ import annotations

from collections.abc import Callable

FAST_RESET = 0x01
A20 = 0x02


class Port92:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.value = A20  # A20 is always enabled in a KVM guest

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = (value & ~FAST_RESET) | A20
        if value & FAST_RESET:
            self._on_reset()
