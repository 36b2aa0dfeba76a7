"""virtio-mmio devices in a VM: where each lives, how it is wired to KVM, and the handles the
Python API gives (``Machine.virtio_mem``).

Windows: virtio device n sits in slot n of the platform region (platform base + n * 4 KiB,
WINDOW_SIZE bytes) and interrupts on the n-th of VIRTIO_IRQS (machine/platform.py), ISA lines
no platform device uses
(edge-triggered, active high, as ISA lines are by default). ISA lines rather than IOAPIC pins
16-23 because Linux maps only the ISA lines to interrupts without ACPI: a
``virtio_mmio.device=SIZE@BASE:IRQ`` parameter naming GSI 16 fails its request_irq with
EINVAL (seen with the minimal kernel), while IRQ 5 works both ways, as QEMU's microvm has it.
Linux finds the devices through the DSDT (``_HID "LNRO0005"``, firmware/acpi.py) or, with
discovery "cmdline", through those parameters, which leanvm then adds to the command line.

KVM wiring, where the host has it: the driver's QueueNotify writes signal an eventfd
(KVM_IOEVENTFD, with the queue index as datamatch) that the I/O thread (machine/
virtio_io.py) waits on, so a notification costs no exit; the device's interrupts are an
eventfd too (KVM_IRQFD), written from whichever thread answers. Without them, QueueNotify
arrives as an MMIO exit and interrupts are an edge on KVM_IRQ_LINE.

virtio-mem regions are placed in the device-memory region the memory map reserves after RAM
(``-m SIZE,maxmem=MAX``), each aligned to Linux's x86 memory block (128 MiB) and checked to
fit. Each is anonymous memory reserved without backing (2 MiB aligned and advised
MADV_HUGEPAGE, so a plugged block is one transparent huge page), mapped by one memslot, with a
discard manager that starts all discarded: only what the guest plugs and touches costs host
memory, and what it unplugs is given back at once (memory/host.py ReleasePages).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from leanvm.errors import ConfigError

if TYPE_CHECKING:
    from leanvm.devices.virtio.mem import VirtioMem
    from leanvm.devices.virtio.mmio import MmioTransport
    from leanvm.kvm.vm import Vm
    from leanvm.layout.region import MemoryMap
    from leanvm.machine.config import MachineConfig, VirtioMemSpec
    from leanvm.machine.memory_manager import MemoryManager
    from leanvm.machine.platform import Platform
    from leanvm.memory.guest import GuestRegion

SLOT_SIZE = 0x1000
LINUX_BLOCK = 128 << 20  # x86 Linux's memory block: hotplugged memory comes in these
DISCOVERY = ("acpi", "cmdline")


class Window(NamedTuple):
    name: str
    base: int
    size: int
    gsi: int


def windows(config: "MachineConfig", plan: "MemoryMap") -> list[Window]:
    """The virtio-mmio windows ``config`` asks for, in slot order."""
    from leanvm.devices.virtio.mmio import WINDOW_SIZE
    from leanvm.machine.platform import VIRTIO_IRQS, mmio_address

    if not config.virtio_mem:
        return []
    if len(config.virtio_mem) > len(VIRTIO_IRQS):
        raise ConfigError(f"{len(config.virtio_mem)} virtio devices: at most "
                          f"{len(VIRTIO_IRQS)}")
    if not plan.get("platform").enabled:
        raise ConfigError("virtio devices live in the platform region: leave platform=on")
    base = mmio_address("virtio", plan)
    return [Window(spec.name, base + slot * SLOT_SIZE, WINDOW_SIZE, VIRTIO_IRQS[slot])
            for slot, spec in enumerate(config.virtio_mem)]


def cmdline_devices(config: "MachineConfig", plan: "MemoryMap") -> str:
    """``virtio_mmio.device=`` parameters for discovery "cmdline" ("" otherwise)."""
    if config.virtio_discovery != "cmdline":
        return ""
    return " ".join(f"virtio_mmio.device={w.size}@{w.base:#x}:{w.gsi}"
                    for w in windows(config, plan))


class Placed(NamedTuple):
    spec: "VirtioMemSpec"
    base: int


def place_virtio_mem(specs: "tuple[VirtioMemSpec, ...]", plan: "MemoryMap") -> list[Placed]:
    """Each region's guest-physical base in the device-memory region, in order."""
    from leanvm.layout.region import RegionRole

    if not specs:
        return []
    hotplug = plan.get("device-memory")
    if not hotplug.enabled or hotplug.role is not RegionRole.HOTPLUG:
        raise ConfigError("--virtio-mem needs device memory after RAM: give -m SIZE,maxmem=MAX "
                          "with MAX at least RAM plus the virtio-mem sizes")
    taken = {region.name for region in plan.regions}
    placed, cursor = [], hotplug.base
    for spec in specs:
        if spec.name in taken:  # regions and their memslots are found by name
            raise ConfigError(f"virtio-mem id {spec.name!r} is the name of a memory-map "
                              "region: give another id=")
        base = -(-cursor // LINUX_BLOCK) * LINUX_BLOCK
        if base + spec.size > hotplug.end:
            raise ConfigError(f"virtio-mem {spec.name} ({spec.size >> 20}M) does not fit the "
                              f"{hotplug.size >> 20}M of device memory left after the regions "
                              "before it: raise maxmem")
        placed.append(Placed(spec, base))
        cursor = base + spec.size
    return placed


class VirtioMemHandle:
    """What ``Machine.virtio_mem[i]`` gives: the device's sizes and state, and resize."""

    def __init__(self, device: "VirtioMem", region: "GuestRegion") -> None:
        self.device = device
        self.region = region

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def address(self) -> int:
        return self.device.addr

    @property
    def region_size(self) -> int:
        return self.device.region_size

    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def requested_size(self) -> int:
        return self.device.requested_size

    @property
    def plugged_size(self) -> int:
        return self.device.plugged_size

    def state(self) -> bytes:
        """A byte per block: 1 plugged, 0 unplugged."""
        return self.device.discard.bitmap()

    def resize(self, size: "int | str") -> None:
        """Ask the guest to plug or unplug until ``size`` (bytes, or '512M') is plugged."""
        from leanvm.machine.config import parse_size

        value = parse_size(size, "virtio-mem requested size") if isinstance(size, str) else size
        transport = self.device.transport
        if transport is None:
            self.device.set_requested(value)
            return
        with transport.lock:
            self.device.set_requested(value)

    def resident(self) -> int:
        """Host bytes the region holds now (pagemap)."""
        from leanvm.memory.residency import measure

        mapping = self.region.mapping
        return measure([(self.name, mapping.address, mapping.size)])[0].resident

    def resident_unplugged(self) -> int:
        """Host bytes in unplugged blocks: 0 unless the guest broke its promise
        (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) and touched them."""
        from leanvm.memory.residency import measure

        address = self.region.mapping.address
        ranges = self.device.discard.discarded_ranges()
        return sum(row.resident for row in measure(
            [(self.name, address + offset, size) for offset, size in ranges]))

    def __repr__(self) -> str:
        return (f"VirtioMemHandle({self.name!r}, region={self.region_size >> 20}M, "
                f"requested={self.requested_size >> 20}M, plugged={self.plugged_size >> 20}M)")


class VirtioDevices:
    """The VM's virtio devices and their KVM wiring; closed with the VM."""

    def __init__(self) -> None:
        self.transports: list["MmioTransport"] = []
        self.mem: list[VirtioMemHandle] = []
        self.notify_fds: list[tuple[int, "MmioTransport", int]] = []  # (eventfd, device, queue)
        self.irq_fds: list[int] = []
        self.wiring = "none"  # "eventfd" (ioeventfd + irqfd) or "exits"
        self.io: object | None = None  # the I/O thread, once started

    def start(self) -> None:
        """Start the I/O thread that answers ioeventfd notifications (once)."""
        if self.io is None and self.notify_fds:
            from leanvm.machine.virtio_io import IoThread

            self.io = IoThread(self.notify_fds)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()  # type: ignore[attr-defined]
            self.io = None
        for fd, _, _ in self.notify_fds:
            os.close(fd)
        for fd in self.irq_fds:
            os.close(fd)
        self.notify_fds, self.irq_fds = [], []

    def stats(self, memory: bool = True) -> list[dict[str, object]]:
        """Each virtio-mem device's figures; with ``memory``, what its region costs the host
        now (pagemap: no page is touched), in all and in its unplugged blocks."""
        rows = []
        for handle, transport in zip(self.mem, self.transports):
            row = handle.device.stats()
            row["resident"] = handle.resident() if memory else None
            row["resident_unplugged"] = handle.resident_unplugged() if memory else None
            row["notifies"] = transport.notifies
            row["interrupts"] = transport.interrupts
            row["wiring"] = self.wiring
            if transport.errors:
                row["errors"] = list(transport.errors)
            rows.append(row)
        return rows


def build_virtio(config: "MachineConfig", plan: "MemoryMap", memory: "MemoryManager",
                 platform: "Platform", vm: "Vm", devices: VirtioDevices) -> VirtioDevices:
    """The virtio-mem regions and devices of ``config``, on the MMIO bus, wired to KVM."""
    from leanvm.devices.virtio.mem import VirtioMem
    from leanvm.devices.virtio.mmio import QUEUE_NOTIFY, MmioTransport
    from leanvm.memory.discard import DiscardManager
    from leanvm.memory.guest import GuestRegion, RegionKind
    from leanvm.memory.host import ReleasePages, map_anonymous_huge

    for window, spec in zip(windows(config, plan), config.virtio_mem):
        base = plan.get(spec.name).base  # placed by machine/plan.py (place_virtio_mem)
        discard = DiscardManager(spec.name, spec.size, spec.block)
        mapping = map_anonymous_huge(spec.size)
        region = memory.add(GuestRegion(spec.name, base, mapping, RegionKind.RAM,
                                        discard=discard))
        discard.add_listener(ReleasePages(mapping))
        device = VirtioMem(spec.name, base, discard, spec.requested)
        transport = MmioTransport(device, memory.memory, _interrupt(vm, window.gsi, devices))
        device.transport = transport
        platform.mmio.register(window.base, window.size, transport, window.name)
        devices.transports.append(transport)
        devices.mem.append(VirtioMemHandle(device, region))
        fd = _notify_fd(vm, window.base + QUEUE_NOTIFY)
        if fd is not None:
            devices.notify_fds.append((fd, transport, 0))
    if devices.transports:
        devices.wiring = "eventfd" if devices.notify_fds and devices.irq_fds else "exits"
    return devices


def _interrupt(vm: "Vm", gsi: int, devices: VirtioDevices):  # type: ignore[no-untyped-def]
    """A callable raising an edge on ``gsi``: an irqfd where KVM has one, else KVM_IRQ_LINE."""
    from leanvm.errors import KvmError

    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.irqfd(fd, gsi)
    except KvmError:
        os.close(fd)

        def pulse() -> None:
            vm.irq_line(gsi, True)
            vm.irq_line(gsi, False)

        return pulse
    devices.irq_fds.append(fd)
    return lambda: os.eventfd_write(fd, 1)


def _notify_fd(vm: "Vm", address: int) -> int | None:
    """An eventfd KVM signals on a 4-byte write of queue index 0 at ``address`` (None where
    KVM has no ioeventfd: the write then exits)."""
    from leanvm.errors import KvmError

    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(address, 4, fd, pio=False, datamatch=0)
    except KvmError:
        os.close(fd)
        return None
    return fd
