"""The vCPU loop: turn KVM exits into bus reads and writes until something stops the VM.

This is the hottest code in leanvm: one iteration per guest exit. It binds what it calls to
locals, tests the common exits first, and checks one attribute to learn whether a device
asked to stop.
"""

from __future__ import annotations

import fcntl
import signal
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from leanvm.abi import kvm as abi
from leanvm.devices.bus import Bus
from leanvm.kvm import exits as ex
from leanvm.kvm.vcpu import EXIT_HEADER, Vcpu

if TYPE_CHECKING:
    from leanvm.kvm.coalesced import CoalescedRing
    from leanvm.machine.pause import PauseGate


class StopReason(Enum):
    RESET = "reset"  # the guest asked for a reset (i8042 0xFE, output port)
    POWEROFF = "poweroff"  # the guest powered off (ACPI S5: SLP_EN in PM1a_CNT)
    GUEST_EXIT = "guest-exit"  # the guest wrote its status to the exit port
    HALT = "halt"  # HLT with nothing to wake the vCPU (no in-kernel irqchip)
    SHUTDOWN = "shutdown"  # triple fault
    INTERNAL_ERROR = "internal-error"  # KVM could not go on (e.g. emulation failure)
    FAIL_ENTRY = "fail-entry"  # the hardware refused to enter the guest
    SYSTEM_EVENT = "system-event"  # KVM reported a reset/shutdown/crash event
    TIMEOUT = "timeout"  # the host's time limit ran out
    INTERRUPTED = "interrupted"  # the host asked to stop (Ctrl-C, API)
    UNHANDLED = "unhandled-exit"  # an exit leanvm does not handle
    NO_BOOT_DEVICE = "no-boot-device"  # the firmware found nothing to boot
    CONSOLE_MATCH = "console-match"  # the serial output showed what run(until=...) waited for
    GUEST_PANIC = "guest-panic"  # the guest kernel printed "Kernel panic - not syncing"
    QUIT = "quit"  # a QMP client asked the VM to quit


KICK_SIGNAL = signal.SIGUSR1  # interrupts a vCPU's KVM_RUN (kvm/vcpu.py bind_kick_signal)


class Stop(NamedTuple):
    reason: StopReason
    detail: str
    status: int | None = None  # the guest's exit status, for GUEST_EXIT
    exit: ex.Exit | None = None


MAX_COUNTED = 1024  # distinct ports or addresses counted one by one; the rest go to OTHER
OTHER = -1


