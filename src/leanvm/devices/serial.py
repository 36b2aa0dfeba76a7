"""16550A UART (the PC's COM ports), enough for Linux's 8250 driver and polled consoles.

Transmission is instant: THR writes go straight to ``output``, so THRE/TEMT are always set.
Received bytes (``receive``, callable from any thread) queue in a FIFO. The interrupt line
is ``irq(level)``; like a PC, it is gated by MCR OUT2.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# register offsets (DLAB=0 unless noted)
RBR_THR = 0  # receive buffer (read) / transmit holding (write); DLL when DLAB=1
IER = 1  # interrupt enable; DLM when DLAB=1
IIR_FCR = 2  # interrupt identification (read) / FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

IIR_NONE = 0x01  # no interrupt pending
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0  # both FIFO bits, as a 16550A reports them

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80  # divisor latch access

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # gates the interrupt line on PCs
MCR_LOOP = 0x10

LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_QUEUE_LIMIT = 1 << 16  # bytes of pending input kept before new input is dropped


class Serial16550:
    """One UART. ``output(bytes)`` receives transmitted bytes; ``irq(level)`` drives its line."""

    def __init__(self, output: Callable[[bytes], None],
                 irq: Callable[[bool], None] = lambda level: None,
                 on_tx_interrupts: Callable[[bool], None] | None = None) -> None:
        self._output = output
        self._irq = irq
        # told when the guest turns the transmit interrupt (IER THRI) on or off: a guest
        # that waits for it cannot have its writes queued (machine/platform.py)
        self._on_tx_interrupts = on_tx_interrupts
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.lsr_errors = 0
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud
        self.fcr = 0
        self._thr_pending = False  # THRE interrupt raised and not yet acknowledged
        self._level = False
        self.transmitted = 0
        self.dropped = 0

    # --- host side -----------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Queue bytes as if they arrived on the line (thread-safe)."""
        with self._lock:
            room = RX_QUEUE_LIMIT - len(self._rx)
            if len(data) > room:
                self.dropped += len(data) - room
                self.lsr_errors |= LSR_OE
            self._rx.extend(data[:max(room, 0)])
            self._update_irq()

    @property
    def pending_input(self) -> int:
        return len(self._rx)

    # --- guest side ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset & 7)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset & 7, value & 0xFF)

    def _read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                return self.dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if reg == IER:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            ident = self._identify()
            if ident == IIR_THRI:
                self._thr_pending = False  # reading IIR acknowledges THRE
                self._update_irq()
            return ident | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self._rx else 0)
            self.lsr_errors = 0
            return value
        if reg == MSR:
            if self.mcr & MCR_LOOP:  # loopback: modem outputs appear as inputs
                return ((self.mcr & MCR_RTS) << 3 | (self.mcr & MCR_DTR) << 5
                        | (self.mcr & MCR_OUT1) << 4 | (self.mcr & MCR_OUT2) << 4)
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self.scr

    def _write(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                self.dll = value
                return
            self.transmitted += 1
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_QUEUE_LIMIT:
                    self._rx.append(value)
            else:
                self._output(bytes((value,)))
            self._thr_pending = True  # the byte left at once: THR is empty again
            self._update_irq()
        elif reg == IER:
            if dlab:
                self.dlm = value
                return
            newly_thri = value & IER_THRI and not self.ier & IER_THRI
            changed = (value ^ self.ier) & IER_THRI
            self.ier = value & 0x0F
            if newly_thri:
                self._thr_pending = True
            self._update_irq()
            if changed and self._on_tx_interrupts is not None:
                self._on_tx_interrupts(bool(value & IER_THRI))
        elif reg == IIR_FCR:
            self.fcr = value
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._update_irq()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
            self._update_irq()
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes are ignored (factory test registers)

    def _identify(self) -> int:
        if self.ier & IER_RLSI and self.lsr_errors:
            return IIR_RLSI
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._identify() != IIR_NONE and bool(self.mcr & MCR_OUT2)
        if level != self._level:
            self._level = level
            self._irq(level)
