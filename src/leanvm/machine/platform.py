"""The platform table: every port range, MMIO window and IRQ line of leanvm's x86 machine,
written down once, each with the specification it follows; and the platform devices built
from it. Devices know only offsets within their own range; where they live is decided here,
and `leanvm memmap` and the ACPI tables read it from here too."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from leanvm.devices import acpi_pm, fw_cfg as fw
from leanvm.devices.bus import Bus
from leanvm.devices.cmos import Cmos
from leanvm.devices.debug_exit import DebugExit
from leanvm.devices.debugcon import DebugCon
from leanvm.devices.fw_cfg import FwCfg, Transfer
from leanvm.devices.i8042 import I8042
from leanvm.devices.pci import PciHost
from leanvm.devices.port92 import Port92
from leanvm.devices.probe import MMIO_SIZE as PROBE_MMIO_SIZE, ProbePort
from leanvm.devices.serial import Serial16550
from leanvm.layout.region import MemoryMap, RegionRole
from leanvm.memory.guest import GuestMemory

if TYPE_CHECKING:
    from leanvm.loader.fwcfg_kernel import FirmwareKernel


class PortRange:
    """One row of the port table. (Rows are slotted classes, not NamedTuples: this module
    loads on every start, and NamedTuple classes cost start-up time to create.)"""

    __slots__ = ("name", "base", "size", "irq", "spec")

    def __init__(self, name: str, base: int, size: int, irq: int | None, spec: str) -> None:
        self.name = name
        self.base = base
        self.size = size
        self.irq = irq  # ISA IRQ line (the in-kernel IOAPIC routes it to the same GSI)
        self.spec = spec


# Ports, lowest first. The only place a port number or IRQ is written.
PORTS: tuple[PortRange, ...] = (
    PortRange("i8042", 0x60, 5, 1, "IBM PC/AT 8042 keyboard controller: data 0x60, "
              "status/command 0x64; keyboard IRQ 1"),
    PortRange("cmos", 0x70, 2, None, "MC146818 RTC and CMOS RAM: index 0x70, data 0x71"),
    PortRange("port92", 0x92, 1, None, "PS/2 system control port A (fast A20 gate, reset)"),
    PortRange("debug-exit", 0xF4, 4, None, "where QEMU's isa-debug-exit usually sits: a "
              "write ends the VM with that status"),
    PortRange("com1", 0x3F8, 8, 4, "16550A UART at the PC's COM1 address, IRQ 4"),
    PortRange("debugcon", 0x402, 1, None, "Bochs/QEMU debug console, where SeaBIOS prints "
              "its debug output"),
    PortRange("probe", 0x404, 8, None, "leanvm boot probes (docs/tracing.md), at the port of "
              "the 2011 QEMU boot-timeline patches"),
    PortRange("fw_cfg", 0x510, 12, None, "QEMU fw_cfg: selector 0x510, data 0x511, DMA "
              "address 0x514 (QEMU docs/specs/fw_cfg.rst)"),
    PortRange("acpi-pm", 0x600, acpi_pm.PORT_SIZE, 9, "ACPI fixed hardware: PM1a event, "
              "PM1a control, PM timer (ACPI 6.x section 4.8); the FADT points here; SCI "
              "IRQ 9"),
    PortRange("pci", 0xCF8, 8, None, "PCI configuration mechanism #1: address 0xCF8, data "
              "0xCFC (PCI Local Bus 3.0, 3.2.2.3.2)"),
)
PORT = {row.name: row for row in PORTS}
# Port writes KVM may queue (coalesced I/O) instead of exiting, as (device, offset, size):
# writes that return nothing and that no guest waits on before its next exit. The 16550's
# transmit holding register (with DLAB set: the divisor latch's low byte) is half the
# exits of a serial console; a guest that polls the line status register after each byte
# exits there, and the queue is emptied first, in order.
COALESCED_PORTS: tuple[tuple[str, int, int], ...] = (("com1", 0, 1),)
IRQ = {row.name: row.irq for row in PORTS if row.irq is not None}


class MmioWindow:
    """One row of the MMIO table."""

    __slots__ = ("name", "region", "offset", "size", "spec")

    def __init__(self, name: str, region: str, offset: int, size: int, spec: str) -> None:
        self.name = name
        self.region = region  # the memory-map region it lies in ("" for a fixed address)
        self.offset = offset  # from that region's base (negative: from its end), or the address
        self.size = size
        self.spec = spec


MMIO: tuple[MmioWindow, ...] = (
    MmioWindow("bios-area", "", 0xC0000, 0x40000, "the PC BIOS area 0xC0000-0xFFFFF as "
               "the i440FX PAM registers shape it (machine/legacy.py)"),
    MmioWindow("virtio", "platform", 0, 0x8000, "virtio-mmio devices (virtio 1.2, 4.2), "
               "device n in the n-th 4 KiB slot on the n-th of VIRTIO_IRQS; in the DSDT as "
               "LNRO0005 (machine/virtio.py)"),
    MmioWindow("probe", "platform", -0x1000, PROBE_MMIO_SIZE, "the boot probes' MMIO twin, "
               "in the platform window's last 4 KiB slot (the first slots are for devices "
               "users and virtio add)"),
)
WINDOW = {row.name: row for row in MMIO}
# The virtio devices' ISA IRQs, in slot order: lines no row of PORTS uses, and not 2
# (cascade), 3 (COM2, which Linux's 8250 driver may claim), 8 (RTC) or 12 (PS/2 mouse).
VIRTIO_IRQS = (5, 6, 7, 10, 11, 13, 14, 15)


def mmio_address(name: str, plan: MemoryMap) -> int:
    """Where the MMIO window ``name`` is in ``plan``."""
    row = WINDOW[name]
    if not row.region:
        return row.offset
    region = plan.get(row.region)
    return (region.end if row.offset < 0 else region.base) + row.offset


class Listeners:
    """One event, several consumers (called in the order they were added)."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: list[Callable[..., None]] = []

    def add(self, call: Callable[..., None]) -> None:
        self._calls.append(call)

    def __call__(self, *args: Any) -> None:
        for call in self._calls:
            call(*args)


