"""Wiring: guest memory and memslots, platform devices on their buses. Every object is
created and connected here by hand; nothing registers itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple
from collections.abc import Callable

from leanvm.devices import acpi_pm, fw_cfg as fw
from leanvm.devices.bus import Bus
from leanvm.devices.cmos import Cmos
from leanvm.devices.debug_exit import DebugExit
from leanvm.devices.debugcon import DEBUGCON_PORT, DebugCon
from leanvm.devices.fw_cfg import FwCfg
from leanvm.devices.i8042 import I8042
from leanvm.devices.pci import PciHost
from leanvm.devices.port92 import Port92
from leanvm.devices.probe import MMIO_SIZE as PROBE_MMIO_SIZE, PORT as PROBE_PORT
from leanvm.devices.probe import PORT_SIZE as PROBE_PORT_SIZE, ProbePort
from leanvm.devices.serial import Serial16550
from leanvm.kvm.vm import Vm
from leanvm.layout.region import MemoryMap
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

if TYPE_CHECKING:
    from leanvm.loader.fwcfg_kernel import FirmwareKernel

RAM_REGIONS = ("ram-low", "ram-high")

COM1_PORT, COM1_IRQ = 0x3F8, 4
KBD_IRQ = 1
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


class Slot(NamedTuple):
    number: int
    gpa: int
    size: int
    host_address: int
    readonly: bool


class Memslots:
    """Assigns KVM memslot numbers to guest regions and keeps them in step with the plan:
    a region may be unmapped and mapped again (flash leaving and entering read-array mode),
    and a group of slots may take over a window of a region mapped before it (the BIOS
    area, rebuilt from the PAM registers)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.next_slot = 0
        self.free: list[int] = []
        self.slots: dict[str, list[Slot]] = {}
        self.present: dict[str, bool] = {}

    def _create(self, gpa: int, size: int, host: int, readonly: bool) -> Slot:
        if self.free:
            number = self.free.pop()
        else:
            number, self.next_slot = self.next_slot, self.next_slot + 1
        slot = Slot(number, gpa, size, host, readonly)
        self.vm.set_memory_region(slot.number, gpa, size, host, readonly=readonly)
        return slot

    def _delete(self, slot: Slot) -> None:
        self.vm.set_memory_region(slot.number, slot.gpa, 0, slot.host_address)
        self.free.append(slot.number)

    def punch(self, gpa: int, size: int) -> list[tuple[str, Slot]]:
        """Take [gpa, gpa + size) out of every memslot mapped there (splitting them); returns
        what was taken out, for ``unpunch``."""
        end = gpa + size
        removed: list[tuple[str, Slot]] = []
        for owner, slots in self.slots.items():
            kept: list[Slot] = []
            for slot in slots:
                if slot.gpa >= end or slot.gpa + slot.size <= gpa:
                    kept.append(slot)
                    continue
                self._delete(slot)
                start, stop = max(slot.gpa, gpa), min(slot.gpa + slot.size, end)
                removed.append((owner, Slot(-1, start, stop - start,
                                            slot.host_address + start - slot.gpa, slot.readonly)))
                if slot.gpa < gpa:
                    kept.append(self._create(slot.gpa, gpa - slot.gpa, slot.host_address,
                                             slot.readonly))
                if slot.gpa + slot.size > end:
                    offset = end - slot.gpa
                    kept.append(self._create(end, slot.size - offset, slot.host_address + offset,
                                             slot.readonly))
            self.slots[owner] = kept
        return removed

    def unpunch(self, removed: list[tuple[str, Slot]]) -> None:
        """Map back what ``punch`` took out (as slots of their own)."""
        for owner, piece in removed:
            self.slots[owner].append(self._create(piece.gpa, piece.size, piece.host_address,
                                                  piece.readonly))

    def replace_group(self, name: str, pieces: list[tuple[int, int, int, bool]]) -> None:
        """Make ``name`` exactly these (gpa, size, host address, readonly) memslots."""
        old = {(s.gpa, s.size, s.host_address, s.readonly): s for s in self.slots.get(name, [])}
        new = set(pieces)
        keep = [slot for key, slot in old.items() if key in new]
        for key, slot in old.items():
            if key not in new:
                self._delete(slot)
        for piece in sorted(new - set(old)):
            keep.append(self._create(*piece))
        self.slots[name] = keep
        self.present[name] = True

    def add(self, region: GuestRegion) -> None:
        self.slots[region.name] = [self._create(region.base, region.size, region.mapping.address,
                                                region.readonly)]
        self.present[region.name] = True

    def set_present(self, name: str, present: bool) -> None:
        """Unmap (reads and writes then exit as MMIO) or map back a region's memslots."""
        if self.present.get(name) == present:
            return
        for slot in self.slots[name]:
            self.vm.set_memory_region(slot.number, slot.gpa, slot.size if present else 0,
                                      slot.host_address, readonly=slot.readonly)
        self.present[name] = present


class Platform(NamedTuple):
    pio: Bus
    mmio: Bus
    serial: Serial16550
    i8042: I8042
    debug_exit: DebugExit
    cmos: Cmos
    port92: Port92
    debugcon: DebugCon
    fw_cfg: FwCfg
    pci: PciHost
    probe: ProbePort
    acpi_pm: "acpi_pm.AcpiPm"


