"""Wiring: guest memory and memslots, platform devices on their buses. Every object is
created and connected here by hand; nothing registers itself."""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

from leanvm.devices.bus import Bus
from leanvm.devices.debug_exit import DebugExit
from leanvm.devices.i8042 import I8042
from leanvm.devices.serial import Serial16550
from leanvm.kvm.vm import Vm
from leanvm.layout.region import MemoryMap
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

RAM_REGIONS = ("ram-low", "ram-high")

COM1_PORT, COM1_IRQ = 0x3F8, 4
I8042_PORT = 0x60
DEBUG_EXIT_PORT = 0xF4


def build_ram(plan: MemoryMap) -> GuestMemory:
    """Anonymous RAM for each RAM region of the plan, exactly where the plan puts it."""
    memory = GuestMemory()
    for region in plan.regions:
        if region.name in RAM_REGIONS and region.enabled:
            memory.add(GuestRegion(region.name, region.base, map_anonymous(region.size),
                                   RegionKind.RAM))
    return memory


def setup_kvm_private(vm: Vm, plan: MemoryMap) -> None:
    """KVM on Intel needs an identity-map page and a three-page TSS for real mode, in
    guest-physical space that is not RAM: the plan's kvm-private region holds both."""
    region = plan.get("kvm-private")
    if region.enabled:
        vm.set_identity_map_addr(region.base)
        vm.set_tss_addr(region.base + 0x1000)


class Memslots:
    """Assigns KVM memslot numbers to guest regions."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.next_slot = 0
        self.slots: dict[str, int] = {}

    def add(self, region: GuestRegion) -> int:
        slot = self.next_slot
        self.next_slot += 1
        self.vm.set_memory_region(slot, region.base, region.size, region.mapping.address,
                                  readonly=region.readonly)
        self.slots[region.name] = slot
        return slot


class Platform(NamedTuple):
    pio: Bus
    mmio: Bus
    serial: Serial16550
    i8042: I8042
    debug_exit: DebugExit


def build_platform(output: Callable[[bytes], None], irq_line: Callable[[int, bool], None],
                   on_reset: Callable[[], None], on_exit: Callable[[int], None]) -> Platform:
    pio = Bus("pio", 0x10000)
    mmio = Bus("mmio", 1 << 52)
    serial = Serial16550(output, lambda level: irq_line(COM1_IRQ, level))
    i8042 = I8042(on_reset)
    debug_exit = DebugExit(on_exit)
    pio.register(COM1_PORT, 8, serial, "com1")
    pio.register(I8042_PORT, 5, i8042, "i8042")
    pio.register(DEBUG_EXIT_PORT, 4, debug_exit, "debug-exit")
    return Platform(pio, mmio, serial, i8042, debug_exit)
