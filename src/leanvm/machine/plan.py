"""The memory map a machine uses, flash banks included: one function, shared by `leanvm run`
and `leanvm memmap`, so that what memmap prints is what run builds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanvm.layout.region import MemoryMap
from leanvm.layout.x86 import plan_x86_layout
from leanvm.machine.config import MachineConfig

if TYPE_CHECKING:
    from leanvm.layout.flash import PlacedBank
    from leanvm.machine.flash import FlashSpec


class MachinePlan:
    """The memory map (with a region per flash bank), the banks placed (bank 0 first) and
    what each holds (a --bios image is bank 0). A slotted class, not a NamedTuple: it is
    made on every start, and NamedTuple classes cost start-up time to create."""

    __slots__ = ("memory_map", "flash", "flash_specs")

    def __init__(self, memory_map: MemoryMap, flash: "tuple[PlacedBank, ...]",
                 flash_specs: "tuple[FlashSpec, ...]") -> None:
        self.memory_map = memory_map
        self.flash = flash
        self.flash_specs = flash_specs


def plan_machine(config: MachineConfig, cpu_pa_bits: int) -> MachinePlan:
    """The x86 plan for ``config``; physical address bits from the config, else the vCPU's.
    Reads the flash images' sizes (errors name the file)."""
    memory_map = plan_x86_layout(config.memory, maxmem=config.maxmem, slots=config.slots,
                                 pa_bits=config.pa_bits or cpu_pa_bits, machine=config.machine,
                                 settings=dict(config.layout))
    if config.virtio_mem:  # each region inside device-memory, as flash banks in their window
        from leanvm.layout.region import Region, RegionRole
        from leanvm.machine.virtio import place_virtio_mem

        memory_map = memory_map.with_regions(tuple(
            Region(p.spec.name, p.base, p.spec.size, role=RegionRole.HOTPLUG)
            for p in place_virtio_mem(config.virtio_mem, memory_map)))
    specs = config.flash_banks
    if not specs:
        return MachinePlan(memory_map, (), ())
    from leanvm.layout.flash import place_flash
    from leanvm.machine.flash import bank_requests

    placed = place_flash(bank_requests(specs), memory_map, config.max_fw_size)
    memory_map = memory_map.with_regions(tuple(bank.region for bank in placed))
    return MachinePlan(memory_map, placed, specs)


def plan_for(config: MachineConfig, cpu_pa_bits: int) -> MemoryMap:
    """The memory map alone (what `leanvm memmap` prints)."""
    return plan_machine(config, cpu_pa_bits).memory_map


def host_pa_bits(kvm_path: str = "/dev/kvm") -> int | None:
    """Physical address bits KVM offers guests here (CPUID 0x80000008), or None without KVM."""
    from leanvm.errors import KvmError
    from leanvm.kvm.system import Kvm

    try:
        with Kvm(kvm_path) as kvm:
            return kvm.supported_cpuid().phys_addr_bits()
    except KvmError:
        return None
