"""The firmware side of a VM: flash banks and the BIOS area they show through (recipe step
5), and, for firmware booting Linux, the kernel served through fw_cfg with a trap that
catches the firmware entering it (step 6 of the firmware boot path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leanvm.machine.platform import WINDOW, Listeners, Platform, add_firmware_kernel

if TYPE_CHECKING:
    from leanvm.layout.region import MemoryMap
    from leanvm.loader.fwcfg_kernel import FirmwareKernel
    from leanvm.machine.config import MachineConfig
    from leanvm.machine.entry_trap import EntryTrap
    from leanvm.machine.flash import FlashBank
    from leanvm.machine.legacy import BiosArea
    from leanvm.machine.memory_manager import MemoryManager
    from leanvm.machine.plan import MachinePlan


def build_flash(planned: "MachinePlan", memory: "MemoryManager", platform: Platform,
                keep: Callable[[Any], Any]) -> "tuple[list[FlashBank], BiosArea | None]":
    """The banks the plan placed, and for a pc bank 0 the BIOS area (0xC0000-0xFFFFF) that
    shows its last 128 KiB; the PAM registers reshape that area."""
    if not planned.flash:
        return [], None
    from leanvm.machine.flash import build_banks

    bank0_romd = Listeners()
    banks = build_banks(planned.flash_specs, planned.flash, memory, platform.mmio, bank0_romd)
    for bank in banks:
        keep(bank)
    if banks[0].geometry.name != "pc":
        return banks, None
    from leanvm.machine.legacy import BiosArea

    window = WINDOW["bios-area"]
    area = BiosArea(memory, memory.memory.find(window.offset, window.size), banks[0])
    bank0_romd.add(lambda on: area.refresh())
    platform.pam_writes.add(area.set_pam)
    platform.mmio.register(window.offset, window.size, area, window.name)
    return banks, area


def serve_kernel(config: "MachineConfig", plan: "MemoryMap", memory: "MemoryManager",
                 platform: Platform, kernel: Any, initrd: Any, cmdline: str
                 ) -> "tuple[FirmwareKernel, EntryTrap]":
    """Hand the kernel, initrd and command line to the firmware through fw_cfg, at QEMU's
    addresses, with QEMU's linuxboot_dma option ROM; arm the entry trap once the firmware
    has read the setup block."""
    from leanvm.devices.fw_cfg import SETUP_DATA
    from leanvm.firmware.roms import find_rom
    from leanvm.loader.fwcfg_kernel import plan_firmware_kernel
    from leanvm.machine.entry_trap import EntryTrap
    from leanvm.machine.platform import LINUXBOOT_ROM

    planned = plan_firmware_kernel(memoryview(kernel), str(config.kernel), initrd,
                                   str(config.initrd), cmdline, plan.low_ram().size)
    add_firmware_kernel(platform.fw_cfg, planned, find_rom(LINUXBOOT_ROM).read_bytes())
    mmio = platform.mmio
    trap = EntryTrap(planned.entry, memory.memory, memory.punch, memory.unpunch,
                     lambda base, size, window: mmio.register(base, size, window,
                                                              "kernel-entry-trap"),
                     mmio.unregister)
    platform.fw_cfg_transfers.add(
        lambda transfer: trap.arm() if transfer.key == SETUP_DATA else None)
    return planned, trap
