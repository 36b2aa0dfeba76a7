"""The kernel-entry trap: memslots taken out and put back, data accesses served from RAM,
and only a fault inside the trapped page counts as the entry."""

from __future__ import annotations

from fake_vm import FakeVm
from leanvm.machine.memory_manager import Memslots
from leanvm.machine.entry_trap import EntryTrap, RamWindow
from leanvm.devices.bus import Bus
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

MiB = 1 << 20


def setup():
    memory = GuestMemory()
    region = memory.add(GuestRegion("ram-low", 0, map_anonymous(2 * MiB), RegionKind.RAM))
    vm = FakeVm()
    slots = Memslots(vm)  # type: ignore[arg-type]
    slots.add(region)
    mmio = Bus("mmio", 1 << 40)
    trap = EntryTrap(0x10200, memory, slots.punch, slots.unpunch,
                     lambda base, size, window: mmio.register(base, size, window, "trap"),
                     mmio.unregister)
    return memory, region, vm, mmio, trap


def test_arming_unmaps_exactly_the_entry_page_and_serves_it_as_mmio() -> None:
    memory, region, vm, mmio, trap = setup()
    host = region.mapping.address
    trap.arm()
    assert vm.mapped(0x10000) is None and vm.mapped(0x10FFF) is None
    assert vm.mapped(0xFFFF) == host + 0xFFFF and vm.mapped(0x11000) == host + 0x11000
    mmio.write(0x10228, 4, 0x20000)  # the guest patching the header while the page is out
    assert memory.read_int(0x10228, 4) == 0x20000 and mmio.read(0x10228, 4) == 0x20000
    assert not trap.on_fault(0x20000, 0x2000, 0)  # a fault elsewhere is not the entry
    assert trap.armed and trap.hit is None
    assert trap.on_fault(0x10200, 0x1020, 0)
    assert trap.hit is not None and (trap.hit.address, trap.hit.cs, trap.hit.rip) == (0x10200, 0x1020, 0)
    assert not trap.armed and vm.mapped(0x10200) == host + 0x10200
    assert mmio.lookup(0x10200) is None
    assert sorted(vm.slots.values()) == [(0, 0x10000, host, False), (0x10000, 0x1000, host + 0x10000, False),
                                         (0x11000, 2 * MiB - 0x11000, host + 0x11000, False)]
    trap.arm()  # once hit, the trap stays off
    assert not trap.armed


def test_unarmed_trap_ignores_faults() -> None:
    *_, trap = setup()
    assert not trap.on_fault(0x10200, 0x1020, 0) and trap.hit is None


def test_ram_window_is_bounds_checked_by_guest_memory() -> None:
    memory, *_ = setup()
    window = RamWindow(memory, 2 * MiB - 2)
    import pytest
    from leanvm.errors import GuestError

    with pytest.raises(GuestError):
        window.read(0, 4)


def test_odd_sized_pieces_of_a_page_straddling_access_reach_ram_intact() -> None:
    """KVM splits an access that straddles the trapped page's edge: the part inside the page
    arrives as MMIO of any size from 1 to 8 (3, 5, 6, 7 bytes too) and must reach RAM."""
    memory, region, vm, mmio, trap = setup()
    trap.arm()
    page = trap.page
    memory.write(page - 8, bytes(range(0x40, 0x50)))  # 8 bytes before the page, 8 in it
    mmio.write(page, 3, 0xC3C2C1)  # the last 3 bytes of an 8-byte store from page - 5
    assert memory.read(page - 1, 5) == bytes([0x47, 0xC1, 0xC2, 0xC3, 0x4B])
    assert mmio.read(page, 5) == int.from_bytes(bytes([0xC1, 0xC2, 0xC3, 0x4B, 0x4C]), "little")
    memory.write(page + 0xFF8, bytes(range(0x60, 0x68)))
    for size in range(1, 9):  # the part of a load that starts inside and runs past the end
        expected = int.from_bytes(bytes(range(0x60, 0x68))[8 - size:], "little")
        assert mmio.read(page + 0x1000 - size, size) == expected
    mmio.write(page + 0x101, 7, 0x77665544332211)
    assert memory.read(page + 0x100, 9) == bytes.fromhex("00112233445566" "7700")
    mmio.write(page + 0x202, 6, 0xFFEEDDCCBBAA)
    assert memory.read(page + 0x202, 6) == bytes.fromhex("aabbccddeeff")
    assert mmio.unclaimed_reads == mmio.unclaimed_writes == 0
