"""Machine: one VM built from a MachineConfig, run until the guest stops it.

    with Machine(MachineConfig(memory="64M", guest="hello.bin")) as vm:
        result = vm.run(timeout=10)
        print(result.reason, vm.console.decode())
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import weakref
from typing import NamedTuple
from enum import Enum
from pathlib import Path

from leanvm.devices.bus import Bus
from leanvm.errors import ConfigError, GuestError, ImageError, LeanvmError
from leanvm.machine.builder import (Memslots, Platform, build_platform, build_ram,
                                    setup_kvm_private)
from leanvm.machine.config import MachineConfig
from leanvm.machine.plan import plan_for
from leanvm.machine.timing import process_start_ns
from leanvm.machine.vcpu_loop import KICK_SIGNAL, LoopControl, Stop, StopReason, run_loop
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import HostMapping
from leanvm.trace.events import Tracer

from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    import re
    from typing import Any

    from leanvm.devices.bus import BusDevice
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.loader.fwcfg_kernel import FirmwareKernel
    from leanvm.loader.linux64 import DirectKernel
    from leanvm.loader.pvh import PvhKernel
    from leanvm.machine.direct_boot import DirectBoot
    from leanvm.devices.fw_cfg import Transfer
    from leanvm.machine.entry_trap import EntryTrap, KernelEntry
    from leanvm.machine.sampler import RipSampler
    from leanvm.machine.stats import StatsSource
    from leanvm.kvm.cpuid import CpuidTable
    from leanvm.machine.fallback import Fallback
    from leanvm.machine.host_check import HostFinding
    from leanvm.machine.tracing import BootTrace
    from leanvm.trace.events import Event

    from leanvm.memory.residency import Residency



def demo_guest_path() -> Path:
    """The bundled demo guest (prints a greeting, then resets)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo.bin"


EXIT_STATUS_TOO_LARGE = 4  # the guest's exit status does not fit a process exit code


class RunState(Enum):
    CREATED = "created"  # configured, nothing allocated
    READY = "ready"  # built: memory, devices, vCPU in place; not started
    RUNNING = "running"
    STOPPED = "stopped"  # the guest stopped; memory can still be inspected
    CLOSED = "closed"  # all resources released


class RunResult(NamedTuple):
    reason: StopReason
    detail: str
    status: int | None  # the guest's exit status (GUEST_EXIT only)
    exits: int  # vCPU exits handled
    rip: int | None  # where the vCPU stopped, when known
    process_start_ns: int
    first_entry_ns: int  # just before the first KVM_RUN
    stopped_ns: int
    kernel_entry: "KernelEntry | None" = None  # firmware boots: when it entered the kernel
    source: "StatsSource | None" = None  # the rest of stats(), from the machine

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
        """Process exit code for the CLI: 0 for a reset or power-off, the guest's status for
        its exit port."""
        if self.reason in (StopReason.RESET, StopReason.NO_BOOT_DEVICE, StopReason.CONSOLE_MATCH,
                           StopReason.POWEROFF):
            return 0
        if self.reason is StopReason.GUEST_EXIT:
            status = self.status or 0
            return status if 0 <= status <= 255 else EXIT_STATUS_TOO_LARGE
        if self.reason is StopReason.TIMEOUT:
            return 124
        if self.reason is StopReason.INTERRUPTED:  # Ctrl-C 130; SIGTERM 143, SIGHUP 129
            return 128 + self.status if self.status else 130
        return 3


