"""QEMU's arm virt machine memory map, computed the way QEMU 8.0 and later compute it
(hw/arm/virt.c: virt_set_memmap, virt_set_high_memmap) for machine types virt-2.6 to
virt-9.2. Facts, not code, were taken from QEMU; see docs/memmap.md.

The low map is fixed. RAM starts at 1 GiB. Device memory (hotplug) follows RAM, 1 GiB
aligned, sized (maxmem - RAM) + 1 GiB per slot. The high IO area starts at the top of
device memory but never below 256 GiB, and holds, in this order and each aligned to its
own size: GIC redistributor region 2 (64 MiB), PCIe ECAM (256 MiB), PCIe MMIO (512 GiB).
A region that does not fit below 2^pa_bits is disabled. With compact-highmem off (the
legacy layout, default up to virt-7.1) every region takes its space even when disabled;
with it on (default from virt-7.2, as QEMU 8.0+ runs it) a disabled region takes none.
highmem=off limits the address space to 32 bits. The high ECAM defaults off up to
virt-2.12, and is dropped (its space kept) when 32-bit firmware is loaded.
"""

from __future__ import annotations

from typing import NamedTuple

from leanvm.errors import ConfigError
from leanvm.layout.region import (GiB, MemoryMap, MiB, Region, RegionRole, RegionState, parse_switch,
                                  round_up)

# (name, base, size), hw/arm/virt.c base_memmap (the CPU peripherals container is left out:
# the GIC regions inside it are listed; the 32 virtio-mmio transports are one region)
LOW_MAP: tuple[tuple[str, int, int], ...] = (
    ("flash", 0x0000_0000, 0x0800_0000),
    ("gic-dist", 0x0800_0000, 0x0001_0000),
    ("gic-cpu", 0x0801_0000, 0x0001_0000),
    ("gic-v2m", 0x0802_0000, 0x0000_1000),
    ("gic-hyp", 0x0803_0000, 0x0001_0000),
    ("gic-vcpu", 0x0804_0000, 0x0001_0000),
    ("gic-its", 0x0808_0000, 0x0002_0000),
    ("gic-redist", 0x080A_0000, 0x00F6_0000),
    ("uart0", 0x0900_0000, 0x0000_1000),
    ("rtc", 0x0901_0000, 0x0000_1000),
    ("fw-cfg", 0x0902_0000, 0x0000_0018),
    ("gpio", 0x0903_0000, 0x0000_1000),
    ("uart1", 0x0904_0000, 0x0000_1000),
    ("smmu", 0x0905_0000, 0x0002_0000),
    ("pcdimm-acpi", 0x0907_0000, 0x0000_0018),
    ("acpi-ged", 0x0908_0000, 0x0000_0004),
    ("nvdimm-acpi", 0x0909_0000, 0x0000_0004),
    ("pvtime", 0x090A_0000, 0x0001_0000),
    ("secure-gpio", 0x090B_0000, 0x0000_1000),
    ("virtio-mmio", 0x0A00_0000, 32 * 0x200),
    ("platform-bus", 0x0C00_0000, 0x0200_0000),
    ("secure-mem", 0x0E00_0000, 0x0100_0000),
    ("pcie-mmio", 0x1000_0000, 0x2EFF_0000),
    ("pcie-pio", 0x3EFF_0000, 0x0001_0000),
    ("pcie-ecam", 0x3F00_0000, 0x0100_0000),
)
RAM_BASE = 1 * GiB
LEGACY_RAMLIMIT = 255 * GiB  # the high IO area never starts below RAM_BASE + this (256 GiB)
MAX_RAM_SLOTS = 256  # ACPI_MAX_RAM_SLOTS
RAM_ALIGN = 8192  # QEMU rounds -m up to this
# (region, size, enabling property), in QEMU's order
HIGH_REGIONS = (
    ("high-gic-redist2", 64 * MiB, "highmem-redists"),
    ("high-pcie-ecam", 256 * MiB, "highmem-ecam"),
    ("high-pcie-mmio", 512 * GiB, "highmem-mmio"),
)
VERSIONS = ("2.6", "2.7", "2.8", "2.9", "2.10", "2.11", "2.12", "3.0", "3.1", "4.0", "4.1",
            "4.2", "5.0", "5.1", "5.2", "6.0", "6.1", "6.2", "7.0", "7.1", "7.2", "8.0", "8.1",
            "8.2", "9.0", "9.1", "9.2")
LATEST = VERSIONS[-1]
DEFAULT_PA_BITS = 40  # KVM's default IPA size; TCG's cortex-a57 has 44, max 52
GIC_VERSIONS = ("2", "3", "4", "host", "max")


class VirtVersion(NamedTuple):
    major: int
    minor: int

    @property
    def name(self) -> str:
        return f"virt-{self.major}.{self.minor}"


def resolve_virt_version(machine: str) -> VirtVersion:
    text = LATEST if machine == "virt" else machine.removeprefix("virt-")
    if text not in VERSIONS:
        raise ConfigError(f"unknown machine {machine!r}: expected virt or virt-X.Y for X.Y in "
                          f"{VERSIONS[0]}..{LATEST}")
    major, minor = text.split(".")
    return VirtVersion(int(major), int(minor))