class Hooks:
    """What the platform's devices report to the machine that owns them, and the line
    they raise interrupts on (the VM's, once it exists)."""

    __slots__ = ("serial_output", "debug_output", "irq_line", "on_reset", "on_exit",
                 "on_poweroff", "on_probe")

    def __init__(self, serial_output: Callable[[bytes], None],
                 debug_output: Callable[[bytes], None], irq_line: Callable[[int, bool], None],
                 on_reset: Callable[[], None], on_exit: Callable[[int], None],
                 on_poweroff: Callable[[], None],
                 on_probe: Callable[[int, tuple[int, ...]], None] | None = None) -> None:
        self.serial_output, self.debug_output, self.irq_line = serial_output, debug_output, irq_line
        self.on_reset, self.on_exit, self.on_poweroff = on_reset, on_exit, on_poweroff
        self.on_probe = on_probe  # tracing only

    def with_irq_line(self, irq_line: Callable[[int, bool], None]) -> "Hooks":
        return Hooks(self.serial_output, self.debug_output, irq_line, self.on_reset,
                     self.on_exit, self.on_poweroff, self.on_probe)


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
    acpi_pm: acpi_pm.AcpiPm
    fw_cfg_transfers: Listeners  # consumers of fw_cfg transfers (timeline, kernel-entry trap)
    pam_writes: Listeners  # consumers of the i440FX's PAM register writes (the BIOS area)
    uart_tx_interrupts: Listeners  # COM1's transmit interrupt turned on (True) or off


def build_platform(plan: MemoryMap, memory: GuestMemory, hooks: Hooks, cpus: int = 1
                   ) -> Platform:
    """The devices of the table, each on its bus with its IRQ."""
    def line(name: str) -> Callable[[bool], None]:
        irq = IRQ[name]
        return lambda level: hooks.irq_line(irq, level)

    pio = Bus("pio", 0x10000)
    mmio = Bus("mmio", 1 << 52)
    transfers, pam_writes, tx_interrupts = Listeners(), Listeners(), Listeners()
    low = sum(r.size for r in plan.ram() if r.base < 1 << 32)
    high = sum(r.size for r in plan.ram() if r.base >= 1 << 32)
    probe = ProbePort(hooks.on_probe)
    devices = {
        "i8042": I8042(hooks.on_reset, line("i8042")),
        "cmos": Cmos(low, high),
        "port92": Port92(hooks.on_reset),
        "debug-exit": DebugExit(hooks.on_exit),
        "com1": Serial16550(hooks.serial_output, line("com1"), tx_interrupts),
        "debugcon": DebugCon(hooks.debug_output),
        "probe": probe,
        "fw_cfg": firmware_config(plan, memory, cpus, transfers),
        "acpi-pm": acpi_pm.AcpiPm(hooks.on_poweroff, line("acpi-pm")),
        "pci": PciHost(on_pam=pam_writes),
    }
    for row in PORTS:
        pio.register(row.base, row.size, devices[row.name], row.name)
    mmio.register(mmio_address("probe", plan), PROBE_MMIO_SIZE, probe, "probe")
    return Platform(pio, mmio, devices["com1"], devices["i8042"], devices["debug-exit"],
                    devices["cmos"], devices["port92"], devices["debugcon"], devices["fw_cfg"],
                    devices["pci"], probe, devices["acpi-pm"], transfers, pam_writes,
                    tx_interrupts)


