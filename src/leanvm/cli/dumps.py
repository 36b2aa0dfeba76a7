"""`leanvm run`'s dump options: a dump when the VM stops (--dump-on-stop), when the guest
crashes (--dump-on-crash), and of the running VM on SIGUSR2, without stopping it."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from leanvm.machine.machine import Machine
    from leanvm.machine.result import RunResult

DUMP_SIGNAL_NAME = "SIGUSR2"
CRASHES = ("guest-panic", "shutdown", "internal-error", "fail-entry", "system-event")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from leanvm.machine.dump import FORMATS

    parser.add_argument("--dump-on-stop", type=Path, metavar="FILE",
                        help="write the guest's memory to FILE when the VM stops for any reason "
                             "(a power-off, a timeout, --until, Ctrl-C); docs/dump.md")
    parser.add_argument("--dump-on-crash", type=Path, metavar="DIR",
                        help="write the guest's memory into DIR when the guest crashes (kernel "
                             "panic, triple fault, KVM internal error); SIGUSR2 dumps go there "
                             "too")
    parser.add_argument("--dump-format", default="elf", choices=FORMATS,
                        help="dump format as QEMU names them: elf (default), kdump-zlib, "
                             "kdump-lzo, kdump-snappy, kdump-zstd (makedumpfile's flattened "
                             "layout) or kdump-raw-* (the raw layout). Sending leanvm "
                             f"{DUMP_SIGNAL_NAME} dumps the running VM without stopping it "
                             "(into --dump-on-crash DIR, else the working directory)")
    parser.add_argument("--dump-paging", action="store_true",
                        help="elf dumps: guest-virtual addresses from vCPU 0's page tables "
                             "(gdb can then read symbols)")


def check(args: argparse.Namespace) -> None:
    """Every dump destination is checked before the VM is built."""
    from leanvm.errors import ConfigError
    from leanvm.fileio import check_output_path
    from leanvm.machine.dump import DumpRequest

    if args.dump_on_stop is not None:
        DumpRequest(args.dump_on_stop, args.dump_format, paging=args.dump_paging)
    if args.dump_on_crash is not None:
        directory = args.dump_on_crash
        if not directory.is_dir():
            raise ConfigError(f"{directory}: --dump-on-crash needs an existing directory")
        check_output_path(directory / "probe", "dump")


def _extension(fmt: str) -> str:
    return "elf" if fmt == "elf" else "kdump"


def _write(machine: "Machine", path: Path, args: argparse.Namespace) -> bool:
    """One dump, reported on stderr; False if it failed (said in one line)."""
    from leanvm.errors import LeanvmError

    progress, finish = _progress_bar(str(path))
    try:
        result = machine.dump(path, args.dump_format, paging=args.dump_paging,
                              progress=progress)
    except LeanvmError as exc:
        finish()
        print(f"leanvm: error: {exc}", file=sys.stderr)
        return False
    finish()
    paused = (f", guest paused {result.pause_ms:.1f} ms ({result.method})"
              if result.method != "stopped" else "")
    print(f"leanvm: dump written to {path} ({_size(result.size)}, {_size(result.memory)} of "
          f"guest memory, {result.seconds:.2f} s{paused})",
          file=sys.stderr)
    for note in result.notes:
        print(f"leanvm: note: {note}", file=sys.stderr)
    return True


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _progress_bar(label: str):  # type: ignore[no-untyped-def]
    """(progress callback, finish) showing a rich progress bar on a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(TextColumn("dump"), BarColumn(), DownloadColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(label, total=None)
    bar.start()
    return (lambda done: bar.update(task, completed=done)), bar.stop


def after_run(machine: "Machine", result: "RunResult", args: argparse.Namespace) -> bool:
    """The stop and crash dumps; False if one that was asked for failed."""
    ok = True
    if args.dump_on_stop is not None:
        ok &= _write(machine, args.dump_on_stop, args)
    if args.dump_on_crash is not None and result.reason.value in CRASHES:
        name = f"leanvm-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}-{result.reason.value}"
        ok &= _write(machine, args.dump_on_crash / f"{name}.{_extension(args.dump_format)}", args)
    return ok


@contextlib.contextmanager
def signal_dumps(machine: "Machine", args: argparse.Namespace) -> "Iterator[None]":
    """While the VM runs, SIGUSR2 writes a live dump (on a thread of its own: the signal
    arrives on vCPU 0's thread, which must go on to be held and let go)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    directory = args.dump_on_crash or Path(".")
    count = [0]
    threads: list[threading.Thread] = []

    def on_signal(signum: int, frame: object) -> None:
        count[0] += 1
        path = directory / f"leanvm-{os.getpid()}-{count[0]}.{_extension(args.dump_format)}"
        thread = threading.Thread(target=_write, args=(machine, path, args),
                                  name="leanvm-signal-dump", daemon=True)
        threads.append(thread)
        thread.start()

    saved = signal.signal(signal.SIGUSR2, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, saved)
        for thread in threads:
            thread.join()