def virt_defaults(version: VirtVersion) -> dict[str, str]:
    """Each property's default for a machine version (virt_instance_init and the compat
    functions: no_highmem_ecam up to 2.12, no_highmem_compact up to 7.1)."""
    v = (version.major, version.minor)
    return {
        "highmem": "on",
        "compact-highmem": "on" if v >= (7, 2) else "off",
        "highmem-redists": "on",
        "highmem-ecam": "on" if v >= (3, 0) else "off",
        "highmem-mmio": "on",
        "gic-version": "3",  # does not move anything: the map is planned before the GIC
        "firmware-32bit": "off",  # leanvm's input: 32-bit firmware loaded (drops high ECAM)
    }


def plan_virt_layout(ram_size: int, *, maxmem: int | None = None, slots: int = 0,
                     pa_bits: int | None = None, machine: str = "virt",
                     settings: dict[str, str] | None = None) -> MemoryMap:
    """QEMU's virt memory map for ``machine`` with ``-m ram_size,maxmem=..,slots=..``."""
    version = resolve_virt_version(machine)
    props = _properties(version, settings or {})
    on = {k: v == "on" for k, v in props.items()}

    ram_size = round_up(ram_size, RAM_ALIGN)
    maxram = _check_memory(ram_size, maxmem, slots)
    if slots > MAX_RAM_SLOTS:
        raise ConfigError(f"unsupported number of memory slots: {slots}")
    pa_bits = DEFAULT_PA_BITS if pa_bits is None else pa_bits
    if not 32 <= pa_bits <= 52:
        raise ConfigError(f"bad physical address bits {pa_bits}: expected 32 to 52")
    if not on["highmem"]:
        pa_bits = 32  # highmem=off is exactly a 32-bit physical address space
    limit = 1 << pa_bits

    device_memory_base = round_up(RAM_BASE + ram_size, GiB)
    device_memory_size = maxram - ram_size + slots * GiB
    memtop = device_memory_base + round_up(device_memory_size, GiB)
    if memtop > limit:
        raise ConfigError(f"Addressing limited to {pa_bits} bits, but memory exceeds it by "
                          f"{memtop - limit} bytes")
    if memtop >= 1 << 64:
        raise ConfigError("maxmem/slots too huge")

    regions = [Region(name, b, size) for name, b, size in LOW_MAP]
    regions.append(Region("mem", RAM_BASE, ram_size, role=RegionRole.RAM))
    if device_memory_size > 0:
        regions.append(Region("device-memory", device_memory_base, device_memory_size,
                              role=RegionRole.HOTPLUG))
    high, highest = _high_regions(on, max(memtop, RAM_BASE + LEGACY_RAMLIMIT), memtop - 1,
                                  pa_bits)
    regions += high
    if on["firmware-32bit"]:  # machvirt_init, after the map: the address stays taken
        regions = [r._replace(state=RegionState.RESERVED, reason="32-bit firmware loaded")
                   if r.name == "high-pcie-ecam" and r.enabled else r for r in regions]

    ordered = tuple(sorted(regions, key=lambda r: (r.base, r.state is not RegionState.ENABLED)))
    return MemoryMap(version.name, pa_bits, ordered, highest, tuple(props.items()))


def _properties(version: VirtVersion, settings: dict[str, str]) -> dict[str, str]:
    """The version's defaults with ``settings`` applied (errors in QEMU's words)."""
    props = virt_defaults(version)
    for key, value in settings.items():
        if key not in props:
            raise ConfigError(f"unknown property {key!r} for {version.name}: expected one of "
                              f"{', '.join(sorted(props))}")
        if key == "gic-version":
            if value not in GIC_VERSIONS:
                raise ConfigError(f"Invalid gic-version value {value!r}: valid values are "
                                  "3, 2, 4, host, max")
            props[key] = value
        else:
            props[key] = "on" if parse_switch(key, value) else "off"
    return props


def _high_regions(on: dict[str, bool], base: int, highest: int,
                  pa_bits: int) -> tuple[list[Region], int]:
    """The high regions in QEMU's order, each aligned to its size; compact-highmem skips
    disabled ones, the legacy layout advances past them (virt_set_high_memmap)."""
    limit = 1 << pa_bits
    compact = on["compact-highmem"]
    regions = []
    for name, size, prop in HIGH_REGIONS:
        region_base = round_up(base, size)
        fits = region_base + size <= limit
        wanted = on[prop]
        enabled = wanted and fits
        if compact and not enabled:
            reason = f"{prop}=off" if not wanted else f"does not fit below 2^{pa_bits}"
            regions.append(Region(name, region_base, size, RegionState.DISABLED, reason))
            continue
        base = region_base + size
        if fits:
            highest = base - 1
        if enabled:
            regions.append(Region(name, region_base, size))
        elif fits:
            regions.append(Region(name, region_base, size, RegionState.RESERVED, f"{prop}=off"))
        else:
            regions.append(Region(name, region_base, size, RegionState.DISABLED,
                                  f"does not fit below 2^{pa_bits}"))
    return regions, highest


def _check_memory(ram_size: int, maxmem: int | None, slots: int) -> int:
    """QEMU's -m rules (hw/core/machine.c machine_set_mem); returns maxram."""
    if maxmem is None:
        if slots:
            raise ConfigError("slots specified but no max-size")
        return ram_size
    if maxmem < ram_size:
        raise ConfigError(f"invalid value of maxmem: maximum memory size ({maxmem:#x}) must be "
                          f"at least the initial memory size ({ram_size:#x})")
    if slots and maxmem == ram_size:
        raise ConfigError(f"invalid value of maxmem: memory slots were specified but maximum "
                          f"memory size ({maxmem:#x}) is equal to the initial memory size "
                          f"({ram_size:#x})")
    return maxmem
