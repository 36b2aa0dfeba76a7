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
from typing import NamedTuple
from enum import Enum

from leanvm.abi import kvm as abi
from leanvm.devices.bus import Bus
from leanvm.kvm import exits as ex
from leanvm.kvm.vcpu import EXIT_HEADER, Vcpu


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


KICK_SIGNAL = signal.SIGUSR1  # interrupts a vCPU's KVM_RUN (kvm/vcpu.py bind_kick_signal)


class Stop(NamedTuple):
    reason: StopReason
    detail: str
    status: int | None = None  # the guest's exit status, for GUEST_EXIT
    exit: ex.Exit | None = None


class LoopControl:
    """Shared between the loop and whoever may stop it (devices, timers, other threads).

    Any thread may ``request`` a stop or ``kick`` the vCPUs: each loop registers its vCPU and
    thread here while it runs (``enter``/``leave``), and a kick sends that thread the kick
    signal, which interrupts KVM_RUN even for a guest that never exits on its own."""

    __slots__ = ("stop", "exits", "on_emulation_failure", "on_interrupt", "requested_ns",
                 "_lock", "_running")

    def __init__(self) -> None:
        self.stop: Stop | None = None
        self.requested_ns = 0  # CLOCK_MONOTONIC when the stop was requested
        self.exits = 0
        # Called with the vCPU and the exit; True means it was handled and the vCPU goes on.
        self.on_emulation_failure: Callable[[Vcpu, ex.InternalError], bool] | None = None
        # Called with the vCPU when a kick interrupted KVM_RUN without a stop (the sampler).
        self.on_interrupt: Callable[[Vcpu], None] | None = None
        self._lock = threading.Lock()
        # vCPU id -> (thread ident, vCPU, undo of its kick binding) while its loop runs
        self._running: dict[int, tuple[int, Vcpu, Callable[[], None]]] = {}

    def request(self, stop: Stop) -> None:
        """Stop the loop(s) with ``stop`` (the first request wins), from any thread."""
        with self._lock:
            if self.stop is not None:
                return
            self.requested_ns = time.monotonic_ns()
            self.stop = stop
        self.kick()

    def enter(self, vcpu: Vcpu) -> None:
        """The calling thread runs ``vcpu`` from now on; kicks reach it."""
        unbind = vcpu.bind_kick_signal(KICK_SIGNAL)
        with self._lock:
            self._running[vcpu.id] = (threading.get_ident(), vcpu, unbind)

    def leave(self, vcpu: Vcpu) -> None:
        """``vcpu``'s loop ended: no more kicks for its thread (pending ones are dropped)."""
        with self._lock:
            entry = self._running.pop(vcpu.id, None)
        if entry is not None:
            entry[2]()

    def kick(self, vcpu_id: int | None = None) -> None:
        """Interrupt the KVM_RUN of every running vCPU (or of ``vcpu_id``) once; each loop
        then stops if a stop was requested, else goes on (``on_interrupt`` sees it)."""
        with self._lock:
            for index, (thread, vcpu, _) in self._running.items():
                if vcpu_id is None or index == vcpu_id:
                    vcpu.request_stop()  # a KVM_RUN about to start returns at once
                    signal.pthread_kill(thread, KICK_SIGNAL)  # one in progress returns EINTR


def run_loop(vcpu: Vcpu, pio: Bus, mmio: Bus, control: LoopControl) -> Stop:
    ioctl, fd, page, kvm_run = fcntl.ioctl, vcpu.fd, vcpu.run_view, abi.KVM_RUN
    header, header_at = EXIT_HEADER.unpack_from, abi.RUN_EXIT_REASON
    exit_io, io_out = abi.KVM_EXIT_IO, abi.KVM_EXIT_IO_OUT
    pio_read, pio_write = pio.read, pio.write
    mmio_read, mmio_write = mmio.read, mmio.write
    from_bytes = int.from_bytes
    IoOut, IoIn, MmioRead, MmioWrite = ex.IoOut, ex.IoIn, ex.MmioRead, ex.MmioWrite
    exits = 0
    control.enter(vcpu)
    try:
        while control.stop is None:
            exits += 1
            try:
                ioctl(fd, kvm_run, 0)
            except OSError as exc:
                exit_ = vcpu.run_failed(exc)
            else:
                # The commonest exit, one OUT, goes to its device without building an Exit.
                reason, direction, size, port, count, offset = header(page, header_at)
                if reason == exit_io and direction == io_out and count == 1:
                    pio_write(port, size, from_bytes(page[offset:offset + size], "little"))
                    continue
                exit_ = vcpu.decode()
            kind = type(exit_)
            if kind is IoOut:
                size = exit_.size
                if exit_.count == 1:
                    pio_write(exit_.port, size, from_bytes(exit_.data, "little"))
                else:
                    data = exit_.data
                    for i in range(0, size * exit_.count, size):
                        pio_write(exit_.port, size, from_bytes(data[i:i + size], "little"))
            elif kind is IoIn:
                size = exit_.size
                vcpu.complete_io_in(exit_, b"".join(
                    pio_read(exit_.port, size).to_bytes(size, "little")
                    for _ in range(exit_.count)))
            elif kind is MmioWrite:
                mmio_write(exit_.address, exit_.size, from_bytes(exit_.data, "little"))
            elif kind is MmioRead:
                size = exit_.size
                vcpu.complete_mmio_read(mmio_read(exit_.address, size).to_bytes(size, "little"))
            else:
                stop = _other_exit(vcpu, exit_, control)
                if stop is not None:
                    control.request(stop)
    finally:
        control.leave(vcpu)
        control.exits += exits
    return control.stop


def _other_exit(vcpu: Vcpu, exit_: ex.Exit, control: LoopControl) -> Stop | None:
    if isinstance(exit_, ex.Interrupted):
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
