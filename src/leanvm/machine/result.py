"""What a run gives back: RunState, RunResult (everything the CLI prints, as data) and the
exit code a stop maps to."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from leanvm.machine.vcpu_loop import StopReason

if TYPE_CHECKING:
    from leanvm.machine.entry_trap import KernelEntry
    from leanvm.machine.machine import Machine
    from leanvm.machine.stats import StatsSource
    from leanvm.machine.vcpu_loop import LoopControl, Stop

EXIT_STATUS_TOO_LARGE = 4  # the guest's exit status does not fit a process exit code


class RunState(Enum):
    CREATED = "created"  # configured, nothing allocated
    READY = "ready"  # built: memory, devices, vCPU in place; not started
    RUNNING = "running"
    STOPPED = "stopped"  # the guest stopped; memory can still be inspected
    CLOSED = "closed"  # all resources released


class DeviceAccesses:
    """Accesses that reached the buses, and how many no device claimed."""

    __slots__ = ("pio", "pio_unclaimed", "mmio", "mmio_unclaimed")

    def __init__(self, pio: int, pio_unclaimed: int, mmio: int, mmio_unclaimed: int) -> None:
        self.pio, self.pio_unclaimed = pio, pio_unclaimed
        self.mmio, self.mmio_unclaimed = mmio, mmio_unclaimed


class SampleSummary:
    """RIP sampling (--sample-rip), for people: the rate, what was sampled, the top places
    (``note``: where the symbols came from, or why there are none)."""

    __slots__ = ("hz", "vcpus", "count", "note", "top")

    def __init__(self, hz: float, vcpus: int, count: int, note: str,
                 top: tuple[tuple[str, int], ...]) -> None:
        self.hz, self.vcpus, self.count, self.note, self.top = hz, vcpus, count, note, top


class RunResult(NamedTuple):
    reason: StopReason
    detail: str
    status: int | None  # the guest's exit status (GUEST_EXIT), the signal (INTERRUPTED)
    exits: int  # vCPU exits handled
    rip: int | None  # where the vCPU stopped, when known
    process_start_ns: int
    first_entry_ns: int  # just before the first KVM_RUN
    stopped_ns: int
    kernel_entry: "KernelEntry | None" = None  # firmware boots: when it entered the kernel
    source: "StatsSource | None" = None  # the rest of stats(), from the machine
    # what the summary prints besides the above
    name: str = ""  # -name
    boot_note: str = ""  # direct boots: how the kernel was prepared and placed
    kernel_entry_point: int | None = None  # direct boots: the kernel's entry address
    cmdline_added: tuple[str, ...] = ()  # what the emulated CPU profile added
    kernel_expected: bool = False  # firmware with -kernel: an entry was to be caught
    accesses: DeviceAccesses | None = None
    fallback_summary: str = ""  # the emulation fallback's one line, if it ran
    samples: SampleSummary | None = None
    ends_mid_line: bool = False  # the guest's last console line on the terminal is unfinished
    exit_kinds: "dict[str, int] | None" = None  # pio-out, pio-in, mmio-write, mmio-read, ...
    busiest: tuple[tuple[str, int], ...] = ()  # ("port 0x3f8 (com1)", exits), most first
    coalesced: int = 0  # writes KVM queued instead of exiting (the serial console's)

    @property
    def to_kernel_entry_ms(self) -> float | None:
        if self.kernel_entry is None:
            return None
        return (self.kernel_entry.time_ns - self.process_start_ns) / 1e6

    @property
    def to_first_instruction_ms(self) -> float:
        return (self.first_entry_ns - self.process_start_ns) / 1e6

    @property
    def to_stop_ms(self) -> float:
        return (self.stopped_ns - self.process_start_ns) / 1e6

    @property
    def exit_code(self) -> int:
        """Process exit code for the CLI: 0 for a reset, a power-off or a QMP quit, the guest's status for
        its exit port (4 when it does not fit), 124 on timeout, 128 + N for signal N (130
        for Ctrl-C), 3 when the guest failed."""
        if self.reason in (StopReason.RESET, StopReason.NO_BOOT_DEVICE, StopReason.CONSOLE_MATCH,
                           StopReason.POWEROFF, StopReason.QUIT):
            return 0
        if self.reason is StopReason.GUEST_EXIT:
            status = self.status or 0
            return status if 0 <= status <= 255 else EXIT_STATUS_TOO_LARGE
        if self.reason is StopReason.TIMEOUT:
            return 124
        if self.reason is StopReason.INTERRUPTED:
            return 128 + self.status if self.status else 130
        return 3

    def stats(self) -> "dict[str, Any]":
        """Every figure of the run as plain data, the same as `leanvm run --stats-json`
        writes (docs/stats.md: fields, units, ``schema``). Host memory is measured when
        first asked, so ask before closing the machine: afterwards those fields are None."""
        from leanvm.machine.stats import SCHEMA

        entry = self.kernel_entry
        data: "dict[str, Any]" = {
            "schema": SCHEMA, "reason": self.reason.value, "detail": self.detail,
            "status": self.status, "exit_code": self.exit_code, "exits": self.exits,
            "rip": self.rip, "process_start_ns": self.process_start_ns,
            "first_entry_ns": self.first_entry_ns, "stopped_ns": self.stopped_ns,
            "to_first_instruction_ms": self.to_first_instruction_ms,
            "to_stop_ms": self.to_stop_ms,
            "kernel_entry": None if entry is None else {
                "address": entry.address, "cs": entry.cs, "rip": entry.rip,
                "time_ns": entry.time_ns},
        }
        if self.source is not None:
            data.update(self.source.get())
        return data


def result_of(machine: "Machine", control: "LoopControl", stop: "Stop", first_entry: int,
              stopped: int) -> RunResult:
    """The RunResult of ``machine``'s run that ended with ``stop``: where the stopping vCPU
    was, and everything the summary prints, gathered now while the parts are at hand."""
    from leanvm.errors import LeanvmError
    from leanvm.machine.stats import StatsSource
    from leanvm.machine.vcpu_loop import Stop

    rip = None
    if stop.reason in (StopReason.INTERNAL_ERROR, StopReason.SHUTDOWN, StopReason.UNHANDLED):
        stopper = getattr(control, "stopped_by", None) or 0  # SMP: which vCPU
        try:
            rip = machine.vcpus[stopper].get_regs().rip
        except LeanvmError:
            rip = None
        if stop.reason is StopReason.INTERNAL_ERROR and stop.exit is not None:
            where = f"vCPU {stopper}: " if stopper else ""
            stop = Stop(stop.reason, where + stop.exit.describe(rip), exit=stop.exit)  # type: ignore[union-attr]
    pio, mmio, trap, sampler = (machine.platform.pio, machine.platform.mmio, machine.entry_trap,
                                machine.sampler)
    samples = None if sampler is None else SampleSummary(
        sampler.hz, sampler.vcpus, len(sampler.samples), sampler.symbol_note,
        tuple(sampler.top(10)))
    fallback = machine.fallback
    direct = machine.direct_boot
    return RunResult(
        stop.reason, stop.detail, stop.status, control.exits, rip, machine.process_start_ns,
        first_entry, stopped, trap.hit if trap is not None else None, StatsSource(machine),
        machine.config.name, machine.kernel_boot_note,
        direct.kernel.entry if direct is not None else None, machine.cmdline_added,
        machine.kernel is not None,
        DeviceAccesses(pio.accesses, pio.unclaimed_reads + pio.unclaimed_writes,
                       mmio.accesses, mmio.unclaimed_reads + mmio.unclaimed_writes),
        fallback.summary() if fallback is not None and fallback.total else "", samples,
        machine.consoles.ends_mid_line(), control.counts.kinds(), _busiest(control, pio, mmio),
        ring.consumed if (ring := control.ring) is not None else 0)


def _busiest(control: "LoopControl", pio: Any, mmio: Any, top: int = 5
             ) -> tuple[tuple[str, int], ...]:
    from leanvm.machine.stats import exits_by_place

    places = exits_by_place(control.counts, pio, mmio, top)
    named = []
    for row in places["ports"]:
        named.append((f"port {row['port']}" + (f" ({row['device']})" if row["device"] else ""),
                      row["out"] + row["in"]))
    for row in places["mmio"]:
        named.append((f"MMIO {row['address']}" + (f" ({row['device']})" if row["device"] else ""),
                      row["writes"] + row["reads"]))
    return tuple(sorted(named, key=lambda item: -item[1])[:top])