class Machine:
    """One VM. Build happens on first use (``build()``, ``run()`` or ``with``)."""

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
        self._resources = _Resources()  # closed by close(), or when the Machine is collected
        self._finalizer = weakref.finalize(self, self._resources.leaked, repr(config.name or
                                                                             "unnamed"))
        self.result: RunResult | None = None
        self.fallback: "Fallback | None" = None  # built with the machine when it is on
        self.sampler: "RipSampler | None" = None  # with sample_hz, once run
        self.cpu_profile: str | None = None  # "host" or "emulated", once built
        self._host_finding: "HostFinding | None" = None
        self._thread: threading.Thread | None = None
        self._background_error: BaseException | None = None
        self.tracer = Tracer(config.trace, origin=self.process_start_ns)
        self._boot_trace: "BootTrace | None" = None
        if config.trace:
            from leanvm.machine.tracing import BootTrace

            self._boot_trace = BootTrace(self.tracer, dict(config.probe_names))
            self.tracer.instant("vmm", "process start", ts=self.process_start_ns)
            self.tracer.instant("vmm", "configuration parsed")
        from leanvm.machine.console import GuestConsoles

        self.consoles = GuestConsoles(config, lambda stop: self._control.request(stop),
                                      self._boot_trace)

    # --- building --------------------------------------------------------------------
    def build(self) -> "Machine":
        if self.state is not RunState.CREATED:
            return self
        from leanvm.kvm.system import Kvm
        from leanvm.loader.bare import load_bare
        from leanvm.loader.image import load_image
        from leanvm.machine.cpu import setup_long_mode

        config = self.config
        firmware = config.bios is not None or (
            config.guest is None and any(spec.role == "code" for spec in config.flash))
        direct = config.kernel is not None and not firmware  # Linux, 64-bit boot protocol
        image = None if firmware or direct else load_image(config.guest or demo_guest_path())
        kernel = self._map_kernel() if config.kernel is not None else None
        self.kvm = Kvm(config.kvm_path)
        self._resources.add(self.kvm)
        cpuid = self._apply_cpu_profile(self.kvm.supported_cpuid())
        self.kernel_cmdline, self.cmdline_added = self._linux_cmdline()
        self.plan = plan_for(config, cpuid.phys_addr_bits())
        self.vm = self.kvm.create_vm()
        self._resources.add(self.vm)
        setup_kvm_private(self.vm, self.plan)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        self.memory: GuestMemory = self._resources.add(build_ram(self.plan))
        self.memslots = Memslots(self.vm)
        for region in self.memory.regions:
            self.memslots.add(region)
        if self.tracer.enabled:
            self.tracer.instant("vmm", "memory ready")

        self.platform: Platform = build_platform(self.plan, self.memory,
                                                 self.consoles.serial_output,
                                                 self.consoles.debug_output, self.vm.irq_line,
                                                 self._on_reset, self._on_guest_exit,
                                                 on_poweroff=self._on_poweroff, cpus=config.smp)
        self.flash_banks: list = []
        self.bios_area = None
        flash = config.flash
        if config.bios is not None:
            from leanvm.machine.flash import FlashSpec

            if any(spec.role == "code" for spec in flash):
                raise ConfigError("give either --bios or a code flash bank, not both")
            flash = (FlashSpec("code", config.bios, "readonly"), *flash)
        if flash:
            from leanvm.machine.flash import build_flash

            self.flash_banks, self.bios_area = build_flash(
                flash, self.plan, self.memory, self.memslots, self.platform.mmio,
                config.max_fw_size)
            for bank in self.flash_banks:
                self._resources.add(bank)
            if self.bios_area is not None:
                self.platform.pci.host_bridge.on_write = _pam_forwarder(self.bios_area)
        self.kernel = None
        self.direct_kernel: "DirectKernel | PvhKernel | None" = None
        self.direct_boot: "DirectBoot | None" = None
        self.kernel_boot_note = ""
        self.decompress_ms: float | None = None
        self.entry_trap: "EntryTrap | None" = None
        if kernel is not None and not direct:
            with self._explain_cmdline():
                self.kernel = self._serve_kernel(kernel)
        if self._boot_trace is not None:
            self._wire_tracing(self._boot_trace)
        self.vcpu = self.vm.create_vcpu(0)
        from leanvm.machine.topology import vcpu_cpuid

        ap_cpuid, cpuid = cpuid, vcpu_cpuid(cpuid, 0, config.smp)  # vCPU 0's APIC id, topology
        if direct:
            from leanvm.machine.direct_boot import load_direct

            with self._explain_cmdline():
                self.direct_boot = load_direct(config, self.plan, self.memory, *kernel,
                                               self.tracer, self.kernel_cmdline)
            self._kernel_image = kernel[0]  # for the decompression record after a traced run
            self.direct_kernel = self.direct_boot.kernel
            self.kernel_boot_note = self.direct_boot.note
            self.decompress_ms = self.direct_boot.decompress_ms
            if self.direct_boot.mode == "pvh":
                from leanvm.machine.cpu import setup_protected_mode

                setup_protected_mode(self.vcpu, self.direct_kernel.boot, cpuid)
            else:
                setup_long_mode(self.vcpu, self.direct_kernel.boot, cpuid)
        elif image is None:  # firmware boot: the vCPU stays at the reset vector (F000:FFF0)
            self.vcpu.set_cpuid(cpuid)
        else:
            boot = load_bare(self.memory, image, config.args)
            setup_long_mode(self.vcpu, boot, cpuid)
        self.vcpus: "list[Vcpu]" = [self.vcpu]
        if config.smp > 1:  # after the irqchip (above); they wait for the guest's SIPI
            from leanvm.machine.vcpus import create_aps

            self.vcpus += create_aps(self.vm, ap_cpuid, config.smp)
        self.image = image
        self.fallback = self._make_fallback(cpuid.phys_addr_bits())
        if self.fallback is not None:
            self._resources.add(self.fallback)
        self.state = RunState.READY
        if self.tracer.enabled:
            self.tracer.instant("vmm", "images loaded")
        return self

    def _wire_tracing(self, boot: "BootTrace") -> None:
        config = self.platform.fw_cfg
        previous = config.on_transfer

        def on_transfer(transfer: "Transfer") -> None:
            boot.fw_cfg(transfer)
            if previous is not None:
                previous(transfer)

        config.on_transfer = on_transfer
        self.platform.probe.on_probe = boot.probe

    def write_trace(self, path: "str | Path") -> None:
        """Save the boot timeline: trace-event JSON for *.json, else JSON lines."""
        from leanvm.trace.files import write_trace

        write_trace(Path(path), self.trace_events, self.tracer.origin, self.tracer.dropped)

    @property
    def trace_events(self) -> "list[Event]":
        """The boot timeline so far (empty unless the machine was made with trace=True)."""
        return self.tracer.sorted_events()

    def _map_kernel(self) -> tuple[Any, Any]:
        from leanvm.loader.files import map_readonly

        config = self.config
        assert config.kernel is not None
        # Not closed explicitly: fw_cfg holds views of them; they unmap when dropped.
        kernel = map_readonly(config.kernel, "kernel")
        initrd = map_readonly(config.initrd, "initrd") if config.initrd is not None else b""
        return kernel, initrd

    def _serve_kernel(self, files: tuple[Any, Any]) -> "FirmwareKernel":
        """Hand the kernel, initrd and command line to the firmware through fw_cfg."""
        from leanvm.firmware.roms import find_rom
        from leanvm.loader.fwcfg_kernel import plan_firmware_kernel
        from leanvm.machine.builder import LINUXBOOT_ROM, add_firmware_kernel

        config = self.config
        kernel, initrd = files
        planned = plan_firmware_kernel(memoryview(kernel), str(config.kernel), initrd,
                                       str(config.initrd), self.kernel_cmdline,
                                       self.plan.get("ram-low").size)
        rom = find_rom(LINUXBOOT_ROM).read_bytes()
        add_firmware_kernel(self.platform.fw_cfg, planned, rom)
        self.entry_trap = self._entry_trap(planned.entry)
        return planned

    def _entry_trap(self, entry: int) -> "EntryTrap":
        """Arm the kernel-entry trap once firmware has read the setup block."""
        from leanvm.devices.fw_cfg import SETUP_DATA
        from leanvm.machine.entry_trap import EntryTrap

        mmio = self.platform.mmio
        trap = EntryTrap(entry, self.memory, self.memslots.punch, self.memslots.unpunch,
                         lambda base, size, window: mmio.register(base, size, window,
                                                                  "kernel-entry-trap"),
                         mmio.unregister)
        previous = self.platform.fw_cfg.on_transfer

        def on_transfer(transfer: Transfer) -> None:
            if transfer.key == SETUP_DATA:
                trap.arm()
            if previous is not None:
                previous(transfer)

        self.platform.fw_cfg.on_transfer = on_transfer
        return trap

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

    # --- CPU profile and emulation fallback (docs/emulation.md) ---------------------------
    @property
    def host_finding(self) -> "HostFinding":
        """Whether this host needs the emulated profile and the fallback (cached per boot)."""
        if self._host_finding is None:
            from leanvm.machine.host_check import check_host

            self._host_finding = check_host(self.config.kvm_path)
        return self._host_finding

    def _apply_cpu_profile(self, table: "CpuidTable") -> "CpuidTable":
        from leanvm.machine import cpu_profile

        self.cpu_profile = cpu_profile.resolve(self.config.cpu_profile,
                                               lambda: self.host_finding.needs_fallback)
        return cpu_profile.apply(table, self.cpu_profile, self.config.hide_cpu_features)

    def _linux_cmdline(self) -> tuple[str, tuple[str, ...]]:
        """(the kernel command line to boot, the parameters leanvm added): the emulated
        profile asks Linux itself to leave alone the features this host's CPUID shows
        although the profile hides them (cpu_profile.linux_parameters)."""
        config = self.config
        if config.kernel is None or self.cpu_profile != "emulated":
            return config.cmdline, ()
        from leanvm.machine.cpu_profile import linux_parameters, with_parameters

        params = linux_parameters(self.cpu_profile, self.host_finding.unhidden)
        return with_parameters(config.cmdline, params)

    @contextlib.contextmanager
    def _explain_cmdline(self) -> "Iterator[None]":
        """A command line too long for the kernel says what leanvm added to it."""
        try:
            yield
        except ImageError as exc:
            if "command line" not in str(exc) or not self.cmdline_added:
                raise
            raise ImageError(f"{exc} (with {' '.join(self.cmdline_added)} that the emulated "
                             "CPU profile added; --cpu-profile host leaves them out)") from None

    def _make_fallback(self, phys_bits: int) -> "Fallback | None":
        mode = self.config.emulation_fallback
        if mode == "off" or (mode == "auto" and not self.host_finding.needs_fallback):
            return None
        from leanvm.machine.fallback import Fallback

        from leanvm.machine.fallback.device_pages import memslot_backing

        # Pages KVM does not map as RAM go to the MMIO bus, as a plain load would (a flash
        # bank in a command mode, a device). With several vCPUs the fallback runs under the
        # lock every vCPU's bus accesses take (vcpus.run_vcpus), so the raw bus is safe here.
        return Fallback(self.memory, phys_bits, mmio=self.platform.mmio,
                        backing=memslot_backing(self.memslots))

    @property
    def pio_bus(self) -> Bus:
        return self.build().platform.pio

    @property
    def mmio_bus(self) -> Bus:
        return self.build().platform.mmio

    def add_mmio_device(self, base: int, size: int, device: BusDevice, name: str) -> None:
        """A device model at guest-physical [base, base + size): the guest's loads and
        stores there reach ``device.read(offset, size)`` / ``write(offset, size, value)``.
        Refused over guest RAM, whose accesses never leave the guest (over a read-only
        region it is allowed: the guest's writes there come to the device)."""
        bus = self.mmio_bus
        for region in self.memory.regions:
            if base < region.end and region.base < base + size and not region.readonly:
                raise ConfigError(f"device {name} [{base:#x}, {base + size:#x}) overlaps guest "
                                  f"memory {region.name} [{region.base:#x}, {region.end:#x}): "
                                  "accesses there go to memory, never to a device")
        bus.register(base, size, device, name)

    def add_pio_device(self, base: int, size: int, device: BusDevice, name: str) -> None:
        self.pio_bus.register(base, size, device, name)

    def add_region(self, name: str, base: int, mapping: HostMapping, *,
                   readonly: bool = False) -> GuestRegion:
        """Map host memory into the guest (readonly: guest writes arrive as MMIO writes)."""
        self.build()
        for other in self.platform.mmio.mappings:
            if base < other.end and other.base < base + mapping.size and not readonly:
                raise ConfigError(f"guest region {name} [{base:#x}, {base + mapping.size:#x}) "
                                  f"overlaps device {other.name} [{other.base:#x}, "
                                  f"{other.end:#x})")
        kind = RegionKind.ROM if readonly else RegionKind.FILE if mapping.path else RegionKind.RAM
        region = self.memory.add(GuestRegion(name, base, mapping, kind, readonly=readonly))
        self.memslots.add(region)
        return region

    # --- running ---------------------------------------------------------------------
    def run(self, timeout: float | None = None, until: bytes | str | None = None) -> RunResult:
        """Run the vCPU on this thread until the guest stops the VM, ``timeout`` seconds pass,
        or (with ``until``) the serial output contains that text."""
        timeout = check_timeout(timeout)
        if until is not None and not until:
            raise ConfigError("bad until text: empty (it would match at once)")
        self.build()
        self.consoles.until = until.encode() if isinstance(until, str) else until
        if self.state is not RunState.READY:
            raise LeanvmError(f"machine cannot run from state {self.state.value}")
        self.consoles.open(self.platform.serial)
        _install_kick_handler()
        timer = self._arm_timeout(timeout) if timeout else None
        self.state = RunState.RUNNING
        sampler = self._start_sampler() if self.config.sample_hz else None
        if self.entry_trap is not None or self.fallback is not None:
            self._control.on_emulation_failure = self._on_emulation_failure
        first_entry = time.monotonic_ns()
        try:
            if len(self.vcpus) > 1:
                from leanvm.machine.vcpus import run_vcpus

                stop = run_vcpus(self.vcpus, self.platform.pio, self.platform.mmio,
                                 self._control)  # type: ignore[arg-type]
            else:
                stop = run_loop(self.vcpu, self.platform.pio, self.platform.mmio, self._control)
        except KeyboardInterrupt as exc:  # Ctrl-C, or a terminating signal the CLI turned into one
            signum = getattr(exc, "signum", None)
            stop = Stop(StopReason.INTERRUPTED, getattr(exc, "detail", None)
                        or "interrupted by the user (Ctrl-C)", signum)
        finally:
            stopped = time.monotonic_ns()
            if timer is not None:
                timer.cancel()
                timer.join()  # its thread holds the machine until it ends
            if sampler is not None:
                sampler.stop()
            self.consoles.close()
            self.state = RunState.STOPPED
        if sampler is not None:
            sampler.resolve(self.config.symbols, self.config.kernel)
            if self.tracer.enabled:
                from leanvm.machine.sampler import add_to_trace

                add_to_trace(self.tracer, sampler.samples, sampler.symbols, sampler.sample_vcpus)
        if self.tracer.enabled:
            self._trace_run(first_entry, stopped, stop)
        rip = None
        if stop.reason in (StopReason.INTERNAL_ERROR, StopReason.SHUTDOWN, StopReason.UNHANDLED):
            stopper = getattr(self._control, "stopped_by", None) or 0  # SMP: which vCPU
            try:
                rip = self.vcpus[stopper].get_regs().rip
            except LeanvmError:
                rip = None
            if stop.reason is StopReason.INTERNAL_ERROR and stop.exit is not None:
                where = f"vCPU {stopper}: " if stopper else ""
                stop = Stop(stop.reason, where + stop.exit.describe(rip), exit=stop.exit)  # type: ignore[union-attr]
        from leanvm.machine.stats import StatsSource

        self.result = RunResult(stop.reason, stop.detail, stop.status, self._control.exits, rip,
                                self.process_start_ns, first_entry, stopped,
                                self.entry_trap.hit if self.entry_trap is not None else None,
                                StatsSource(self))
        return self.result

    def _trace_run(self, first_entry: int, stopped: int, stop: Stop) -> None:
        tracer = self.tracer
        if self.direct_boot is not None and self._boot_trace is not None:
            from leanvm.machine.direct_boot import note_guest_decompression

            note_guest_decompression(self.direct_boot, self._kernel_image,
                                     self._boot_trace.phases, tracer)
        tracer.instant("vmm", "first vCPU entry", ts=first_entry)
        hit = self.entry_trap.hit if self.entry_trap is not None else None
        if hit is not None:
            tracer.instant("vmm", "kernel entry", ts=hit.time_ns,
                           args={"address": f"{hit.address:#x}"})
        tracer.instant("vmm", "shutdown request", ts=self._control.requested_ns or stopped,
                       args={"reason": stop.reason.value})
        tracer.instant("vmm", "stop", ts=stopped)

    def stop(self, detail: str = "stopped by the host", signum: int | None = None) -> None:
        """Ask a running machine to stop, from any thread, even while the guest runs without
        exiting (``signum``: the signal that asked, for the exit status 128 + signum)."""
        self._kick(Stop(StopReason.INTERRUPTED, detail, signum))

    @property
    def console(self) -> bytes:
        """The serial output so far (the last 1 MiB)."""
        return self.consoles.serial

    def send_input(self, data: bytes) -> None:
        """Bytes for the guest's COM1 receiver."""
        self.build().platform.serial.receive(data)

    def residency(self) -> list[Residency]:
        """Host memory each guest region costs now."""
        from leanvm.memory.residency import measure

        self.build()
        return measure([(r.name, r.mapping.address, r.size) for r in self.memory.regions])

    # --- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Give back everything the VM holds (vCPU, VM and /dev/kvm descriptors, guest
        memory, flash banks, whose persistent stores are flushed first). A Machine that is
        never closed is closed when it is collected, with a ResourceWarning, as files are."""
        if self.state is RunState.CLOSED:
            return
        self._finalizer.detach()
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
            self._thread.join()
        self.close()

    # --- running in the background ------------------------------------------------------
    def start(self, timeout: float | None = None) -> "Machine":
        """Run the vCPUs on a background thread; then ``wait_for_console``, ``wait`` or
        ``stop`` (from any thread)."""
        timeout = check_timeout(timeout)
        self.build()
        if self._thread is not None:
            raise LeanvmError("machine already started")
        _install_kick_handler()
        self._thread = threading.Thread(target=self._run_in_background, args=(timeout,),
                                        name="leanvm-vcpu", daemon=True)
        self._thread.start()
        return self

    def _run_in_background(self, timeout: float | None) -> None:
        try:
            self.run(timeout)
        except BaseException as exc:  # handed to wait()
            self._background_error = exc
        finally:
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

    # --- device callbacks (run on the vCPU thread) -------------------------------------
    def _on_reset(self) -> None:
        self._control.request(Stop(StopReason.RESET, "the guest requested a reset (i8042)"))

    def _on_poweroff(self) -> None:
        self._control.request(Stop(StopReason.POWEROFF, "the guest powered off (ACPI S5)"))

    def _on_guest_exit(self, status: int) -> None:
        self._control.request(Stop(StopReason.GUEST_EXIT,
                                   f"the guest exited with status {status}", status))

    @property
    def debug_console(self) -> bytes:
        """What firmware wrote to the debug console (port 0x402), the last 1 MiB."""
        return self.consoles.debug

    # --- stopping from other threads ---------------------------------------------------
    def _arm_timeout(self, timeout: float) -> threading.Timer:
        timer = threading.Timer(timeout, self._kick,
                                (Stop(StopReason.TIMEOUT, f"time limit of {timeout:g} s reached"),))
        timer.daemon = True
        timer.start()
        return timer

    def _kick(self, stop: Stop) -> None:
        self._control.request(stop)  # kicks every running vCPU

    def _poke(self) -> None:
        """Interrupt every running vCPU's KVM_RUN once (they resume: no stop requested)."""
        self._control.kick()

    def _start_sampler(self) -> "RipSampler":
        from leanvm.machine.sampler import RipSampler

        sampler = self.sampler = RipSampler(self.config.sample_hz, self._poke, len(self.vcpus))
        self._control.on_interrupt = sampler.take
        sampler.start()
        return sampler