E820_RAM, E820_RESERVED = 1, 2


def build_platform(plan: MemoryMap, memory: GuestMemory, output: Callable[[bytes], None],
                   debug_output: Callable[[bytes], None],
                   irq_line: Callable[[int, bool], None], on_reset: Callable[[], None],
                   on_exit: Callable[[int], None], *,
                   on_poweroff: Callable[[], None] = lambda: None, cpus: int = 1) -> Platform:
    pio = Bus("pio", 0x10000)
    mmio = Bus("mmio", 1 << 52)
    serial = Serial16550(output, lambda level: irq_line(COM1_IRQ, level))
    i8042 = I8042(on_reset, lambda level: irq_line(KBD_IRQ, level))
    debug_exit = DebugExit(on_exit)
    low = plan.get("ram-low").size
    high = plan.get("ram-high").size if any(r.name == "ram-high" for r in plan.enabled()) else 0
    cmos = Cmos(low, high)
    port92 = Port92(on_reset)
    debugcon = DebugCon(debug_output)
    config = build_fw_cfg(plan, memory, cpus)
    pci = PciHost()
    pio.register(COM1_PORT, 8, serial, "com1")
    pio.register(I8042_PORT, 5, i8042, "i8042")
    pio.register(DEBUG_EXIT_PORT, 4, debug_exit, "debug-exit")
    pio.register(0x70, 2, cmos, "cmos")
    pio.register(0x92, 1, port92, "port92")
    pio.register(DEBUGCON_PORT, 1, debugcon, "debugcon")
    pio.register(fw.PORT_BASE, fw.PORT_SIZE, config, "fw_cfg")
    pio.register(0xCF8, 8, pci, "pci")
    probe = ProbePort()
    pio.register(PROBE_PORT, PROBE_PORT_SIZE, probe, "probe")
    mmio.register(probe_mmio_address(plan), PROBE_MMIO_SIZE, probe, "probe")
    power = acpi_pm.AcpiPm(on_poweroff, lambda level: irq_line(acpi_pm.SCI_IRQ, level))
    pio.register(acpi_pm.PORT_BASE, acpi_pm.PORT_SIZE, power, "acpi-pm")  # the FADT points here
    return Platform(pio, mmio, serial, i8042, debug_exit, cmos, port92, debugcon, config, pci,
                    probe, power)


def probe_mmio_address(plan: MemoryMap) -> int:
    """The probe port's MMIO twin: the last 4 KiB slot of the platform-device window (the
    first slots are for devices users and virtio add)."""
    window = plan.get("platform")
    return window.base + window.size - 0x1000


def build_fw_cfg(plan: MemoryMap, memory: GuestMemory, cpus: int = 1) -> FwCfg:
    """What firmware asks fw_cfg for: RAM size, CPU counts, the e820 map."""
    import struct

    config = FwCfg(memory)
    config.add_u64(fw.RAM_SIZE, memory.ram_size)
    config.add(fw.NB_CPUS, struct.pack("<H", cpus))
    config.add(fw.MAX_CPUS, struct.pack("<H", cpus))
    entries = [(r.base, r.size, E820_RAM) for r in plan.enabled() if r.name.startswith("ram")]
    private = plan.get("kvm-private")
    if private.enabled:
        entries.append((private.base, private.size, E820_RESERVED))
    config.add_file("etc/e820", b"".join(struct.pack("<QQI", *e) for e in sorted(entries)))
    from leanvm.firmware.smbios import smbios_tables

    anchor, tables = smbios_tables()
    config.add_file("etc/smbios/smbios-anchor", anchor)
    config.add_file("etc/smbios/smbios-tables", tables)
    return config


LINUXBOOT_ROM = "linuxboot_dma.bin"


def add_firmware_kernel(config: FwCfg, kernel: "FirmwareKernel", option_rom: bytes) -> None:
    """The fw_cfg items QEMU's x86 loader provides for -kernel/-initrd/-append, plus the
    option ROM that SeaBIOS runs to load them ("genroms/linuxboot_dma.bin", first in
    "bootorder"). qboot reads the same items itself."""
    config.add_u32(fw.SETUP_ADDR, kernel.setup_addr)
    config.add_u32(fw.SETUP_SIZE, len(kernel.setup))
    config.add(fw.SETUP_DATA, kernel.setup)
    config.add_u32(fw.KERNEL_ADDR, kernel.kernel_addr)
    config.add_u32(fw.KERNEL_SIZE, len(kernel.kernel))
    config.add(fw.KERNEL_DATA, kernel.kernel)
    config.add_u32(fw.CMDLINE_ADDR, kernel.cmdline_addr)
    config.add_u32(fw.CMDLINE_SIZE, len(kernel.cmdline))
    config.add(fw.CMDLINE_DATA, kernel.cmdline)
    config.add_u32(fw.INITRD_ADDR, kernel.initrd_addr)
    config.add_u32(fw.INITRD_SIZE, len(kernel.initrd))
    config.add(fw.INITRD_DATA, kernel.initrd if isinstance(kernel.initrd, memoryview)
               else memoryview(kernel.initrd))
    name = "genroms/" + LINUXBOOT_ROM
    config.add_file(name, option_rom)
    config.add_file("bootorder", f"/rom@{name}".encode() + b"\0")
