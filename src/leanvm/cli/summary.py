"""The summary `leanvm run` prints when the guest stops."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console

    from leanvm.machine.result import RunResult, SampleSummary


def human(size: int, suffix: str = "") -> str:
    """1.5M, 128M, 44K, 12B (with ``suffix`` "iB": 1.5 MiB, 128 MiB, ...)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            value = size / scale
            number = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{number} {unit}{suffix}" if suffix else f"{number}{unit}"
    return f"{size} B" if suffix else f"{size}B"


def print_summary(result: "RunResult", stream: TextIO) -> None:
    """The summary of one run, from its RunResult alone. Guest-controlled text (the stop
    detail, console lines, symbol names) is data: printed without markup, emoji codes or
    control characters."""
    from rich.console import Console
    from rich.text import Text

    from leanvm.cli.main import one_line
    from leanvm.machine.cpu_profile import reasons_for

    if result.ends_mid_line:  # the guest's last console line is unfinished
        stream.write("\n")
    console = Console(file=stream, highlight=False, soft_wrap=True, emoji=False)
    name = f" {one_line(result.name)!r}" if result.name else ""
    console.print(Text.assemble(("leanvm:", "bold"), f" guest{name} stopped: "
                                f"{result.reason.value}: {one_line(result.detail)}"))
    lines = [f"first guest instruction {result.to_first_instruction_ms:8.1f} ms after "
             "process start"]
    if result.boot_note:
        entry = (f"; entry {result.kernel_entry_point:#x}"
                 if result.kernel_entry_point is not None else "")
        lines.append(f"kernel                  {one_line(result.boot_note)}{entry}")
    if result.cmdline_added:
        lines.append(f"kernel command line + {' '.join(result.cmdline_added)} (emulated CPU "
                     f"profile: {'; '.join(reasons_for(result.cmdline_added))})")
    entry = result.kernel_entry
    if entry is not None:
        lines.append(f"kernel entry            {result.to_kernel_entry_ms:8.1f} ms after "
                     f"process start, at {entry.address:#x} ({entry.cs:04x}:{entry.rip:04x})")
    elif result.kernel_expected:
        lines.append("kernel entry            not reached")
    lines.append(f"stopped                 {result.to_stop_ms:8.1f} ms after process start")
    kinds = ", ".join(f"{kind} {n}" for kind, n in (result.exit_kinds or {}).items())
    lines.append(f"vCPU exits {result.exits}" + (f": {kinds}" if kinds else "")
                 + (f"; {result.coalesced} console writes queued by KVM without an exit"
                    if result.coalesced else ""))
    if result.busiest:
        lines.append("  most: " + ", ".join(f"{where} {n}" for where, n in result.busiest))
    done = result.accesses
    if done is not None:
        lines.append(f"device accesses: port I/O {done.pio} ({done.pio_unclaimed} unclaimed), "
                     f"MMIO {done.mmio} ({done.mmio_unclaimed} unclaimed)")
    if result.fallback_summary:  # docs/emulation.md
        lines.append(one_line(result.fallback_summary))
    for line in lines:
        console.print("  " + line, markup=False)
    for device in result.stats().get("virtio_mem") or []:
        console.print("  " + virtio_mem_line(device), markup=False)
    if result.samples is not None:
        _print_samples(console, result.samples)
    _print_memory(console, result)


def virtio_mem_line(device: dict) -> str:
    """One virtio-mem device's state at the stop (names and errors are printed as data)."""
    from leanvm.cli.main import one_line

    requests = ", ".join(f"{name} {n}" for name, n in sorted(device["requests"].items()))
    resident = ("" if device["resident"] is None else
                f"; host holds {human(device['resident'])}, of it in unplugged blocks "
                f"{human(device['resident_unplugged'])}")
    per_block = device["unplug_ns_per_block"]
    unplug = f"; unplug {per_block / 1000:.1f} us per block" if per_block is not None else ""
    errors = f"; needed a reset: {one_line(device['errors'][-1])}" if device.get("errors") else ""
    return (f"virtio-mem {device['name']}: region {human(device['region_size'])} at "
            f"{device['address']:#x}, requested {human(device['requested_size'])}, plugged "
            f"{human(device['plugged_size'])}{resident}; requests: {requests or 'none'}"
            f"{unplug}; notifications via {device['wiring']}{errors}")


def _print_memory(console: "Console", result: "RunResult") -> None:
    from rich.table import Table
    from rich.text import Text

    rows = result.stats()["residency"]
    if rows is None:
        return
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    for column in ("region", "guest address", "size", "resident", "private"):
        table.add_column(column, justify="left" if column in ("region", "guest address") else "right")
    for row in rows:
        table.add_row(Text(row["name"]), f"{row['base']:#x}-{row['base'] + row['size'] - 1:#x}",
                      human(row["size"]), human(row["resident"]), human(row["private"]))
    table.add_row("total", "", human(sum(r["size"] for r in rows)),
                  human(sum(r["resident"] for r in rows)), human(sum(r["private"] for r in rows)))
    console.print("  host memory by region:", markup=False)
    console.print(table)


def _print_samples(console: "Console", samples: "SampleSummary") -> None:
    from rich.table import Table
    from rich.text import Text

    from leanvm.cli.main import one_line

    which = "vCPU 0" if samples.vcpus == 1 else f"vCPUs 0-{samples.vcpus - 1}"
    console.print(f"  guest RIP samples {samples.count} at {samples.hz:g} Hz ({which}); "
                  f"{one_line(samples.note or 'no samples')}", markup=False)
    if not samples.count:
        return
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    table.add_column("where")
    table.add_column("samples", justify="right")
    table.add_column("share", justify="right")
    for where, count in samples.top:
        table.add_row(Text(one_line(where)), str(count), f"{100 * count / samples.count:.1f}%")
    console.print(table)
