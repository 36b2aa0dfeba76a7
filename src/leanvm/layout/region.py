"""What a plan is made of: regions with a state, and the map that holds them."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class RegionState(Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"  # not present; its space is free for what follows
    RESERVED = "reserved"  # not present, but its space is kept (non-compact layouts)


class RegionRole(Enum):
    """What a region is for: code finds RAM, flash or KVM's private pages by role, never by
    a region's name."""

    RAM = "ram"  # guest RAM
    HOTPLUG = "hotplug"  # device memory above RAM (memory hotplug, virtio-mem)
    FLASH = "flash"  # one flash bank
    FLASH_WINDOW = "flash-window"  # where flash banks may be placed
    KVM_PRIVATE = "kvm-private"  # KVM's real-mode identity map and TSS (Intel)
    WINDOW = "window"  # anything else: device windows, interrupt controllers, PCIe


class Region(NamedTuple):
    """A guest-physical range. ``reason`` says why a region is disabled or reserved."""

    name: str
    base: int
    size: int
    state: RegionState = RegionState.ENABLED
    reason: str = ""
    role: RegionRole = RegionRole.WINDOW

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + self.size

    @property
    def enabled(self) -> bool:
        return self.state is RegionState.ENABLED

    def describe_state(self) -> str:
        if self.state is RegionState.ENABLED:
            return f"enabled ({self.reason})" if self.role is RegionRole.FLASH else "enabled"
        return f"{self.state.value} ({self.reason})" if self.reason else self.state.value


class MemoryMap(NamedTuple):
    """A machine's planned address space, lowest base first."""

    machine: str  # e.g. "leanvm-1", "virt-7.2"
    pa_bits: int
    regions: tuple[Region, ...]
    highest_gpa: int  # the highest guest-physical address the machine reports (inclusive)
    properties: tuple[tuple[str, str], ...] = ()  # effective settings, for display

    def get(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def enabled(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.enabled)

    def ram(self) -> tuple[Region, ...]:
        """The enabled RAM regions, lowest first."""
        return tuple(r for r in self.regions if r.enabled and r.role is RegionRole.RAM)

    def low_ram(self) -> Region:
        """The RAM region that starts at 0 (below the 32-bit holes)."""
        return next(r for r in self.ram() if r.base == 0)

    def with_regions(self, extra: "tuple[Region, ...]") -> "MemoryMap":
        """This map with ``extra`` regions added in address order (flash banks)."""
        ordered = tuple(sorted((*self.regions, *extra), key=lambda r: (r.base, r.name)))
        return self._replace(regions=ordered)

    def to_json(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "pa_bits": self.pa_bits,
            "highest_gpa": self.highest_gpa,
            "properties": dict(self.properties),
            # end_exclusive = base + size; last = the region's last byte (what tables print)
            "regions": [{"name": r.name, "base": r.base, "end_exclusive": r.end,
                         "last": r.end - 1 if r.size else None, "size": r.size,
                         "state": r.state.value, "reason": r.reason, "role": r.role.value}
                        for r in self.regions],
        }


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


SWITCH_ON = ("on", "yes", "true", "y")  # what QEMU's qapi_bool_parse accepts, and no more
SWITCH_OFF = ("off", "no", "false", "n")


def parse_switch(name: str, text: str) -> bool:
    """QEMU-style boolean property values: on/off (or yes/no, true/false, y/n); anything
    else, "1" and "maybe" included, is refused rather than read one way or the other."""
    lowered = text.strip().lower()
    if lowered in SWITCH_ON:
        return True
    if lowered in SWITCH_OFF:
        return False
    from leanvm.errors import ConfigError

    raise ConfigError(f"bad value {text!r} for {name}: expected on or off")
