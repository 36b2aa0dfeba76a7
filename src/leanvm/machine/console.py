"""What the guest prints: COM1 (the serial console) and the firmware debug console (port
0x402), kept in memory, copied to where the user asked, watched for text that ends the VM
(`--until`, SeaBIOS's "No bootable device", a Linux kernel panic) and waited on by
``Machine.wait_for_console`` from other threads. Device callbacks run on vCPU threads."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from leanvm.errors import ConfigError
from leanvm.machine.vcpu_loop import Stop, StopReason

if TYPE_CHECKING:
    import re

    from leanvm.devices.serial import Serial16550
    from leanvm.machine.config import MachineConfig, SerialConfig
    from leanvm.machine.tracing import BootTrace

CONSOLE_KEEP = 1 << 20  # bytes of each console kept in memory
NO_BOOT_DEVICE_LINE = b"No bootable device."  # SeaBIOS, before it waits 60 s to retry
PANIC_LINE = b"Kernel panic - not syncing"  # Linux's panic() message
PANIC_WINDOW = 4096  # bytes of recent console output searched for it


class GuestConsoles:
    def __init__(self, config: "MachineConfig", request: Callable[[Stop], None],
                 boot_trace: "BootTrace | None") -> None:
        self.config = config
        self._request = request  # asks the vCPU loop(s) to stop
        self._boot_trace = boot_trace
        self._serial = bytearray()
        self._debug = bytearray()
        self._debug_line = bytearray()
        self._serial_sink: BinaryIO | None = None
        self._debug_sink: BinaryIO | None = None
        self._restore_tty: Callable[[], None] | None = None
        self.until: bytes | None = None  # serial text that ends the VM (run(until=...))
        self._watch_panic = config.kernel is not None  # Linux guests: stop at a kernel panic
        self._changed = threading.Condition()
        self._watchers = 0

    def set_boot_trace(self, boot_trace: "BootTrace") -> None:
        """Feed the console lines to the timeline from now on (tracing started late)."""
        self._boot_trace = boot_trace

    @property
    def serial(self) -> bytes:
        return bytes(self._serial)

    @property
    def debug(self) -> bytes:
        return bytes(self._debug)

    # --- device callbacks ----------------------------------------------------------------
    def serial_output(self, data: bytes) -> None:
        if self._boot_trace is not None:
            self._boot_trace.serial(data)
        console = self._serial
        console += data
        if self._watchers and b"\n" in data:
            with self._changed:
                self._changed.notify_all()
        if self._watch_panic and b"\n" in data:
            self._check_panic()
        until = self.until
        if until is not None and until in console[-(len(data) + len(until)):]:
            self.until = None
            self._request(Stop(StopReason.CONSOLE_MATCH,
                               f"the serial output showed {until.decode(errors='replace')!r}"))
        if len(console) > 2 * CONSOLE_KEEP:
            del console[:-CONSOLE_KEEP]
        if self._serial_sink is not None:
            self._serial_sink.write(data)

    def debug_output(self, data: bytes) -> None:
        if self._boot_trace is not None:
            self._boot_trace.debugcon(data)
        if self._debug_sink is not None:
            self._debug_sink.write(data)
        if data == b"\n":
            self._firmware_line()
        else:
            self._debug_line += data
        console = self._debug
        console += data
        if len(console) > 2 * CONSOLE_KEEP:
            del console[:-CONSOLE_KEEP]

    def _firmware_line(self) -> None:
        """Lines of the firmware's debug console that end the VM."""
        line, self._debug_line = bytes(self._debug_line), bytearray()
        if line.startswith(NO_BOOT_DEVICE_LINE):
            self._request(Stop(StopReason.NO_BOOT_DEVICE, "the firmware found no bootable "
                               f"device ({line.decode(errors='replace').strip()})"))

    def _check_panic(self) -> None:
        """A Linux guest that panics stops the VM at once, with the panic's reason (the
        kernel would otherwise spin or wait for a reboot that tells the host nothing)."""
        tail = bytes(self._serial[-PANIC_WINDOW:])
        at = tail.rfind(PANIC_LINE)
        end = tail.find(b"\n", at) if at >= 0 else -1
        if end < 0:
            return
        self._watch_panic = False
        line = tail[at:end].decode(errors="replace").strip()
        self._request(Stop(StopReason.GUEST_PANIC, f"the guest kernel panicked: {line}"))

    def ends_mid_line(self) -> bool:
        """Whether the terminal's cursor is after guest text that did not end its line."""
        outputs = ((self.config.serial.mode, self._serial), (self.config.debugcon.mode,
                                                             self._debug))
        return any(mode == "stdio" and text and not text.endswith(b"\n")
                   for mode, text in outputs)

    # --- waiting (any thread) --------------------------------------------------------------
    def wait_for(self, regex: "re.Pattern[bytes]", timeout: float,
                 running: Callable[[], bool]) -> "re.Match[bytes] | None":
        """The first match of ``regex`` in the serial output, waiting up to ``timeout``
        seconds while ``running()``; None if it did not come (check ``running()`` for why)."""
        deadline = time.monotonic() + timeout
        self._watchers += 1
        try:
            with self._changed:
                while True:
                    match = regex.search(bytes(self._serial))
                    remaining = deadline - time.monotonic()
                    if match is not None or remaining <= 0 or not running():
                        return match
                    self._changed.wait(min(remaining, 0.05))
        finally:
            self._watchers -= 1

    def wake(self) -> None:
        """Wake waiters (the VM stopped)."""
        with self._changed:
            self._changed.notify_all()

    # --- where the output goes ---------------------------------------------------------
    def open(self, uart: "Serial16550") -> None:
        self._debug_sink = _open_sink(self.config.debugcon, "debugcon")
        self._serial_sink = _open_sink(self.config.serial, "serial")
        if self.config.serial.mode == "stdio":
            self._start_stdin_reader(uart)

    def close(self) -> None:
        if self._debug_sink is not None:
            self._debug_sink.close()
            self._debug_sink = None
        if self._restore_tty is not None:
            self._restore_tty()
            self._restore_tty = None
        if self._serial_sink is not None:
            self._serial_sink.close()
            self._serial_sink = None

    def _start_stdin_reader(self, uart: "Serial16550") -> None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if os.isatty(fd):  # keys go to the guest as typed; Ctrl-C still stops leanvm
            import termios
            import tty

            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self._restore_tty = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)

        def pump() -> None:
            while True:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                if not data:
                    return
                uart.receive(data)

        threading.Thread(target=pump, name="leanvm-stdin", daemon=True).start()


def _open_sink(where: "SerialConfig", what: str) -> BinaryIO | None:
    """The stream a character device writes to: stdout, a file, or none (memory only)."""
    if where.mode == "stdio":
        return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
    if where.mode == "file":
        assert where.path is not None
        try:
            return open(where.path, "wb", buffering=0)
        except OSError as exc:
            raise ConfigError(f"{where.path}: cannot open for {what} output "
                              f"({exc.strerror})") from None
    return None
