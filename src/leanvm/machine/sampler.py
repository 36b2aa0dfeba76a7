"""Where the guest's time goes: every vCPU's instruction pointer, sampled at a fixed rate.

A host thread wakes ``hz`` times a second and kicks the vCPUs out of KVM_RUN (immediate_exit
and the kick signal, as a stop request does, but without asking them to stop). Each vCPU
thread, seeing the interrupted run, reads its RIP (one KVM_GET_REGS) and goes on. A guest
that exits on its own between kicks is sampled at its next exit. Nothing runs per exit, so a
VM that is not sampled pays nothing; one that is pays one kick and one ioctl per sample and
vCPU. A vCPU that waits for its start-up IPI or halts is sampled when it next runs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from leanvm.errors import ConfigError, LeanvmError

if TYPE_CHECKING:
    from pathlib import Path

    from leanvm.kvm.vcpu import Vcpu
    from leanvm.trace.events import Tracer
    from leanvm.trace.symbols import Symbols

MAX_HZ = 1000.0
MAX_SAMPLES = 1_000_000


class RipSampler:
    def __init__(self, hz: float, kick: Callable[[], None], vcpus: int = 1) -> None:
        if not 0 < hz <= MAX_HZ:
            raise ConfigError(f"bad sampling rate {hz:g} Hz: expected more than 0 and at most "
                              f"{MAX_HZ:g}")
        self.hz = hz
        self.samples: list[tuple[int, int]] = []  # (CLOCK_MONOTONIC ns, RIP)
        self.sample_vcpus: list[int] = []  # the vCPU of each sample, in the same order
        self.vcpus = vcpus
        self.missed = 0  # samples not taken (the limit, or registers unreadable)
        self.symbols: "Symbols | None" = None  # set by resolve(), after the run
        self.symbol_note = ""
        self._kick = kick
        self._pending: set[int] = set()  # vCPUs whose next interrupted run records a sample
        self._lock = threading.Lock()
        from leanvm.machine.ticker import Ticker

        self._ticker = Ticker(1.0 / hz, self._tick, "leanvm-sampler")

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def _tick(self) -> None:
        self._pending = set(range(self.vcpus))
        self._kick()

    def resolve(self, symbols: "Path | None", kernel: "Path | None") -> None:
        """Find the symbols to name samples with (kernel_symbols); once, after the run."""
        if self.samples and not self.symbol_note:
            self.symbols, self.symbol_note = kernel_symbols(symbols, kernel)

    def top(self, count: int = 10) -> list[tuple[str, int]]:
        return profile(self.samples, self.symbols, count)

    def take(self, vcpu: "Vcpu") -> None:
        """On the vCPU thread, after KVM_RUN was interrupted: record RIP if a sample is due."""
        pending = self._pending
        if vcpu.id not in pending:
            return
        pending.discard(vcpu.id)
        if len(self.samples) >= MAX_SAMPLES:
            self.missed += 1
            return
        try:
            rip = vcpu.get_regs().rip
        except LeanvmError:
            self.missed += 1
            return
        with self._lock:  # vCPU threads sample concurrently; keep the two lists in step
            self.samples.append((time.monotonic_ns(), rip))
            self.sample_vcpus.append(vcpu.id)


def profile(samples: list[tuple[int, int]], symbols: "Symbols | None",
            top: int = 10) -> list[tuple[str, int]]:
    """The ``top`` functions (or, without symbols, 4 KiB pages of guest code) by samples."""
    counts: Counter[str] = Counter()
    for _, rip in samples:
        counts[_where(rip, symbols)] += 1
    return counts.most_common(top)


def _where(rip: int, symbols: "Symbols | None") -> str:
    name = symbols.function(rip) if symbols is not None else None
    return name if name is not None else f"page {rip & ~0xFFF:#x}"


def kernel_symbols(symbols: "Path | None", kernel: "Path | None") -> tuple["Symbols | None", str]:
    """(the symbols to name sampled addresses with, where they came from or why there are
    none). ``symbols`` as the user gave it, else looked for beside ``kernel`` and in
    Debian's places for the version its bzImage header names."""
    from leanvm.trace.symbols import find_symbols, load_symbols

    path = symbols
    if path is None and kernel is not None:
        path = find_symbols(kernel, _bzimage_version(kernel))
    if path is None:
        return None, ("no symbols found (give --symbols System.map; Debian's are in the "
                      "linux-image-*-dbg package)")
    try:
        found = load_symbols(path)
    except LeanvmError as exc:
        return None, str(exc)
    return found, f"symbols from {path}"


def _bzimage_version(kernel: "Path") -> str | None:
    from leanvm.loader.bzimage import HEADER_END, parse_setup_header

    try:
        with open(kernel, "rb") as file:
            head = file.read(1 << 16)  # the header and its version string
            size = file.seek(0, 2)
            if len(head) < HEADER_END:
                return None
            header = parse_setup_header(head, str(kernel), size)
            return header.version or None
    except (OSError, LeanvmError):
        return None


def add_to_trace(tracer: "Tracer", samples: list[tuple[int, int]],
                 symbols: "Symbols | None", vcpus: "list[int] | None" = None) -> None:
    """Each sample as an instant on the timeline (category "sample"), named by function,
    with its vCPU."""
    for index, (ts, rip) in enumerate(samples):
        args: dict[str, object] = {"rip": f"{rip:#x}"}
        if vcpus is not None and index < len(vcpus):
            args["vcpu"] = vcpus[index]
        tracer.instant("sample", _where(rip, symbols), ts=ts, args=args)
