"""`leanvm memmap`: print a machine's planned guest-physical memory map."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.layout.region import MemoryMap


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "memmap", help="print the memory map of a machine (leanvm x86 or QEMU's arm virt)",
        description="Plan and print a machine's guest-physical memory map: one row per region "
                    "with its base, end, size and state (enabled, disabled and why, reserved).")
    parser.add_argument("--machine", default="leanvm", metavar="NAME",
                        help="leanvm (newest leanvm-N), leanvm-1, virt (newest), virt-X.Y")
    parser.add_argument("-m", "--memory", default="128M", metavar="SIZE[,maxmem=SIZE][,slots=N]",
                        help="RAM, as QEMU's -m (default 128M)")
    parser.add_argument("--pa-bits", type=int, metavar="N",
                        help="guest physical address bits (default: leanvm: this host's vCPU "
                             "CPUID, else 40; virt: 40)")
    parser.add_argument("--set", action="append", default=[], metavar="PROP=VALUE",
                        help="machine property, e.g. highmem-ecam=off or compact=off (repeatable)")
    parser.add_argument("--bios", type=Path, metavar="FILE",
                        help="show where this firmware image goes (flash bank 0), as run does")
    parser.add_argument("--flash", action="append", default=[], metavar="ROLE=FILE[,OPT=V...]",
                        help="show a flash bank as leanvm run --flash places it (repeatable)")
    parser.add_argument("-drive", action="append", default=[], metavar="if=pflash,file=F,...",
                        help="QEMU-style flash bank, as for leanvm run")
    parser.add_argument("--virtio-mem", action="append", default=[],
                        metavar="size=SIZE[,requested=SIZE][,block=SIZE][,id=NAME]",
                        help="show where run places this virtio-mem region (as leanvm run)")
    parser.add_argument("--platform", action="store_true",
                        help="also list the platform devices: their ports, MMIO windows and "
                             "IRQs, with the specification each follows")
    parser.add_argument("--json", action="store_true", help="JSON for tools")
    parser.set_defaults(handler=handle)


def parse_settings(items: list[str]) -> dict[str, str]:
    from leanvm.errors import ConfigError

    settings = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"bad --set {item!r}: expected PROPERTY=VALUE, e.g. compact=off")
        settings[key.strip()] = value.strip()
    return settings


def handle(args: argparse.Namespace) -> int:
    import json

    from leanvm.errors import ConfigError

    if args.platform and args.machine.startswith("virt"):
        raise ConfigError("--platform lists leanvm's own x86 devices; the virt map has none")
    plan, note = _plan(args)
    platform = []
    if args.platform:
        from leanvm.machine.platform import describe

        platform = describe(plan)
    if args.json:
        data = plan.to_json()
        if platform:
            data["platform"] = [{"kind": kind, "name": name, "where": where, "spec": spec}
                                for kind, name, where, spec in platform]
        print(json.dumps(data, indent=1))
        return 0
    print(f"machine {plan.machine}, {plan.pa_bits}-bit physical addresses{note}, "
          f"highest address {plan.highest_gpa:#x}")
    rows = [("region", "base", "last", "size", "state")]  # last: the region's last byte
    for region in plan.regions:
        rows.append((region.name, f"{region.base:#x}", f"{region.end - 1:#x}" if region.size else "-",
                     human(region.size), region.describe_state()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row[:4], widths))) + "  " + row[4])
    if platform:
        print("platform devices (machine/platform.py):")
        width = max(len(name) for _, name, _, _ in platform)
        for kind, name, where, spec in platform:
            print(f"  {kind:4}  {name.ljust(width)}  {where:24}  {spec}")
    return 0


def _plan(args: argparse.Namespace) -> "tuple[MemoryMap, str]":
    """(the planned map, a note on where its physical address bits came from)."""
    from leanvm.errors import ConfigError
    from leanvm.machine.config import PA_BITS_RANGE, MachineConfig, parse_memory_option

    memory = parse_memory_option(args.memory)
    settings = parse_settings(args.set)
    low, high = PA_BITS_RANGE
    if args.pa_bits is not None and not low <= args.pa_bits <= high:
        raise ConfigError(f"bad --pa-bits {args.pa_bits}: expected {low} to {high}")
    if args.machine.startswith("virt"):
        from leanvm.layout.virt import plan_virt_layout

        return plan_virt_layout(memory.size, maxmem=memory.maxmem, slots=memory.slots,
                                pa_bits=args.pa_bits, machine=args.machine,
                                settings=settings), ""
    from leanvm.machine.flash import parse_drive_option, parse_flash_option
    from leanvm.machine.plan import host_pa_bits, plan_for

    flash = [parse_flash_option(text) for text in args.flash]
    flash += [parse_drive_option(text, unit) for unit, text in enumerate(args.drive)]
    config = MachineConfig(memory=memory.size, maxmem=memory.maxmem, slots=memory.slots,
                           machine=args.machine, pa_bits=args.pa_bits,
                           layout=tuple(settings.items()), bios=args.bios, flash=tuple(flash),
                           virtio_mem=tuple(args.virtio_mem))
    pa_bits = args.pa_bits if args.pa_bits is not None else host_pa_bits()
    note = "" if pa_bits else " (no KVM here: 40 assumed; --pa-bits sets it)"
    return plan_for(config, pa_bits or 40), note


def human(size: int) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B" if size < 1024 else f"{size / (1 << 20):.1f}M"
