"""Guest exit port: a write of a value ends the VM with that value as the guest's status.

Like QEMU's isa-debug-exit, but the status is reported as written (no shifting). Test guests
use it to report pass/fail; leanvm places it at port 0xf4 by default.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1  # all ones, at the width read

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._on_exit(value)
