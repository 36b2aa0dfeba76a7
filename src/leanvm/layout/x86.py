"""leanvm's x86 machine: a versioned memory map.

leanvm-1, from the bottom:
  ram-low        RAM from 0 up to 3 GiB (or all of RAM if less)
  flash-large    0xC000_0000, 128 MiB: two 64 MiB flash banks in the arm virt geometry
  platform       0xD000_0000, 16 MiB: virtio-mmio and platform devices (4 KiB slots)
  ioapic         0xFEC0_0000, 4 KiB
  lapic          0xFEE0_0000, 4 KiB
  kvm-private    0xFEFF_C000, 16 KiB: KVM's real-mode identity-map page and TSS (Intel)
  firmware       0xFF00_0000, 16 MiB: flash banks are mapped down from 4 GiB inside it
  ram-high       the rest of RAM from 4 GiB
  device-memory  hotplug space after RAM, 1 GiB aligned: (maxmem - RAM) + 1 GiB per slot
  pcie-ecam      256 MiB, floating above everything, aligned to its size
  pcie-mmio64    64 GiB, floating above that, aligned to its size

Every region but RAM can be switched off (``<name>=off``). Regions must fit below
2^pa_bits: a floating region that does not fit is disabled with the reason; RAM or
device memory that does not fit is a ConfigError naming the limit. With ``compact=on``
(the default) a disabled floating region takes no space; ``compact=off`` keeps its space
reserved, so the regions above it never move (the layout a pinned machine keeps).

A version never changes once released: new layouts get a new name, and "leanvm" means the
newest.
"""

from __future__ import annotations

from typing import NamedTuple

from leanvm.errors import ConfigError
from leanvm.layout.region import (GiB, KiB, MemoryMap, MiB, Region, RegionRole, RegionState,
                                  parse_switch, round_up)

LATEST = "leanvm-1"


class FixedRegion(NamedTuple):
    name: str
    base: int
    size: int
    role: RegionRole = RegionRole.WINDOW


class X86Version(NamedTuple):
    low_ram_limit: int
    fixed: tuple[FixedRegion, ...]
    floating: tuple[tuple[str, int], ...]  # (name, size), placed in this order
    slot_size: int  # device memory per hotplug slot (alignment headroom)


VERSIONS: dict[str, X86Version] = {
    "leanvm-1": X86Version(
        low_ram_limit=3 * GiB,
        fixed=(
            FixedRegion("flash-large", 0xC000_0000, 128 * MiB, RegionRole.FLASH_WINDOW),
            FixedRegion("platform", 0xD000_0000, 16 * MiB),
            FixedRegion("ioapic", 0xFEC0_0000, 4 * KiB),
            FixedRegion("lapic", 0xFEE0_0000, 4 * KiB),
            FixedRegion("kvm-private", 0xFEFF_C000, 16 * KiB, RegionRole.KVM_PRIVATE),
            FixedRegion("firmware", 0xFF00_0000, 16 * MiB, RegionRole.FLASH_WINDOW),
        ),
        floating=(("pcie-ecam", 256 * MiB), ("pcie-mmio64", 64 * GiB)),
        slot_size=1 * GiB,
    ),
}
HIGH_RAM_BASE = 4 * GiB
MAX_SLOTS = 256
DEFAULT_PA_BITS = 40  # when neither the CPU nor the user says


def x86_properties(version: str) -> dict[str, bool]:
    """The switches a version accepts, with their defaults."""
    spec = VERSIONS[version]
    switches = {r.name: True for r in spec.fixed}
    switches.update({name: True for name, _ in spec.floating})
    switches["device-memory"] = True
    switches["compact"] = True
    return switches


def resolve_x86_version(machine: str) -> str:
    name = LATEST if machine == "leanvm" else machine
    if name not in VERSIONS:
        known = ", ".join(["leanvm", *VERSIONS])
        raise ConfigError(f"unknown machine {machine!r}: expected one of {known}")
    return name


def plan_x86_layout(ram_size: int, *, maxmem: int | None = None, slots: int = 0,
                    pa_bits: int = DEFAULT_PA_BITS, machine: str = "leanvm",
                    settings: dict[str, str] | None = None) -> MemoryMap:
    """Plan leanvm's x86 address space for ``ram_size`` bytes of RAM."""
    version = resolve_x86_version(machine)
    spec = VERSIONS[version]
    switches = x86_properties(version)
    for key, value in (settings or {}).items():
        if key not in switches:
            raise ConfigError(f"unknown property {key!r} for machine {version}: expected one "
                              f"of {', '.join(sorted(switches))}")
        switches[key] = parse_switch(key, value)
    maxmem = ram_size if maxmem is None else maxmem
    _check_sizes(ram_size, maxmem, slots, pa_bits)
    limit = 1 << pa_bits
    regions, top = _ram_and_fixed(spec, switches, ram_size, pa_bits)
    hotplug, top = _device_memory(spec, switches, ram_size, maxmem, slots, top, pa_bits)
    regions += [hotplug, *_floating(spec, switches, round_up(top, GiB), pa_bits)]
    # the highest address: the top of every region that is present or keeps its space
    highest = max(r.end for r in regions if r.state is not RegionState.DISABLED and r.size) - 1
    properties = tuple((k, "on" if v else "off") for k, v in switches.items())
    ordered = tuple(sorted(regions, key=lambda r: (r.base, r.name)))
    return MemoryMap(version, pa_bits, ordered, highest, properties)