E820_RAM, E820_RESERVED = 1, 2


class ConsoleQueue:
    """Whether KVM queues the console's transmit writes (COALESCED_PORTS), following the
    guest: a polled console (transmit interrupt off, as Linux's printk writes) is queued; a
    guest that turns the transmit interrupt on waits for it after each burst, so its writes
    must exit at once, and the zones are taken back until it turns it off again. The switch
    comes on the IER write's own exit, after the queue before it was emptied."""

    def __init__(self, vm: Any) -> None:
        self._vm = vm
        self.queued = False
        self.switches = 0

    def set(self, queued: bool) -> None:
        if queued == self.queued:
            return
        for name, offset, size in COALESCED_PORTS:
            self._vm.coalesce(PORT[name].base + offset, size, pio=True, remove=not queued)
        self.queued = queued
        self.switches += 1


def coalesce_ports(vm: Any, platform: "Platform") -> "ConsoleQueue | None":
    """Queue COALESCED_PORTS' writes in KVM where it can (None where it cannot), switched
    off while the guest uses the UART's transmit interrupt."""
    from leanvm.abi.kvm import KVM_CAP_COALESCED_PIO

    if not vm.coalesced_ring_offset() or not vm.kvm.check_extension(KVM_CAP_COALESCED_PIO):
        return None
    queue = ConsoleQueue(vm)
    queue.set(True)
    platform.uart_tx_interrupts.add(lambda on: queue.set(not on))
    return queue


def memory_ranges(plan: MemoryMap) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(RAM, reserved) guest-physical ranges as (base, size): what firmware's e820 map and a
    direct boot's both start from. Reserved: KVM's private pages (real-mode TSS and
    identity map on Intel)."""
    ram = [(r.base, r.size) for r in plan.ram()]
    reserved = [(r.base, r.size) for r in plan.enabled() if r.role is RegionRole.KVM_PRIVATE]
    return ram, reserved


def firmware_config(plan: MemoryMap, memory: GuestMemory, cpus: int,
                    on_transfer: Callable[[Transfer], None] | None = None) -> FwCfg:
    """What firmware asks fw_cfg for: RAM size, CPU counts, the e820 map, SMBIOS tables."""
    from leanvm.firmware.smbios import smbios_tables

    config = FwCfg(memory, on_transfer)
    config.add_u64(fw.RAM_SIZE, memory.ram_size)
    config.add(fw.NB_CPUS, struct.pack("<H", cpus))
    config.add(fw.MAX_CPUS, struct.pack("<H", cpus))
    ram, reserved = memory_ranges(plan)
    entries = [(base, size, E820_RAM) for base, size in ram]
    entries += [(base, size, E820_RESERVED) for base, size in reserved]
    config.add_file("etc/e820", b"".join(struct.pack("<QQI", *e) for e in sorted(entries)))
    anchor, tables = smbios_tables()
    config.add_file("etc/smbios/smbios-anchor", anchor)
    config.add_file("etc/smbios/smbios-tables", tables)
    # QEMU's vmcoreinfo device: Linux's qemu_fw_cfg driver writes where its VMCOREINFO note
    # is (dumps read it from there, machine/dump.py): le16 host_format (1: ELF note),
    # le16 guest_format, le32 size, le64 guest-physical address
    config.add_file(fw.VMCOREINFO_FILE, struct.pack("<HHIQ", fw.VMCOREINFO_FORMAT_ELF, 0, 0, 0),
                    writable=True)
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


def describe(plan: MemoryMap) -> list[tuple[str, str, str, str]]:
    """Rows (kind, name, where, spec) of the table for ``plan``, for people (`leanvm memmap
    --platform`)."""
    rows = []
    for row in PORTS:
        irq = f", IRQ {row.irq}" if row.irq is not None else ""
        rows.append(("port", row.name, f"{row.base:#x}-{row.base + row.size - 1:#x}{irq}",
                     row.spec))
    for window in MMIO:
        base = mmio_address(window.name, plan)
        rows.append(("mmio", window.name, f"{base:#x}-{base + window.size - 1:#x}",
                     window.spec))
    return rows
