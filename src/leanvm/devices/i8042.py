"""i8042 keyboard controller with a keyboard that answers but never types.

Reset: Linux's ``reboot=k`` waits for the input buffer to drain (status bit 1 clear) and
writes 0xFE (pulse the reset line) to the command port; firmware also resets through the
output port (command 0xD1, then a byte with bit 0 clear). Either calls ``on_reset``.

Keyboard: bytes written to port 0x60 outside a controller command go to the keyboard, which
acknowledges them as a PS/2 keyboard does (reset answers 0xFA 0xAA, identify 0xFA 0xAB 0x83,
commands with a parameter take it and acknowledge again). Firmware probes the keyboard at
boot; without answers SeaBIOS waits a full second for a timeout. There is no mouse: bytes for
the auxiliary port (command 0xD4) are dropped. IRQ 1 follows "output buffer full" while the
configuration byte enables keyboard interrupts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

DATA = 0  # port 0x60
COMMAND = 4  # port 0x64 (status on read)

STATUS_OBF = 0x01  # output buffer full: data for the guest at port 0x60
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_CMD = 0x08  # last write was a command
STATUS_UNLOCKED = 0x10  # keyboard not inhibited (no keylock); Linux warns "Keylock active"
# when it is clear, and QEMU's controller sets it from reset

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
CMD_WRITE_AUX = 0xD4  # next data byte goes to the mouse
CMD_PULSE_RESET = 0xFE  # pulse output line 0: CPU reset
CONFIG_KBD_INT = 0x01

KBD_ACK, KBD_RESEND, KBD_SELF_TEST_OK = 0xFA, 0xFE, 0xAA
KBD_ECHO, KBD_RESET = 0xEE, 0xFF
KBD_IDENTIFY, KBD_ID = 0xF2, (0xAB, 0x83)
KBD_SCANCODE_SET = 0xF0
KBD_WITH_PARAMETER = {0xED, 0xF0, 0xF3}  # LEDs, scan-code set, typematic rate
KBD_PLAIN = {0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD}  # just acknowledged
OUTPUT_LIMIT = 16  # bytes queued for the guest; a flooding guest loses the oldest

OUTPUT_PORT_RESET = 0x01  # bit 0 low asserts reset
OUTPUT_PORT_A20 = 0x02


class I8042:
    """Registered at port 0x60 with size 5, so offset 0 is 0x60 and offset 4 is 0x64."""

    def __init__(self, on_reset: Callable[[], None],
                 irq: Callable[[bool], None] | None = None) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._irq_level = False
        self.status = STATUS_SYS | STATUS_UNLOCKED
        self.config = 0x45
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._out: deque[int] = deque(maxlen=OUTPUT_LIMIT)
        self._pending: int | None = None  # controller command awaiting a data byte
        self._kbd_pending: int | None = None  # keyboard command awaiting its parameter
        self.scancode_set = 2
        self.resets = 0

    def read(self, offset: int, size: int) -> int:
        if offset == COMMAND:
            return self.status | (STATUS_OBF if self._out else 0)
        if offset == DATA:
            value = self._out.popleft() if self._out else 0
            self._update_irq()
            return value
        return 0xFF

    def _send(self, *data: int) -> None:
        self._out.extend(data)
        self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._out) and bool(self.config & CONFIG_KBD_INT)
        if level != self._irq_level and self._irq is not None:
            self._irq(level)
        self._irq_level = level

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
                self._update_irq()
            elif pending == CMD_WRITE_OUTPUT_PORT:
                self.output_port = value
                if not value & OUTPUT_PORT_RESET:
                    self._reset()
            elif pending == CMD_WRITE_AUX:
                pass  # no mouse
            else:
                self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None:
            if pending == KBD_SCANCODE_SET and value == 0:
                self._send(KBD_ACK, self.scancode_set)
            else:
                if pending == KBD_SCANCODE_SET and value in (1, 2, 3):
                    self.scancode_set = value
                self._send(KBD_ACK)
        elif value == KBD_RESET:
            self._out.clear()
            self._send(KBD_ACK, KBD_SELF_TEST_OK)
        elif value == KBD_IDENTIFY:
            self._send(KBD_ACK, *KBD_ID)
        elif value == KBD_ECHO:
            self._send(KBD_ECHO)
        elif value in KBD_WITH_PARAMETER:
            self._kbd_pending = value
            self._send(KBD_ACK)
        elif value in KBD_PLAIN:
            self._send(KBD_ACK)
        else:
            self._send(KBD_RESEND)

    def _command(self, command: int) -> None:
        if command == CMD_READ_CONFIG:
            self._send(self.config)
        elif command in (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX):
            self._pending = command
        elif command == CMD_SELF_TEST:
            self._send(0x55)
        elif command == CMD_KBD_TEST:
            self._send(0x00)
        elif command == CMD_READ_OUTPUT_PORT:
            self._send(self.output_port)
        elif command == CMD_PULSE_RESET:
            self._reset()
        # other commands (enable/disable ports) change nothing we model

    def _reset(self) -> None:
        self.resets += 1
        self._on_reset()
