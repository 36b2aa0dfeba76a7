"""i8042 keyboard controller: just enough for a guest to reset the machine.

Linux's ``reboot=k`` waits for the input buffer to drain (status bit 1 clear) and writes
0xFE (pulse the reset line) to the command port; firmware also resets through the output
port (command 0xD1, then a byte with bit 0 clear). Either calls ``on_reset``.
"""

from __future__ import annotations

from collections.abc import Callable

DATA = 0  # port 0x60
COMMAND = 4  # port 0x64 (status on read)

STATUS_OBF = 0x01  # output buffer full: data for the guest at port 0x60
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_CMD = 0x08  # last write was a command

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_SELF_TEST = 0xAA  # answers 0x55
CMD_KBD_TEST = 0xAB  # answers 0x00
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_RESET = 0xFE  # pulse output line 0: CPU reset

OUTPUT_PORT_RESET = 0x01  # bit 0 low asserts reset
OUTPUT_PORT_A20 = 0x02


class I8042:
    """Registered at port 0x60 with size 5, so offset 0 is 0x60 and offset 4 is 0x64."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.status = STATUS_SYS
        self.config = 0x45
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._out: int | None = None
        self._pending: int | None = None  # command awaiting a data byte
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == COMMAND:
            return self.status | (STATUS_OBF if self._out is not None else 0)
        if offset == DATA:
            value, self._out = (self._out or 0), None
            return value
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self.status |= STATUS_CMD
            self._command(value)
        elif offset == DATA:
            self.status &= ~STATUS_CMD
            pending, self._pending = self._pending, None
            if pending == CMD_WRITE_CONFIG:
                self.config = value
            elif pending == CMD_WRITE_OUTPUT_PORT:
                self.output_port = value
                if not value & OUTPUT_PORT_RESET:
                    self._reset()
            # bytes for the keyboard itself are ignored: there is no keyboard

    def _command(self, command: int) -> None:
        if command == CMD_READ_CONFIG:
            self._out = self.config
        elif command in (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT):
            self._pending = command
        elif command == CMD_SELF_TEST:
            self._out = 0x55
        elif command == CMD_KBD_TEST:
            self._out = 0x00
        elif command == CMD_READ_OUTPUT_PORT:
            self._out = self.output_port
        elif command == CMD_PULSE_RESET:
            self._reset()
        # other commands (enable/disable ports) change nothing we model

    def _reset(self) -> None:
        self.resets += 1
        self._on_reset()
