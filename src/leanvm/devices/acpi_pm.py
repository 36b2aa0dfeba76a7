"""ACPI fixed-hardware power management registers: PM1a event, PM1a control, PM timer.

What the FADT (firmware/acpi.py) points a guest OS at, so that Linux can power the VM off
(ACPI S5) and has the fixed hardware a non-hardware-reduced ACPI platform describes. Register
meanings are from the ACPI specification (6.x, section 4.8 "ACPI Hardware Features"):

  offset 0  PM1_STS (16 bits, write 1 to clear)   TMR_STS 0, BM_STS 4, GBL_STS 5,
                                                   PWRBTN_STS 8, SLPBTN_STS 9, RTC_STS 10,
                                                   PCIEXP_WAKE_STS 14, WAK_STS 15
  offset 2  PM1_EN  (16 bits)                      TMR_EN 0, GBL_EN 5, PWRBTN_EN 8,
                                                   SLPBTN_EN 9, RTC_EN 10
  offset 4  PM1_CNT (16 bits)                      SCI_EN 0, BM_RLD 1, GBL_RLS 2 (write-only),
                                                   SLP_TYP 10-12, SLP_EN 13 (write-only)
  offset 6  reserved (reads 0)
  offset 8  PM_TMR  (32 bits, read-only)           3.579545 MHz free-running count

SMI_CMD is 0 in the FADT (the platform is always in ACPI mode), so SCI_EN reads as 1 and
cannot be cleared. A write with SLP_EN set enters the sleep state named by SLP_TYP: the
value the DSDT's \\_S5 package gives (SLP_TYP_S5) calls ``on_poweroff``; no other sleep
state is offered, so other values do nothing. The only event source is the fixed power
button (``press_power_button``); the SCI line (ISA IRQ 9) is high while an enabled status
bit is set. The device sees only offsets and sizes; any register traffic is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PORT_SIZE = 12
PM1_EVT_OFFSET, PM1_EVT_LEN = 0, 4  # PM1a_EVT_BLK: PM1_STS then PM1_EN
PM1_CNT_OFFSET, PM1_CNT_LEN = 4, 2  # PM1a_CNT_BLK
PM_TMR_OFFSET, PM_TMR_LEN = 8, 4  # PM_TMR_BLK

PM_TIMER_HZ = 3_579_545  # the ACPI PM timer's fixed frequency

# PM1_STS / PM1_EN bits
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
STS_BITS = (TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | PCIEXP_WAKE_STS
            | WAK_STS)
EN_BITS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS  # same positions in PM1_EN

# PM1_CNT bits
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2  # write-only: releases the global lock (no firmware here to notify)
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7 << 10
SLP_EN = 1 << 13  # write-only: enter the sleep state in SLP_TYP
CNT_STORED = BM_RLD | SLP_TYP_MASK  # bits a write changes and a read returns

SLP_TYP_S5 = 5  # the SLP_TYP value of \_S5 in leanvm's DSDT (any 3-bit value would do)


class AcpiPm:
    """PM1a event and control registers and the PM timer, at offsets 0-11 of their block."""

    def __init__(self, on_poweroff: Callable[[], None],
                 sci: Callable[[bool], None] | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._on_poweroff = on_poweroff
        self._sci = sci
        self._clock_ns = clock_ns
        self._origin_ns = clock_ns()
        self.status = 0  # PM1_STS
        self.enable = 0  # PM1_EN
        self.control = 0  # PM1_CNT, stored bits only (SCI_EN is added on read)
        self.sci_level = False
        self.poweroffs = 0  # S5 entries requested (the VM normally stops at the first)

    # --- registers as bytes ----------------------------------------------------------
    def _timer(self) -> int:
        ticks = (self._clock_ns() - self._origin_ns) * PM_TIMER_HZ // 1_000_000_000
        return ticks & 0xFFFFFFFF  # 32-bit counter (FADT TMR_VAL_EXT)

    def _bytes(self) -> bytes:
        return (self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little")
                + (self.control | SCI_EN).to_bytes(2, "little") + bytes(2)
                + self._timer().to_bytes(4, "little"))

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or size <= 0 or offset + size > PORT_SIZE:
            return (1 << (8 * max(size, 0))) - 1
        return int.from_bytes(self._bytes()[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or size <= 0 or offset + size > PORT_SIZE:
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        # (register offset, width): the part of the write that lands in each register
        for start, width, handler in ((0, 2, self._write_status), (2, 2, self._write_enable),
                                      (PM1_CNT_OFFSET, 2, self._write_control)):
            lo, hi = max(offset, start), min(offset + size, start + width)
            if lo >= hi:
                continue
            bits = mask = 0
            for address in range(lo, hi):
                shift = 8 * (address - start)
                bits |= data[address - offset] << shift
                mask |= 0xFF << shift
            handler(bits, mask)

    # --- register semantics ----------------------------------------------------------
    def _write_status(self, bits: int, mask: int) -> None:
        self.status &= ~(bits & mask & STS_BITS)  # write 1 to clear
        self._update_sci()

    def _write_enable(self, bits: int, mask: int) -> None:
        self.enable = (self.enable & ~mask) | (bits & mask & EN_BITS)
        self._update_sci()

    def _write_control(self, bits: int, mask: int) -> None:
        self.control = (self.control & ~(mask & CNT_STORED)) | (bits & mask & CNT_STORED)
        if bits & mask & SLP_EN:
            sleep_type = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if sleep_type == SLP_TYP_S5:
                self.poweroffs += 1
                self._on_poweroff()

    # --- events ----------------------------------------------------------------------
    def press_power_button(self) -> None:
        """The fixed-feature power button: PWRBTN_STS, and an SCI if the guest enabled it."""
        self.status |= PWRBTN_STS
        self._update_sci()

    def _update_sci(self) -> None:
        level = bool(self.status & self.enable & EN_BITS)
        if level != self.sci_level:
            self.sci_level = level
            if self._sci is not None:
                self._sci(level)
