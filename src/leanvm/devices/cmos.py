"""MC146818 CMOS RAM and real-time clock (ports 0x70 index, 0x71 data).

The RTC reads the host's clock (UTC, BCD, 24-hour) and never raises interrupts. The RAM
holds what PC firmware looks for, as QEMU's pc machine lays it out: memory sizes (base,
extended, above 16 MiB, above 4 GiB) and the CPU count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

INDEX = 0  # port 0x70: bit 7 masks NMI, bits 0-6 select a register
DATA = 1  # port 0x71
PORT_SIZE = 2  # index, data (where: machine/platform.py)

SECONDS, MINUTES, HOURS = 0x00, 0x02, 0x04
WEEKDAY, DAY, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
SHUTDOWN_STATUS = 0x0F
BASE_MEMORY_LO, BASE_MEMORY_HI = 0x15, 0x16  # KiB below 1 MiB (640)
EXT_MEMORY_LO, EXT_MEMORY_HI = 0x17, 0x18  # KiB above 1 MiB, at most 0xFC00
EXT_MEMORY2_LO, EXT_MEMORY2_HI = 0x30, 0x31  # the same again
MEM_ABOVE_16M_LO, MEM_ABOVE_16M_HI = 0x34, 0x35  # 64 KiB units between 16 MiB and 4 GiB
MEM_ABOVE_4G = 0x5B  # 3 bytes, 64 KiB units
CPU_COUNT_MINUS_1 = 0x5F

STATUS_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; update not in progress
STATUS_B_24H = 0x02  # 24-hour mode, BCD
STATUS_D_VALID = 0x80  # CMOS RAM valid (battery good)


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class Cmos:
    def __init__(self, low_ram: int, high_ram: int, cpus: int = 1,
                 clock: Callable[[], float] = time.time) -> None:
        self.ram = bytearray(128)
        self.index = 0
        self._clock = clock
        self.ram[STATUS_A], self.ram[STATUS_B] = STATUS_A_DEFAULT, STATUS_B_24H
        self.ram[STATUS_D] = STATUS_D_VALID
        self.ram[BASE_MEMORY_LO], self.ram[BASE_MEMORY_HI] = 640 & 0xFF, 640 >> 8
        extended = min(max(low_ram - (1 << 20), 0) // 1024, 0xFC00)
        for lo, hi in ((EXT_MEMORY_LO, EXT_MEMORY_HI), (EXT_MEMORY2_LO, EXT_MEMORY2_HI)):
            self.ram[lo], self.ram[hi] = extended & 0xFF, extended >> 8
        above_16m = min(max(low_ram - (16 << 20), 0) // 65536, 0xFFFF)
        self.ram[MEM_ABOVE_16M_LO], self.ram[MEM_ABOVE_16M_HI] = above_16m & 0xFF, above_16m >> 8
        above_4g = min(high_ram // 65536, 0xFFFFFF)
        self.ram[MEM_ABOVE_4G:MEM_ABOVE_4G + 3] = above_4g.to_bytes(3, "little")
        self.ram[CPU_COUNT_MINUS_1] = max(cpus - 1, 0)

    def read(self, offset: int, size: int) -> int:
        if offset == INDEX:
            return 0xFF
        index = self.index
        if index <= YEAR or index == CENTURY:
            now = time.gmtime(self._clock())
            fields = {SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour,
                      WEEKDAY: (now.tm_wday + 1) % 7 + 1, DAY: now.tm_mday, MONTH: now.tm_mon,
                      YEAR: now.tm_year % 100, CENTURY: now.tm_year // 100}
            return _bcd(fields[index]) if index in fields else 0  # alarms read as 0
        value = self.ram[index]
        if index == STATUS_C:
            self.ram[STATUS_C] = 0  # reading C acknowledges interrupts
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INDEX:
            self.index = value & 0x7F
        elif offset == DATA and self.index not in (STATUS_C, STATUS_D):
            if self.index == STATUS_A:
                value &= 0x7F  # update-in-progress is read-only
            self.ram[self.index] = value & 0xFF
