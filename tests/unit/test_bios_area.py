"""PAM modes become the right memslot pieces over RAM and flash (no KVM: memslots faked)."""

from __future__ import annotations

from types import SimpleNamespace

from leanvm.machine.legacy import BiosArea
from leanvm.memory.guest import GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

KiB = 1 << 10


class FakeMemslots:
    def __init__(self) -> None:
        self.groups: dict[str, list[tuple[int, int, int, bool]]] = {}
        self.punched: list[tuple[int, int]] = []

    def punch(self, gpa: int, size: int) -> None:
        self.punched.append((gpa, size))

    def replace_group(self, name: str, pieces: list[tuple[int, int, int, bool]]) -> None:
        self.groups[name] = sorted(pieces)


def make():
    ram = GuestRegion("ram-low", 0, map_anonymous(2 << 20), RegionKind.RAM)
    flash_map = map_anonymous(256 * KiB)
    device = SimpleNamespace(romd=True, writes=[], read=lambda o, s: 0xAB,
                             write=lambda o, s, v: device.writes.append((o, v)))
    bank = SimpleNamespace(size=256 * KiB, region=SimpleNamespace(mapping=flash_map), device=device)
    slots = FakeMemslots()
    return BiosArea(slots, ram, bank), slots, ram, bank


def test_reset_state_shows_the_flash_top_at_e0000() -> None:
    area, slots, ram, bank = make()
    assert slots.punched == [(0xC0000, 0x40000)]
    top = bank.region.mapping.address + bank.size
    assert slots.groups["bios-area"] == [(0xE0000, 0x20000, top - 0x20000, True)]
    assert area.read(0x0, 1) == 0xFF  # 0xC0000: nothing there with DRAM off


def test_shadowing_sequence() -> None:
    area, slots, ram, bank = make()
    ram_at = ram.mapping.address
    area.set_pam(0x59, 0x30)  # F0000-FFFFF read/write DRAM
    pieces = slots.groups["bios-area"]
    assert (0xF0000, 0x10000, ram_at + 0xF0000, False) in pieces
    assert (0xE0000, 0x10000, bank.region.mapping.address + bank.size - 0x20000, True) in pieces
    area.set_pam(0x59, 0x10)  # read-only DRAM: the copy is write-protected
    assert (0xF0000, 0x10000, ram_at + 0xF0000, True) in slots.groups["bios-area"]
    area.write(0x30000, 1, 0x55)  # a write to read-only DRAM is dropped
    assert ram.view[0xF0000] == 0


def test_write_only_dram_and_flash_commands_through_the_window() -> None:
    area, slots, ram, bank = make()
    area.set_pam(0x5F, 0x22)  # E8000-EFFFF write-only DRAM: reads still from ROM
    area.write(0x28000, 1, 0x66)  # 0xE8000
    assert ram.view[0xE8000] == 0x66
    assert area.read(0x28000, 1) == 0xAB  # from the flash
    area.write(0x20000, 1, 0x98)  # 0xE0000 with DRAM off: a flash command
    assert bank.device.writes == [(bank.size - 0x20000, 0x98)]
    bank.device.romd = False
    area.refresh()
    assert all(not (p[0] >= 0xE0000 and p[3]) or p[2] - ram.mapping.address == p[0]
               for p in slots.groups["bios-area"])  # the flash is unmapped while in commands


def test_odd_sized_accesses_through_the_bus_reach_ram_and_flash_intact() -> None:
    """Every size from 1 to 8 (KVM's pieces of a page-straddling access) reaches write-only
    DRAM, read-only DRAM and the flash alias byte for byte."""
    from leanvm.devices.bus import Bus
    from leanvm.machine.legacy import WINDOW_BASE, WINDOW_END

    ram = GuestRegion("ram-low", 0, map_anonymous(2 << 20), RegionKind.RAM)
    flash = bytearray(range(256)) * 1024  # 256 KiB whose bytes say where they are

    class Flash:
        romd = True

        def read(self, offset: int, size: int) -> int:
            assert size in (1, 2, 4, 8)
            return int.from_bytes(flash[offset:offset + size], "little")

        def write(self, offset: int, size: int, value: int) -> None:
            assert size in (1, 2, 4, 8)

    bank = SimpleNamespace(size=len(flash), region=SimpleNamespace(mapping=map_anonymous(len(flash))),
                           device=Flash())
    area = BiosArea(FakeMemslots(), ram, bank)
    bus = Bus("mmio", 1 << 32)
    bus.register(WINDOW_BASE, WINDOW_END - WINDOW_BASE, area, "bios-area")
    area.set_pam(0x5F, 0x22)  # E8000-EFFFF write-only DRAM: reads come from the flash
    for size in range(1, 9):
        address = 0xE8000 + 0x10 * size + 1
        bus.write(address, size, int.from_bytes(bytes([0xA0 + size]) * size, "little"))
        assert bytes(ram.view[address:address + size]) == bytes([0xA0 + size]) * size
        flash_at = len(flash) - (WINDOW_END - address)
        assert bus.read(address, size) == int.from_bytes(flash[flash_at:flash_at + size], "little")
    area.set_pam(0x5F, 0x11)  # now read-only DRAM: reads see what was written
    for size in range(1, 9):
        address = 0xE8000 + 0x10 * size + 1
        assert bus.read(address, size) == int.from_bytes(bytes([0xA0 + size]) * size, "little")
    assert bus.unclaimed_reads == bus.unclaimed_writes == 0