class ExitCounts:
    """Exits by kind, and port I/O and MMIO exits by port and address (each table bounded:
    a guest walking addresses adds to one ``OTHER`` entry beyond MAX_COUNTED)."""

    __slots__ = ("out_ports", "in_ports", "mmio_writes", "mmio_reads", "others")

    def __init__(self) -> None:
        self.out_ports: dict[int, int] = {}
        self.in_ports: dict[int, int] = {}
        self.mmio_writes: dict[int, int] = {}
        self.mmio_reads: dict[int, int] = {}
        self.others: dict[str, int] = {}  # exit kind (hlt, interrupted, ...) -> count

    def add(self, other: "ExitCounts") -> None:
        """Fold another vCPU's counts into these."""
        for name in ("out_ports", "in_ports", "mmio_writes", "mmio_reads", "others"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key, value in theirs.items():
                count(mine, key, value)

    def kinds(self) -> dict[str, int]:
        """Exits by kind: port out and in, MMIO write and read, then the rest."""
        kinds = {"pio-out": sum(self.out_ports.values()), "pio-in": sum(self.in_ports.values()),
                 "mmio-write": sum(self.mmio_writes.values()),
                 "mmio-read": sum(self.mmio_reads.values())}
        kinds.update(self.others)
        return {kind: n for kind, n in kinds.items() if n}


def count(table: dict, key: object, n: int = 1) -> None:
    """``table[key] += n``, within MAX_COUNTED keys (beyond: ``table[OTHER]``)."""
    if key in table or len(table) < MAX_COUNTED:
        table[key] = table.get(key, 0) + n
    else:
        table[OTHER] = table.get(OTHER, 0) + n


class LoopControl:
    """Shared between the loop and whoever may stop it (devices, timers, other threads).

    Any thread may ``request`` a stop or ``kick`` the vCPUs: each loop registers its vCPU and
    thread here while it runs (``enter``/``leave``), and a kick sends that thread the kick
    signal, which interrupts KVM_RUN even for a guest that never exits on its own."""

    __slots__ = ("stop", "exits", "on_emulation_failure", "on_interrupt", "requested_ns",
                 "_lock", "_running", "counts", "ring", "gate", "thread_ids")

    def __init__(self) -> None:
        self.stop: Stop | None = None
        self.requested_ns = 0  # CLOCK_MONOTONIC when the stop was requested
        self.exits = 0
        self.counts = ExitCounts()  # exits by kind, port and address
        # KVM's coalesced I/O ring (kvm/coalesced.py), emptied before every exit is handled
        self.ring: "CoalescedRing | None" = None
        # Called with the vCPU and the exit; True means it was handled and the vCPU goes on.
        self.on_emulation_failure: Callable[[Vcpu, ex.InternalError], bool] | None = None
        # Called with the vCPU when a kick interrupted KVM_RUN without a stop (the sampler).
        self.on_interrupt: Callable[[Vcpu], None] | None = None
        # Where a kicked vCPU waits while the VMM holds every vCPU still (machine/pause.py)
        self.gate: "PauseGate | None" = None
        self._lock = threading.Lock()
        # vCPU id -> (thread ident, vCPU, undo of its kick binding) while its loop runs
        self._running: dict[int, tuple[int, Vcpu, Callable[[], None]]] = {}
        self.thread_ids: dict[int, int] = {}  # vCPU id -> its thread's native id (last run)

    def request(self, stop: Stop) -> None:
        """Stop the loop(s) with ``stop`` (the first request wins), from any thread."""
        with self._lock:
            if self.stop is not None:
                return
            self.requested_ns = time.monotonic_ns()
            self.stop = stop
        self.kick()
        if self.gate is not None:  # parked vCPUs leave to stop
            self.gate.wake()

    def enter(self, vcpu: Vcpu) -> None:
        """The calling thread runs ``vcpu`` from now on; kicks reach it."""
        unbind = vcpu.bind_kick_signal(KICK_SIGNAL)
        with self._lock:
            self._running[vcpu.id] = (threading.get_ident(), vcpu, unbind)
            self.thread_ids[vcpu.id] = threading.get_native_id()

    def leave(self, vcpu: Vcpu) -> None:
        """``vcpu``'s loop ended: no more kicks for its thread (pending ones are dropped)."""
        with self._lock:
            entry = self._running.pop(vcpu.id, None)
        if entry is not None:
            entry[2]()

    def running(self) -> dict[int, int]:
        """vCPU id -> thread ident of every vCPU whose loop runs now."""
        with self._lock:
            return {index: entry[0] for index, entry in self._running.items()}

    def kick(self, vcpu_id: int | None = None) -> None:
        """Interrupt the KVM_RUN of every running vCPU (or of ``vcpu_id``) once; each loop
        then stops if a stop was requested, else goes on (``on_interrupt`` sees it)."""
        with self._lock:
            for index, (thread, vcpu, _) in self._running.items():
                if vcpu_id is None or index == vcpu_id:
                    vcpu.request_stop()  # a KVM_RUN about to start returns at once
                    signal.pthread_kill(thread, KICK_SIGNAL)  # one in progress returns EINTR


KIND_NAMES = {ex.Hlt: "hlt", ex.Shutdown: "shutdown", ex.Interrupted: "interrupted",
              ex.FailEntry: "fail-entry", ex.SystemEvent: "system-event",
              ex.InternalError: "internal-error", ex.Unknown: "unknown"}


def run_loop(vcpu: Vcpu, pio: Bus, mmio: Bus, control: LoopControl) -> Stop:
    ioctl, fd, page, kvm_run = fcntl.ioctl, vcpu.fd, vcpu.run_view, abi.KVM_RUN
    header, header_at = EXIT_HEADER.unpack_from, abi.RUN_EXIT_REASON
    exit_io, io_out = abi.KVM_EXIT_IO, abi.KVM_EXIT_IO_OUT
    pio_read, pio_write = pio.read, pio.write
    from_bytes = int.from_bytes
    counts = control.counts
    out_ports, out_get = counts.out_ports, counts.out_ports.get
    in_ports, in_get = counts.in_ports, counts.in_ports.get
    limit = MAX_COUNTED
    ring = control.ring
    pending = ring.pending if ring is not None else None

    def deliver(port_io: bool, address: int, size: int, value: int) -> None:
        (pio_write if port_io else mmio.write)(address, size, value)

    exits = 0
    control.enter(vcpu)
    try:
        if control.gate is not None and control.gate.held:  # started paused (-S)
            control.gate.park(vcpu, control)
        while control.stop is None:
            exits += 1
            try:
                ioctl(fd, kvm_run, 0)
            except OSError as exc:
                exit_ = vcpu.run_failed(exc)
                if pending is not None and pending():  # a kick to empty the queue (halted)
                    ring.drain(deliver)  # type: ignore[union-attr]
            else:
                if pending is not None and pending():  # queued writes first, in order
                    ring.drain(deliver)  # type: ignore[union-attr]
                # The commonest exits, one OUT or one IN, go to their device straight from
                # the run page, without building an Exit.
                reason, direction, size, port, count, offset = header(page, header_at)
                if reason == exit_io and count == 1:
                    if direction == io_out:
                        pio_write(port, size, from_bytes(page[offset:offset + size], "little"))
                        table, seen = out_ports, out_get(port)
                    else:
                        page[offset:offset + size] = pio_read(port, size).to_bytes(size, "little")
                        table, seen = in_ports, in_get(port)
                    if seen is not None:
                        table[port] = seen + 1
                    elif len(table) < limit:
                        table[port] = 1
                    else:
                        table[OTHER] = table.get(OTHER, 0) + 1
                    continue
                exit_ = vcpu.decode()
            _decoded_exit(vcpu, exit_, pio, mmio, control)
    finally:
        if ring is not None:  # nothing the guest wrote is lost at the stop
            ring.drain(deliver)
        control.leave(vcpu)
        control.exits += exits
    return control.stop


def _decoded_exit(vcpu: Vcpu, exit_: ex.Exit, pio: Bus, mmio: Bus, control: LoopControl) -> None:
    """Every exit but a single OUT or IN: string port I/O, MMIO, and the rest."""
    kind, counts, from_bytes = type(exit_), control.counts, int.from_bytes
    if kind is ex.IoOut:
        size = exit_.size
        count(counts.out_ports, exit_.port)
        data = exit_.data
        for i in range(0, size * exit_.count, size):
            pio.write(exit_.port, size, from_bytes(data[i:i + size], "little"))
    elif kind is ex.IoIn:
        size = exit_.size
        count(counts.in_ports, exit_.port)
        vcpu.complete_io_in(exit_, b"".join(pio.read(exit_.port, size).to_bytes(size, "little")
                                            for _ in range(exit_.count)))
    elif kind is ex.MmioWrite:
        count(counts.mmio_writes, exit_.address)
        mmio.write(exit_.address, exit_.size, from_bytes(exit_.data, "little"))
    elif kind is ex.MmioRead:
        size = exit_.size
        count(counts.mmio_reads, exit_.address)
        vcpu.complete_mmio_read(mmio.read(exit_.address, size).to_bytes(size, "little"))
    else:
        count(counts.others, KIND_NAMES.get(kind, kind.__name__))
        stop = _other_exit(vcpu, exit_, control)
        if stop is not None:
            control.request(stop)


def _other_exit(vcpu: Vcpu, exit_: ex.Exit, control: LoopControl) -> Stop | None:
    if isinstance(exit_, ex.Interrupted):
        gate = control.gate
        if gate is not None:
            gate.park(vcpu, control)  # held still (a live dump's copy, QMP stop)
        hook = control.on_interrupt
        if hook is not None:
            hook(vcpu)
        return control.stop  # a stray signal, with no stop requested, just resumes the guest
    if isinstance(exit_, ex.Hlt):
        return Stop(StopReason.HALT, "the guest halted with nothing to wake it", exit=exit_)
    if isinstance(exit_, ex.Shutdown):
        return Stop(StopReason.SHUTDOWN, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)", exit=exit_)
    if isinstance(exit_, ex.InternalError):
        handler = control.on_emulation_failure
        if handler is not None and handler(vcpu, exit_):
            return None
        return Stop(StopReason.INTERNAL_ERROR, exit_.describe(), exit=exit_)
    if isinstance(exit_, ex.FailEntry):
        return Stop(StopReason.FAIL_ENTRY, f"VM entry failed: hardware reason "
                    f"{exit_.hardware_reason:#x} on CPU {exit_.cpu}", exit=exit_)
    if isinstance(exit_, ex.SystemEvent):
        names = {1: "shutdown", 2: "reset", 3: "crash"}
        return Stop(StopReason.SYSTEM_EVENT,
                    f"KVM system event: {names.get(exit_.type, exit_.type)}", exit=exit_)
    if isinstance(exit_, ex.Unknown):
        return Stop(StopReason.UNHANDLED, f"unhandled KVM exit reason {exit_.reason} "
                    f"(hardware reason {exit_.hardware_reason:#x})", exit=exit_)
    return Stop(StopReason.UNHANDLED, f"unhandled exit {exit_!r}", exit=exit_)
