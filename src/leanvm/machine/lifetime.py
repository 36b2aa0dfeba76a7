"""What a Machine holds and gives back, and how long it may run: resources closed in order
(also when a forgotten Machine is collected), time limits, the kick signal's safety net."""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

from leanvm.errors import ConfigError
from leanvm.machine.vcpu_loop import KICK_SIGNAL

MAX_TIMEOUT = 366 * 86400.0  # seconds; threading.Timer cannot wait much longer


class Resources:
    """What a Machine holds that must be given back, closed in reverse order of acquisition
    (flash banks before the guest memory they live in, vCPUs and the VM before /dev/kvm).
    Holds no reference to the Machine, so a forgotten Machine can still be collected."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def close(self) -> None:
        while self.items:
            self.items.pop().close()

    def leaked(self, name: str) -> None:
        if self.items:
            import warnings

            warnings.warn(f"leanvm Machine {name} was never closed: use 'with Machine(...)' "
                          "or call close()", ResourceWarning, stacklevel=2)
        self.close()


def check_timeout(timeout: float | None) -> float | None:
    """A time limit in seconds: None (no limit) or a finite number above 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"bad timeout {timeout!r}: expected a number of seconds")
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise ConfigError(f"bad timeout {timeout!r}: expected a number of seconds above 0 "
                          f"and at most {MAX_TIMEOUT:.0f} (a year)")
    return float(timeout)


_kick_handler_installed = False


def install_kick_handler() -> None:
    """A no-op handler for KICK_SIGNAL, where Python allows it (the main thread): vCPU
    threads block the signal and need none (vcpu_loop.LoopControl), but a stray KICK_SIGNAL
    sent to the whole process must not kill it."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_handler_installed = True
