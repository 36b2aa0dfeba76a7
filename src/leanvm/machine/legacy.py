"""The PC's BIOS area, 0xC0000-0xFFFFF, as the i440FX's PAM registers shape it.

Each segment (0xC0000-0xEFFFF in 16 KiB pieces, 0xF0000-0xFFFFF as one 64 KiB piece) is in
one of four modes: 0 DRAM off (reads and writes go to ROM or the PCI bus), 1 read-only DRAM,
2 write-only DRAM (reads from ROM), 3 read/write DRAM. Firmware uses them to copy itself
from flash into RAM (shadowing) and then write-protect the copy.

leanvm turns the modes into memslots over the same RAM and flash host memory, rebuilt on
each PAM write (a handful per boot): RAM read/write, RAM read-only, or the last 128 KiB of
flash bank 0 (0xE0000-0xFFFFF, while the bank is in read-array mode). Whatever has no
memslot exits to ``read``/``write`` here, which apply the same rules by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanvm.devices.pci import PAM0, PAM_COUNT
from leanvm.memory.guest import GuestRegion

if TYPE_CHECKING:
    from leanvm.machine.flash import FlashBank
    from leanvm.machine.memory_manager import MemoryManager

WINDOW_BASE, WINDOW_END = 0xC0000, 0x100000
ISA_BIOS_SIZE = 128 * 1024
GROUP = "bios-area"
DRAM_OFF, DRAM_READ, DRAM_WRITE, DRAM_RW = 0, 1, 2, 3


def _segments() -> list[tuple[int, int, int, int]]:
    """(base, size, PAM register, bit shift) for every segment."""
    segments = [(0xF0000, 0x10000, PAM0, 4)]
    for index in range(1, PAM_COUNT):
        base = 0xC0000 + (index - 1) * 0x8000
        segments.append((base, 0x4000, PAM0 + index, 0))
        segments.append((base + 0x4000, 0x4000, PAM0 + index, 4))
    return sorted(segments)


SEGMENTS = _segments()


class BiosArea:
    def __init__(self, memslots: "MemoryManager", ram: GuestRegion, bank: "FlashBank") -> None:
        self.memslots = memslots
        self.ram = ram
        self.bank = bank
        self.rom_base = WINDOW_END - min(bank.size, ISA_BIOS_SIZE)  # flash visible from here
        self.pam = bytearray(PAM_COUNT)  # all zero at reset: DRAM off, ROM visible
        self.changes = 0
        memslots.punch(WINDOW_BASE, WINDOW_END - WINDOW_BASE)
        self.refresh()

    def mode(self, address: int) -> int:
        for base, size, register, shift in SEGMENTS:
            if base <= address < base + size:
                return (self.pam[register - PAM0] >> shift) & 3
        return DRAM_RW

    def set_pam(self, register: int, value: int) -> None:
        if self.pam[register - PAM0] != value & 0x33:
            self.pam[register - PAM0] = value & 0x33
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the area's memslots from the PAM registers and the flash mode."""
        pieces: list[tuple[int, int, int, bool]] = []
        ram_host = self.ram.mapping.address - self.ram.base
        bank_host = self.bank.region.mapping.address + self.bank.size - WINDOW_END
        for base, size, register, shift in SEGMENTS:
            mode = (self.pam[register - PAM0] >> shift) & 3
            if mode & DRAM_READ:
                piece = (base, size, ram_host + base, mode != DRAM_RW)
            elif base >= self.rom_base and self.bank.device.romd:
                piece = (base, size, bank_host + base, True)
            else:
                continue
            last = pieces[-1] if pieces else None
            if last and last[0] + last[1] == base and last[3] == piece[3] \
                    and last[2] + last[1] == piece[2]:
                pieces[-1] = (last[0], last[1] + size, last[2], last[3])
            else:
                pieces.append(piece)
        self.memslots.replace_group(GROUP, pieces)
        self.changes += 1

    # --- accesses with no memslot behind them --------------------------------------------
    def read(self, offset: int, size: int) -> int:
        address = WINDOW_BASE + offset
        mode = self.mode(address)
        if mode & DRAM_READ:
            return int.from_bytes(self.ram.view[address - self.ram.base:
                                                address - self.ram.base + size], "little")
        if address >= self.rom_base:
            return self.bank.device.read(self.bank.size - (WINDOW_END - address), size)
        return (1 << (8 * size)) - 1  # nothing on the PCI bus here

    def write(self, offset: int, size: int, value: int) -> None:
        address = WINDOW_BASE + offset
        mode = self.mode(address)
        if mode & DRAM_WRITE:
            start = address - self.ram.base
            self.ram.view[start:start + size] = value.to_bytes(size, "little")
        elif address >= self.rom_base:  # flash commands through the ISA window
            self.bank.device.write(self.bank.size - (WINDOW_END - address), size, value)