def _ram_and_fixed(spec: X86Version, switches: dict[str, bool], ram_size: int,
                   pa_bits: int) -> tuple[list[Region], int]:
    """RAM below the 32-bit holes, the fixed windows, RAM above 4 GiB; and where RAM ends."""
    regions: list[Region] = []
    low = min(ram_size, spec.low_ram_limit)
    regions.append(Region("ram-low", 0, low, role=RegionRole.RAM))
    for fixed in spec.fixed:
        if switches[fixed.name]:
            regions.append(Region(fixed.name, fixed.base, fixed.size, role=fixed.role))
        else:
            regions.append(Region(fixed.name, fixed.base, fixed.size, RegionState.DISABLED,
                                  f"{fixed.name}=off", fixed.role))
    top = 4 * GiB
    if ram_size > low:
        regions.append(Region("ram-high", HIGH_RAM_BASE, ram_size - low, role=RegionRole.RAM))
        top = HIGH_RAM_BASE + ram_size - low
    limit = 1 << pa_bits
    if top > limit:
        raise ConfigError(f"RAM ends at {top:#x}, beyond the {pa_bits}-bit physical address "
                          f"limit ({limit:#x}); lower -m or raise --pa-bits")
    return regions, top


def _device_memory(spec: X86Version, switches: dict[str, bool], ram_size: int, maxmem: int,
                   slots: int, top: int, pa_bits: int) -> tuple[Region, int]:
    """The hotplug space after RAM, 1 GiB aligned; and where it ends."""
    limit = 1 << pa_bits
    hotplug_size = maxmem - ram_size + slots * spec.slot_size
    hotplug_base = round_up(top, GiB)
    if hotplug_size and switches["device-memory"]:
        end = hotplug_base + round_up(hotplug_size, GiB)
        if end > limit:
            raise ConfigError(f"device memory (maxmem {maxmem >> 20}M, {slots} slots) ends at "
                              f"{end:#x}, beyond the {pa_bits}-bit physical address limit "
                              f"({limit:#x}); lower maxmem or slots, or raise --pa-bits")
        return Region("device-memory", hotplug_base, hotplug_size, role=RegionRole.HOTPLUG), end
    why = "device-memory=off" if hotplug_size else "no maxmem beyond RAM and no slots"
    return Region("device-memory", hotplug_base, hotplug_size, RegionState.DISABLED, why,
                  RegionRole.HOTPLUG), top


def _floating(spec: X86Version, switches: dict[str, bool], base: int,
              pa_bits: int) -> list[Region]:
    """The regions that float above everything, each aligned to its size; compact=on
    gives a disabled one no space, compact=off keeps its space reserved."""
    limit = 1 << pa_bits
    regions = []
    for name, size in spec.floating:
        region_base = round_up(base, size)
        fits = region_base + size <= limit
        if switches[name] and fits:
            regions.append(Region(name, region_base, size))
        else:
            why = f"{name}=off" if not switches[name] else \
                f"does not fit below 2^{pa_bits} (needs {region_base + size:#x})"
            kept = not switches["compact"] and fits
            regions.append(Region(name, region_base, size,
                                  RegionState.RESERVED if kept else RegionState.DISABLED, why))
            if switches["compact"] or not fits:
                continue
        base = region_base + size
    return regions


def _check_sizes(ram_size: int, maxmem: int, slots: int, pa_bits: int) -> None:
    if ram_size <= 0 or ram_size % (4 * KiB):
        raise ConfigError(f"RAM size {ram_size} must be a positive multiple of 4K")
    if maxmem < ram_size:
        raise ConfigError(f"maxmem ({maxmem >> 20}M) is smaller than RAM ({ram_size >> 20}M)")
    if not 0 <= slots <= MAX_SLOTS:
        raise ConfigError(f"bad slots {slots}: expected 0 to {MAX_SLOTS}")
    if not 32 <= pa_bits <= 52:
        raise ConfigError(f"bad physical address bits {pa_bits}: expected 32 to 52")