class _Resources:
    """What a Machine holds that must be given back, closed in reverse order of acquisition
    (flash banks before the guest memory they live in, vCPUs and the VM before /dev/kvm).
    Holds no reference to the Machine, so a forgotten Machine can still be collected."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def close(self) -> None:
        while self.items:
            self.items.pop().close()

    def leaked(self, name: str) -> None:
        if self.items:
            import warnings

            warnings.warn(f"leanvm Machine {name} was never closed: use 'with Machine(...)' "
                          "or call close()", ResourceWarning, stacklevel=2)
        self.close()


_kick_handler_installed = False
MAX_TIMEOUT = 366 * 86400.0  # seconds; threading.Timer cannot wait much longer


def check_timeout(timeout: float | None) -> float | None:
    """A time limit in seconds: None (no limit) or a finite number above 0."""
    import math

    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"bad timeout {timeout!r}: expected a number of seconds")
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise ConfigError(f"bad timeout {timeout!r}: expected a number of seconds above 0 "
                          f"and at most {MAX_TIMEOUT:.0f} (a year)")
    return float(timeout)


def _pam_forwarder(area: object) -> "Callable[[int, int], None]":
    from leanvm.devices.pci import PAM0, PAM_COUNT

    def forward(register: int, value: int) -> None:
        if PAM0 <= register < PAM0 + PAM_COUNT:
            area.set_pam(register, value)  # type: ignore[attr-defined]

    return forward


def _install_kick_handler() -> None:
    """A no-op handler for KICK_SIGNAL, where Python allows it (the main thread): vCPU
    threads block the signal and need none (vcpu_loop.LoopControl), but a stray KICK_SIGNAL
    sent to the whole process must not kill it."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_handler_installed = True
