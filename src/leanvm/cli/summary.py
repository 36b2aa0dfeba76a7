"""The summary `leanvm run` prints when the guest stops."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console

    from leanvm.machine.machine import Machine, RunResult
    from leanvm.machine.sampler import RipSampler


def human(size: int, suffix: str = "") -> str:
    """1.5M, 128M, 44K, 12B (with ``suffix`` "iB": 1.5 MiB, 128 MiB, ...)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            value = size / scale
            number = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{number} {unit}{suffix}" if suffix else f"{number}{unit}"
    return f"{size} B" if suffix else f"{size}B"


def print_summary(machine: Machine, result: RunResult, stream: TextIO) -> None:
    """Guest-controlled text (the stop detail, console lines, symbol names) is data: printed
    without markup, emoji codes or control characters."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from leanvm.cli.main import one_line

    if _ends_mid_line(machine):  # the guest's last console line is unfinished
        stream.write("\n")
    console = Console(file=stream, highlight=False, soft_wrap=True, emoji=False)
    name = f" {one_line(machine.config.name)!r}" if machine.config.name else ""
    console.print(Text.assemble(("leanvm:", "bold"), f" guest{name} stopped: "
                                f"{result.reason.value}: {one_line(result.detail)}"))
    plain = {"markup": False}
    console.print(f"  first guest instruction {result.to_first_instruction_ms:8.1f} ms after "
                  "process start", **plain)
    note = machine.kernel_boot_note
    if note:
        loaded = machine.direct_kernel
        entry_at = f"; entry {loaded.entry:#x}" if loaded is not None else ""
        console.print(f"  kernel                  {one_line(note)}{entry_at}", **plain)
    added = machine.cmdline_added
    if added:
        from leanvm.machine.cpu_profile import reasons_for

        console.print(f"  kernel command line + {' '.join(added)} (emulated CPU profile: "
                      f"{'; '.join(reasons_for(added))})", **plain)
    entry = result.kernel_entry
    if entry is not None:
        console.print(f"  kernel entry            {result.to_kernel_entry_ms:8.1f} ms after "
                      f"process start, at {entry.address:#x} ({entry.cs:04x}:{entry.rip:04x})",
                      **plain)
    elif machine.kernel is not None:
        console.print("  kernel entry            not reached", **plain)
    console.print(f"  stopped                 {result.to_stop_ms:8.1f} ms after process start",
                  **plain)
    pio, mmio = machine.platform.pio, machine.platform.mmio
    console.print(f"  vCPU exits {result.exits}; device accesses: port I/O {pio.accesses} "
                  f"({pio.unclaimed_reads + pio.unclaimed_writes} unclaimed), "
                  f"MMIO {mmio.accesses} ({mmio.unclaimed_reads + mmio.unclaimed_writes} "
                  "unclaimed)", **plain)
    fallback = machine.fallback
    if fallback is not None and fallback.total:  # docs/emulation.md
        console.print(f"  {one_line(fallback.summary())}", **plain)
    sampler = machine.sampler
    if sampler is not None:
        _print_samples(console, sampler)
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    for column in ("region", "guest address", "size", "resident", "private"):
        table.add_column(column, justify="left" if column in ("region", "guest address") else "right")
    regions = {r.name: r for r in machine.memory.regions}
    total_resident = total_private = 0
    for item in machine.residency():
        region = regions[item.name]
        table.add_row(Text(item.name), f"{region.base:#x}-{region.end - 1:#x}",
                      human(item.size), human(item.resident), human(item.private))
        total_resident += item.resident
        total_private += item.private
    table.add_row("total", "", human(sum(r.size for r in regions.values())), human(total_resident),
                  human(total_private))
    console.print("  host memory by region:", **plain)
    console.print(table)


def _ends_mid_line(machine: "Machine") -> bool:
    """Whether the terminal's cursor is after guest text that did not end its line."""
    outputs = ((machine.config.serial.mode, machine.console),
               (machine.config.debugcon.mode, machine.debug_console))
    return any(mode == "stdio" and text and not text.endswith(b"\n") for mode, text in outputs)


def _print_samples(console: "Console", sampler: "RipSampler") -> None:
    from rich.table import Table
    from rich.text import Text

    from leanvm.cli.main import one_line

    total = len(sampler.samples)
    which = "vCPU 0" if sampler.vcpus == 1 else f"vCPUs 0-{sampler.vcpus - 1}"
    console.print(f"  guest RIP samples {total} at {sampler.hz:g} Hz ({which}); "
                  f"{one_line(sampler.symbol_note or 'no samples')}", markup=False)
    if not total:
        return
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    table.add_column("where")
    table.add_column("samples", justify="right")
    table.add_column("share", justify="right")
    for where, count in sampler.top(10):
        table.add_row(Text(one_line(where)), str(count), f"{100 * count / total:.1f}%")
    console.print(table)
