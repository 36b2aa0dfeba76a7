"""The parts of a built VM as a Machine shows them, and the Python API for adding to it:
devices on its buses, regions in its memory; host memory and the timeline, observed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanvm.errors import ConfigError

if TYPE_CHECKING:
    from leanvm.devices.bus import Bus, BusDevice
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.machine.boot import Built
    from leanvm.machine.virtio import VirtioMemHandle
    from leanvm.memory.guest import GuestRegion
    from leanvm.memory.host import HostMapping
    from leanvm.memory.residency import Residency
    from leanvm.trace.events import Event, Tracer


class _Part:
    """An attribute that is the built VM's part of the same name (building first)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, parts: "VmParts | None", owner: type | None = None) -> Any:
        if parts is None:
            return self
        return getattr(parts.build().built, self.name)


class VmParts:
    """Base of Machine: the parts of the VM (boot.Built), readable once built."""

    built: "Built | None"
    tracer: "Tracer"
    kvm, vm, plan, memory, memory_manager = _Part(), _Part(), _Part(), _Part(), _Part()
    platform, vcpus, fallback, flash_banks, bios_area = _Part(), _Part(), _Part(), _Part(), _Part()
    image, kernel, direct_boot, entry_trap, cpu_profile = _Part(), _Part(), _Part(), _Part(), _Part()
    kernel_cmdline, cmdline_added, kernel_boot_note, virtio = _Part(), _Part(), _Part(), _Part()

    def build(self) -> Any:
        raise NotImplementedError

    @property
    def vcpu(self) -> "Vcpu":
        return self.vcpus[0]

    @property
    def direct_kernel(self) -> Any:
        boot = self.direct_boot
        return boot.kernel if boot is not None else None

    @property
    def virtio_mem(self) -> "list[VirtioMemHandle]":
        """The virtio-mem devices: ``vm.virtio_mem[0].resize("512M")``, ``.plugged_size``,
        ``.state()`` (a byte per block), ``.resident()`` (host bytes)."""
        return self.virtio.mem

    @property
    def pio_bus(self) -> "Bus":
        return self.platform.pio

    @property
    def mmio_bus(self) -> "Bus":
        return self.platform.mmio

    def add_mmio_device(self, base: int, size: int, device: "BusDevice", name: str) -> None:
        """A device model at guest-physical [base, base + size): the guest's loads and
        stores there reach ``device.read(offset, size)`` / ``write(offset, size, value)``.
        Refused over guest RAM, whose accesses never leave the guest (over a read-only
        region it is allowed: the guest's writes there come to the device)."""
        for region in self.memory.regions:
            if base < region.end and region.base < base + size and not region.readonly:
                raise ConfigError(f"device {name} [{base:#x}, {base + size:#x}) overlaps guest "
                                  f"memory {region.name} [{region.base:#x}, {region.end:#x}): "
                                  "accesses there go to memory, never to a device")
        self.mmio_bus.register(base, size, device, name)

    def add_pio_device(self, base: int, size: int, device: "BusDevice", name: str) -> None:
        self.pio_bus.register(base, size, device, name)

    def add_region(self, name: str, base: int, mapping: "HostMapping", *,
                   readonly: bool = False) -> "GuestRegion":
        """Map host memory into the guest (readonly: guest writes arrive as MMIO writes)."""
        from leanvm.memory.guest import GuestRegion, RegionKind

        for other in self.mmio_bus.mappings:
            if base < other.end and other.base < base + mapping.size and not readonly:
                raise ConfigError(f"guest region {name} [{base:#x}, {base + mapping.size:#x}) "
                                  f"overlaps device {other.name} [{other.base:#x}, "
                                  f"{other.end:#x})")
        kind = RegionKind.ROM if readonly else RegionKind.FILE if mapping.path else RegionKind.RAM
        return self.memory_manager.add(GuestRegion(name, base, mapping, kind, readonly=readonly))

    # --- observing ---------------------------------------------------------------------
    def residency(self) -> "list[Residency]":
        """Host memory each guest region costs now."""
        from leanvm.memory.residency import measure

        return measure([(r.name, r.mapping.address, r.size) for r in self.memory.regions])

    @property
    def trace_events(self) -> "list[Event]":
        """The boot timeline so far (empty unless the machine was made with trace=True)."""
        return self.tracer.sorted_events()

    def write_trace(self, path: "str | Path") -> None:
        """Save the boot timeline: trace-event JSON for *.json, else JSON lines."""
        from leanvm.trace.files import write_trace

        write_trace(Path(path), self.trace_events, self.tracer.origin, self.tracer.dropped)

