"""Machine: one VM, built from a MachineConfig by machine/boot.py and run until the guest
stops it. It runs, stops, watches the consoles and hands back the result; how the VM is put
together is boot.build's business.

    with Machine(MachineConfig(memory="64M", guest="hello.bin")) as vm:
        result = vm.run(timeout=10)
        print(result.reason, vm.console.decode())
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from leanvm.errors import ConfigError, GuestError, LeanvmError
from leanvm.machine.boot import Built, build, demo_guest_path
from leanvm.machine.config import MachineConfig
from leanvm.machine.control import MachineControl
from leanvm.machine.lifetime import Resources, check_timeout, install_kick_handler
from leanvm.machine.parts import VmParts
from leanvm.machine.result import EXIT_STATUS_TOO_LARGE, RunResult, RunState, result_of
from leanvm.machine.timing import process_start_ns
from leanvm.machine.vcpu_loop import LoopControl, Stop, StopReason, run_loop
from leanvm.trace.events import Tracer

if TYPE_CHECKING:
    import re
    from collections.abc import Callable
    from pathlib import Path

    from leanvm.kvm.vcpu import Vcpu
    from leanvm.machine.flusher import RingFlusher
    from leanvm.machine.host_check import HostFinding
    from leanvm.machine.sampler import RipSampler

STOP_TIMEOUT = 120.0  # seconds for a started machine's vCPUs to stop when its with-block ends

__all__ = ["Machine", "RunResult", "RunState", "EXIT_STATUS_TOO_LARGE", "demo_guest_path"]


class Machine(VmParts, MachineControl):
    """One VM. Build happens on first use (``build()``, ``run()`` or ``with``); its parts
    (``memory``, ``platform``, ``vcpus``, ...) and the device API come from VmParts; pause,
    resume, the power button, status, events and QMP commands (``execute``) from
    MachineControl. With ``qmp="PATH"`` (or QEMU's ``unix:PATH,server=on,wait=off``,
    ``tcp:HOST:PORT,...``) a QMP server listens from build() to close()."""

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = MachineConfig(**overrides)
        elif overrides:
            raise ConfigError("pass either a MachineConfig or keyword settings, not both")
        self.config = config
        self.state = RunState.CREATED
        self.process_start_ns = process_start_ns()
        self._control = LoopControl()
        if config.smp > 1:  # several vCPUs: a stop reaches every vCPU's loop (vcpus.py)
            from leanvm.machine.vcpus import GroupControl

            self._control = GroupControl()
        from leanvm.machine.pause import PauseGate

        self.pause_gate = self._control.gate = PauseGate()  # live dumps hold the vCPUs here
        self._dumps: list[Any] = []  # live dumps being written (waited for at close)
        self._init_control()
        self._running = threading.Event()  # set once run() has begun (start() waits for it)
        self.qmp_server: Any = None  # machine/qmp/server.py QmpServer, with config.qmp
        # what QMP query-dump reports: the last dump a QMP client asked for
        self.qmp_dump: dict[str, Any] = {"status": "none", "completed": 0, "total": 0}
        self._resources = Resources()  # closed by close(), or when the Machine is collected
        self._finalizer = weakref.finalize(self, self._resources.leaked,
                                           repr(config.name or "unnamed"))
        self.built: Built | None = None
        self.result: RunResult | None = None
        self.sampler: "RipSampler | None" = None  # with sample_hz, once run
        self._host_finding: "HostFinding | None" = None
        self._thread: threading.Thread | None = None
        self._background_error: BaseException | None = None
        self.tracer = Tracer(config.trace, origin=self.process_start_ns)
        self._boot_trace = None
        if config.trace:
            from leanvm.machine.tracing import BootTrace

            self._boot_trace = BootTrace(self.tracer, dict(config.probe_names))
            self.tracer.instant("vmm", "process start", ts=self.process_start_ns)
            self.tracer.instant("vmm", "configuration parsed")
        from leanvm.machine.console import GuestConsoles

        self.consoles = GuestConsoles(config, self._control.request, self._boot_trace)

    # --- building --------------------------------------------------------------------
    def build(self) -> "Machine":
        if self.state is not RunState.CREATED:
            return self
        from leanvm.machine.platform import Hooks

        hooks = Hooks(self.consoles.serial_output, self.consoles.debug_output,
                      lambda irq, level: None, self._on_reset, self._on_guest_exit,
                      self._on_poweroff,
                      self._boot_trace.probe if self._boot_trace is not None else None)
        self.built = build(self.config, hooks, self.tracer, self._boot_trace,
                           self._resources.add, lambda: self.host_finding)
        self.state = RunState.READY
        for handle in self.built.virtio.mem if self.built.virtio is not None else ():
            from leanvm.machine.events import SizeChangeEvents

            device = handle.device
            device.discard.add_listener(
                SizeChangeEvents(self.events, device.name, lambda d=device: d.plugged_size),
                replay=False)
        if self.config.qmp is not None:
            from leanvm.machine.qmp.server import QmpServer

            self.qmp_server = self._resources.add(QmpServer(self.config.qmp, self))
        return self

    @property
    def qmp_address(self) -> str | None:
        """Where the QMP server listens (a TCP port 0 resolved), or None."""
        return str(self.qmp_server.address) if self.qmp_server is not None else None

    @property
    def host_finding(self) -> "HostFinding":
        """Whether this host needs the emulated profile and the fallback (cached per boot)."""
        if self._host_finding is None:
            from leanvm.machine.host_check import check_host

            self._host_finding = check_host(self.config.kvm_path)
        return self._host_finding

    # --- running ---------------------------------------------------------------------
    def run(self, timeout: float | None = None, until: bytes | str | None = None, *,
            paused: bool = False) -> RunResult:
        """Run the vCPUs on this thread until the guest stops the VM, ``timeout`` seconds
        pass, or (with ``until``) the serial output contains that text. ``paused``: hold
        the vCPUs before their first instruction until ``resume()`` (QEMU's -S, QMP cont)."""
        timeout = check_timeout(timeout)
        if until is not None and not until:
            raise ConfigError("bad until text: empty (it would match at once)")
        self.build()
        self.consoles.until = until.encode() if isinstance(until, str) else until
        if self.state is not RunState.READY:
            raise LeanvmError(f"machine cannot run from state {self.state.value}")
        self.consoles.open(self.platform.serial)
        install_kick_handler()
        if paused:
            self._start_paused()
        timer = self._arm_timeout(timeout) if timeout else None
        self.state = RunState.RUNNING
        self._running.set()
        sampler = self._start_sampler() if self.config.sample_hz else None
        if self.entry_trap is not None or self.fallback is not None:
            self._control.on_emulation_failure = self._on_emulation_failure
        flusher = self._start_flusher()
        first_entry = time.monotonic_ns()
        try:
            if self.qmp_server is not None and self.qmp_server.address.wait:  # wait=on
                self.qmp_server.wait_for_client(lambda: self._control.stop is not None)
            stop = self._run_vcpus()
        except KeyboardInterrupt as exc:  # Ctrl-C, or a terminating signal the CLI turned into one
            stop = Stop(StopReason.INTERRUPTED, getattr(exc, "detail", None)
                        or "interrupted by the user (Ctrl-C)", getattr(exc, "signum", None))
        finally:
            stopped = time.monotonic_ns()
            if timer is not None:
                timer.cancel()
                timer.join()  # its thread holds the machine until it ends
            if sampler is not None:
                sampler.stop()
            if flusher is not None:
                flusher.stop()
            self.consoles.close()
            self.state = RunState.STOPPED
        if self.tracer.enabled or sampler is not None:
            from leanvm.machine.tracing import trace_run

            trace_run(self, first_entry, stopped, stop)
        if paused and self.launched_ns:  # the guest's first instruction came at cont
            first_entry = max(first_entry, self.launched_ns)
        self.result = result_of(self, self._control, stop, first_entry, stopped)
        self._emit_stop_events(stop)
        return self.result

    def _run_vcpus(self) -> Stop:
        if len(self.vcpus) > 1:
            from leanvm.machine.vcpus import run_vcpus

            return run_vcpus(list(self.vcpus), self.platform.pio, self.platform.mmio,
                             self._control)  # type: ignore[arg-type]
        return run_loop(self.vcpu, self.platform.pio, self.platform.mmio, self._control)

    def _on_emulation_failure(self, vcpu: "Vcpu", exit_: object) -> bool:
        """The kernel-entry trap first; what it does not claim goes to the fallback."""
        trap = self.entry_trap
        if trap is not None and trap.armed:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            if trap.on_fault(sregs.cs.base + regs.rip, sregs.cs.selector, regs.rip):
                return True
        fallback = self.fallback
        if fallback is None:
            return False
        detail = fallback.handle(vcpu, exit_)  # type: ignore[arg-type]
        if detail is not None:
            self._control.request(Stop(StopReason.INTERNAL_ERROR, detail))
        return True

    def stop(self, detail: str = "stopped by the host", signum: int | None = None) -> None:
        """Ask a running machine to stop, from any thread, even while the guest runs without
        exiting (``signum``: the signal that asked, for the exit status 128 + signum)."""
        self._control.request(Stop(StopReason.INTERRUPTED, detail, signum))

    def _arm_timeout(self, timeout: float) -> threading.Timer:
        timer = threading.Timer(timeout, self._control.request,
                                (Stop(StopReason.TIMEOUT, f"time limit of {timeout:g} s reached"),))
        timer.daemon = True
        timer.start()
        return timer

    def _start_flusher(self) -> "RingFlusher | None":
        """Where KVM queues the console's writes (boot.py), the loop empties the queue at
        each exit and a flusher kicks a vCPU that makes none (machine/flusher.py)."""
        ring = self.built.coalesced if self.built is not None else None
        self._control.ring = ring
        if ring is None:
            return None
        from leanvm.machine.flusher import RingFlusher

        flusher = RingFlusher(ring, self._control.kick)
        flusher.start()
        return flusher

    def _start_sampler(self) -> "RipSampler":
        from leanvm.machine.sampler import RipSampler

        sampler = self.sampler = RipSampler(self.config.sample_hz, self._control.kick,
                                            len(self.vcpus))
        self._control.on_interrupt = sampler.take
        sampler.start()
        return sampler

    # --- the guest's side: consoles, device callbacks (on vCPU threads) ---------------
    @property
    def console(self) -> bytes:
        """The serial output so far (the last 1 MiB)."""
        return self.consoles.serial

    @property
    def debug_console(self) -> bytes:
        """What firmware wrote to the debug console (port 0x402), the last 1 MiB."""
        return self.consoles.debug

    def send_input(self, data: bytes) -> None:
        """Bytes for the guest's COM1 receiver."""
        self.build().platform.serial.receive(data)

    def _on_reset(self) -> None:
        self._control.request(Stop(StopReason.RESET, "the guest requested a reset (i8042)"))

    def _on_poweroff(self) -> None:
        self._control.request(Stop(StopReason.POWEROFF, "the guest powered off (ACPI S5)"))

    def _on_guest_exit(self, status: int) -> None:
        self._control.request(Stop(StopReason.GUEST_EXIT,
                                   f"the guest exited with status {status}", status))

    # --- dumps ---------------------------------------------------------------------------
    @property
    def loop_control(self) -> LoopControl:
        return self._control

    def dump(self, path: "str | Path", format: str = "elf", *, paging: bool = False,
             begin: int | None = None, length: int | None = None, wait: bool = True,
             progress: "Callable[[int], None] | None" = None) -> Any:
        """Write the guest's memory to ``path``: ``format`` "elf" or "kdump-zlib", "kdump-lzo",
        "kdump-snappy", "kdump-zstd" (flattened, as QEMU's) or "kdump-raw-..."; ``paging``
        (elf): guest-virtual addresses from vCPU 0's page tables; ``begin``/``length``
        (elf): only that guest-physical range. A running VM goes on running while the
        dump is written (it is held for milliseconds, machine/dump.py); ``wait=False``
        returns the LiveDump at once. The DumpResult (docs/dump.md)."""
        from leanvm.machine.dump import DumpRequest, dump_live, dump_stopped

        request = DumpRequest(path, format, paging=paging, begin=begin, length=length)
        if self.state is RunState.CREATED:
            self.build()
        if self.state is RunState.CLOSED:
            raise LeanvmError("cannot dump a closed machine")
        if (self.state is not RunState.RUNNING or not self._control.running()
                or self.paused):  # held vCPUs change nothing: no pause needed
            return dump_stopped(self, request, progress)
        job = dump_live(self, request, progress)
        self._dumps = [d for d in self._dumps if not d.done()] + [job]
        return job.wait() if wait else job

    # --- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Give back everything the VM holds (vCPU, VM and /dev/kvm descriptors, guest
        memory, flash banks, whose persistent stores are flushed first). A Machine that is
        never closed is closed when it is collected, with a ResourceWarning, as files are."""
        if self.state is RunState.CLOSED:
            return
        self._finalizer.detach()
        for job in self._dumps:  # a live dump's child holds its own copy: let it finish
            try:
                job.wait()
            except LeanvmError:
                pass  # reported to whoever waits for it
        self._dumps.clear()
        if self.qmp_server is not None:  # clients get what is queued for them, then EOF
            self.qmp_server.close()
        if self.result is not None and self.result.source is not None:
            self.result.source.freeze()
        self._resources.close()
        self.state = RunState.CLOSED

    def __enter__(self) -> "Machine":
        try:
            return self.build()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop("the with-block ended")
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():  # never free memory a vCPU may still run in
                import faulthandler
                import sys

                faulthandler.dump_traceback(sys.stderr, all_threads=True)
                raise LeanvmError(f"the vCPU thread did not stop within {STOP_TIMEOUT:g} s "
                                  "(every thread's stack is on stderr); the VM is left open")
        self.close()

    # --- running in the background ------------------------------------------------------
    def start(self, timeout: float | None = None, *, paused: bool = False) -> "Machine":
        """Run the vCPUs on a background thread; then ``wait_for_console``, ``wait`` or
        ``stop`` (from any thread). ``paused``: as for run()."""
        timeout = check_timeout(timeout)
        self.build()
        if self._thread is not None:
            raise LeanvmError("machine already started")
        install_kick_handler()
        self._thread = threading.Thread(target=self._run_in_background, args=(timeout, paused),
                                        name="leanvm-vcpu", daemon=True)
        self._thread.start()
        self._running.wait()  # status, pause and QMP see a running machine from here on
        return self

    def _run_in_background(self, timeout: float | None, paused: bool = False) -> None:
        try:
            self.run(timeout, paused=paused)
        except BaseException as exc:  # handed to wait()
            self._background_error = exc
        finally:
            self._running.set()
            self.consoles.wake()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for a started machine to stop; its RunResult."""
        if self._thread is None:
            raise LeanvmError("machine not started: call start() or run()")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise LeanvmError(f"the guest is still running after {timeout:g} s")
        if self._background_error is not None:
            raise self._background_error
        assert self.result is not None
        return self.result

    def wait_for_console(self, pattern: "str | bytes | re.Pattern[bytes]",
                         timeout: float = 60) -> "re.Match[bytes]":
        """Start the machine if needed and wait until its serial output matches ``pattern``
        (text, or a compiled bytes regex); the match. GuestError if the guest stops first,
        LeanvmError on timeout."""
        import re

        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        if self._thread is None:
            self.start()
        thread = self._thread
        assert thread is not None
        match = self.consoles.wait_for(regex, timeout, thread.is_alive)
        if match is not None:
            return match
        if not thread.is_alive():
            result = self.result
            why = f"{result.reason.value}: {result.detail}" if result else "it failed"
            raise GuestError(f"the guest stopped ({why}) before its console showed "
                             f"{regex.pattern!r}")
        raise LeanvmError(f"the console did not show {regex.pattern!r} within {timeout:g} s")
