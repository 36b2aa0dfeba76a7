"""Controlling a machine from outside its vCPUs, as QMP does: pause and resume, the ACPI power
button, quit, reset, the run status by QEMU's names, and the events each of these sends.

Machine inherits this. Every method may be called from any thread but a vCPU's. A pause
holds every vCPU in the pause gate (machine/pause.py) until ``resume``; a machine started
paused (``run(paused=True)``, QEMU's -S) is in "prelaunch" until its first ``resume``.
leanvm stops at a reset, as QEMU does with -no-reboot: ``reset()`` ends the run with a
SHUTDOWN event (reason host-qmp-system-reset), as QEMU's system_reset does then.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from leanvm.errors import LeanvmError, QmpError
from leanvm.machine.events import MachineEvents
from leanvm.machine.result import RunState
from leanvm.machine.vcpu_loop import Stop, StopReason

if TYPE_CHECKING:
    from leanvm.machine.pause import PauseGate
    from leanvm.machine.result import RunResult
    from leanvm.machine.vcpu_loop import LoopControl

# SHUTDOWN's reason (QEMU's ShutdownCause) for each way a run ends
GUEST_CAUSES = {StopReason.POWEROFF: "guest-shutdown", StopReason.GUEST_EXIT: "guest-shutdown",
                StopReason.HALT: "guest-shutdown", StopReason.RESET: "guest-reset",
                StopReason.SHUTDOWN: "guest-reset", StopReason.GUEST_PANIC: "guest-panic"}
HOST_CAUSES = {StopReason.QUIT: "host-qmp-quit", StopReason.INTERRUPTED: "host-signal",
               StopReason.TIMEOUT: "host-signal", StopReason.CONSOLE_MATCH: "host-signal"}
FAILED = (StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY, StopReason.UNHANDLED,
          StopReason.SYSTEM_EVENT)


class MachineControl:
    """Base of Machine: pause/resume, power button, quit, reset, status, events."""

    state: RunState
    result: "RunResult | None"
    pause_gate: "PauseGate"
    _control: "LoopControl"

    def _init_control(self) -> None:
        self.events = MachineEvents()
        self._pause_lock = threading.Lock()
        self._paused = False  # held by pause() until resume()
        self._prelaunch = False  # started paused, never resumed yet
        self._host_cause: str | None = None  # why the host stopped it, if it did over QMP
        self.launched_ns = 0  # CLOCK_MONOTONIC when a VM started paused was first resumed

    @property
    def paused(self) -> bool:
        """Whether the vCPUs are held (pause(), or started paused and not yet resumed)."""
        return self._paused or self._prelaunch

    @property
    def status(self) -> str:
        """The run status by QEMU's names: prelaunch, running, paused, shutdown,
        guest-panicked, internal-error."""
        if self.state in (RunState.CREATED, RunState.READY) or (
                self.state is RunState.RUNNING and self._prelaunch):
            return "prelaunch"
        if self.state is RunState.RUNNING:
            return "paused" if self._paused else "running"
        reason = self.result.reason if self.result is not None else None
        if reason is StopReason.GUEST_PANIC:
            return "guest-panicked"
        if reason in FAILED:
            return "internal-error"
        return "shutdown"

    def pause(self) -> bool:
        """Hold every vCPU until resume() (QMP stop); a STOP event. False if the VM was not
        running (already paused, not started, or stopped)."""
        with self._pause_lock:
            if self.state is not RunState.RUNNING or self.paused or self._control.stop:
                return False
            self.pause_gate.hold(self._control)
            self._paused = True
        self.events.emit("STOP")
        return True

    def resume(self) -> bool:
        """Let held vCPUs run again (QMP cont); a RESUME event. False if they were not held;
        QmpError if the VM has stopped or was never started."""
        with self._pause_lock:
            if self.state is not RunState.RUNNING or self._control.stop is not None:
                if self.state in (RunState.CREATED, RunState.READY):
                    raise QmpError("the VM has not been started: call Machine.run() or "
                                   "start() (paused=True to wait for cont)")
                raise QmpError(f"the VM has stopped ({self.status}): it cannot continue")
            if not self.paused:
                return False
            if self._prelaunch:
                self.launched_ns = time.monotonic_ns()
            self._paused = self._prelaunch = False
            self.pause_gate.release()
        self.events.emit("RESUME")
        return True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Every vCPU out of the guest for the length of the block (a running VM pauses
        for it, a paused or stopped one is already still)."""
        running = self.state is RunState.RUNNING and self._control.stop is None
        if running:
            self.pause_gate.hold(self._control)
        try:
            yield
        finally:
            if running:
                self.pause_gate.release()

    def powerdown(self) -> None:
        """Press the ACPI power button (QMP system_powerdown): PWRBTN_STS and an SCI if the
        guest enabled it. A POWERDOWN event; the guest decides whether to power off."""
        if self.state is RunState.CLOSED:
            raise LeanvmError("the machine is closed")
        pm = self.platform.acpi_pm  # type: ignore[attr-defined]
        with self.held():
            pm.press_power_button()
        self.events.emit("POWERDOWN")

    def quit(self) -> None:
        """End the run (QMP quit): the vCPUs stop, even paused ones; SHUTDOWN follows."""
        self._host_cause = self._host_cause or "host-qmp-quit"
        self._control.request(Stop(StopReason.QUIT, "a QMP client asked to quit"))

    def reset(self) -> None:
        """QMP system_reset: leanvm stops at a reset (QEMU's -no-reboot behaviour)."""
        self._host_cause = self._host_cause or "host-qmp-system-reset"
        self._control.request(Stop(StopReason.RESET, "system_reset over QMP (leanvm stops at "
                                   "a reset, as QEMU with -no-reboot)"))

    def execute(self, command: str, arguments: "dict[str, Any] | None" = None) -> Any:
        """Run a QMP command in process: what its reply's "return" holds, or QmpError with
        QEMU's error class (docs/qmp.md lists the commands)."""
        from leanvm.machine.qmp.commands import execute

        return execute(self, command, arguments or {})  # type: ignore[arg-type]

    def _start_paused(self) -> None:
        self._prelaunch = True
        self.pause_gate.hold_before_start()

    def _emit_stop_events(self, stop: Stop) -> None:
        """At the end of a run: GUEST_PANICKED for a panic, then SHUTDOWN with its cause."""
        if self._paused or self._prelaunch:
            self._paused = self._prelaunch = False
            self.pause_gate.release()
        if stop.reason is StopReason.GUEST_PANIC:
            self.events.emit("GUEST_PANICKED", {"action": "poweroff"})
        if stop.reason is StopReason.RESET and self._host_cause:
            cause = self._host_cause
        else:
            cause = (GUEST_CAUSES.get(stop.reason) or HOST_CAUSES.get(stop.reason)
                     or "host-error")
        self.events.emit("SHUTDOWN", {"guest": cause.startswith("guest"), "reason": cause})
