"""Turns what the machine sees into timeline events: debug-console and serial lines (each
timestamped at its first byte), fw_cfg transfers, probes, the kernel entry.

Machine calls these only when its tracer is enabled (one attribute check per site)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from leanvm.trace.events import BUILTIN_PROBES, Tracer
from leanvm.trace.phases import CONSOLE_LINES, FIRMWARE_LINES, FW_CFG_SPANS, LineMatcher

if TYPE_CHECKING:
    from leanvm.devices.fw_cfg import Transfer
    from leanvm.machine.machine import Machine
    from leanvm.machine.vcpu_loop import Stop

MAX_LINE = 240  # longer lines are cut in the trace (not on the console)


class _Lines:
    """Bytes -> lines, each stamped when its first byte arrived."""

    __slots__ = ("buffer", "started")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.started = 0

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        done = []
        for byte in data:
            if not self.buffer and not self.started:
                self.started = time.monotonic_ns()
            if byte == 0x0A:
                text = self.buffer.decode(errors="replace").rstrip("\r")
                done.append((self.started, text))
                self.buffer.clear()
                self.started = 0
            elif len(self.buffer) < MAX_LINE:
                self.buffer.append(byte)
        return done


class BootTrace:
    def __init__(self, tracer: Tracer, probe_names: dict[int, str] | None = None) -> None:
        self.tracer = tracer
        tracer.probe_names = {**BUILTIN_PROBES, **(probe_names or {})}
        self.probe = tracer.probe  # the device calls the tracer directly: (id, args)
        self._debug = _Lines()
        self._serial = _Lines()
        self._firmware = LineMatcher(FIRMWARE_LINES)
        self._console = LineMatcher(CONSOLE_LINES)
        self._first_serial = False
        self.phases: dict[str, int] = {}  # console phase -> when its line began (ns)

    def debugcon(self, data: bytes) -> None:
        for ts, line in self._debug.feed(data):
            self.tracer.instant("debugcon", line, ts=ts)
            phase = self._firmware.match(line)
            if phase is not None:
                self.tracer.instant("firmware", phase, ts=ts, args={"line": line})

    def serial(self, data: bytes) -> None:
        if not self._first_serial and data:
            self._first_serial = True
            self.tracer.instant("guest", "first serial byte")
        for ts, line in self._serial.feed(data):
            self.tracer.instant("console", line, ts=ts)
            phase = self._console.match(line)
            if phase is not None:
                self.phases[phase] = ts
                self.tracer.instant("guest", phase, ts=ts, args={"line": line})

    def fw_cfg(self, transfer: "Transfer") -> None:
        phase = FW_CFG_SPANS.get(transfer.name)
        args = {"bytes": transfer.bytes, "dma": transfer.dma}
        if phase is not None:
            self.tracer.span("fw_cfg", phase, transfer.start_ns, transfer.end_ns, args)
        else:
            self.tracer.span("fw_cfg-item", f"read {transfer.name}", transfer.start_ns,
                             transfer.end_ns, args)


def trace_run(machine: "Machine", first_entry: int, stopped: int, stop: "Stop") -> None:
    """After a run: RIP samples, the guest's own decompression (bzImage boots), the first
    entry, the kernel entry, the shutdown request and the stop, on the timeline."""
    sampler = machine.sampler
    if sampler is not None:
        sampler.resolve(machine.config.symbols, machine.config.kernel)
    tracer = machine.tracer
    if not tracer.enabled:
        return
    if sampler is not None:
        from leanvm.machine.sampler import add_to_trace

        add_to_trace(tracer, sampler.samples, sampler.symbols, sampler.sample_vcpus)
    built = machine.built
    boot_trace = machine._boot_trace
    if built is not None and built.direct_boot is not None and boot_trace is not None:
        from leanvm.machine.direct_boot import note_guest_decompression

        note_guest_decompression(built.direct_boot, built.kernel_file, boot_trace.phases,
                                 tracer)
    tracer.instant("vmm", "first vCPU entry", ts=first_entry)
    hit = built.entry_trap.hit if built is not None and built.entry_trap is not None else None
    if hit is not None:
        tracer.instant("vmm", "kernel entry", ts=hit.time_ns,
                       args={"address": f"{hit.address:#x}"})
    tracer.instant("vmm", "shutdown request", ts=machine._control.requested_ns or stopped,
                   args={"reason": stop.reason.value})
    tracer.instant("vmm", "stop", ts=stopped)


def start_tracing(machine: "Machine") -> None:
    """Record the timeline from now on (QMP x-leanvm-trace-start), also on a machine made
    without trace=True: VMM events, console phases and the guest's probes."""
    tracer = machine.tracer
    if machine._boot_trace is None:
        boot_trace = machine._boot_trace = BootTrace(tracer, dict(machine.config.probe_names))
        machine.consoles.set_boot_trace(boot_trace)
        if machine.built is not None:
            machine.platform.probe.on_probe = boot_trace.probe
    if not tracer.enabled:
        tracer.enabled = True
        tracer.instant("vmm", "trace started")


def stop_tracing(machine: "Machine", path: "str | None") -> int:
    """Stop recording (QMP x-leanvm-trace-stop); with ``path``, write what was recorded
    there first (trace-event JSON for *.json, else JSON lines). The event count."""
    tracer = machine.tracer
    if tracer.enabled:
        tracer.instant("vmm", "trace stopped")
    count = len(machine.trace_events)
    if path is not None:
        from leanvm.fileio import check_output_path

        machine.write_trace(check_output_path(path, "trace"))
    tracer.enabled = False
    if machine.built is not None:
        machine.platform.probe.on_probe = None
    return count
