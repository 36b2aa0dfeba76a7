"""Several vCPUs: one host thread each, one lock around device dispatch, and a stop on any
vCPU (or from a device, a timer, Ctrl-C, an error) stopping them all.

vCPU 0 (the bootstrap processor) runs on the thread that called Machine.run(), exactly as a
single-vCPU machine does; the others (application processors) run on threads of their own
and sit in KVM_RUN, in KVM's wait-for-SIPI state, until the guest starts them with INIT and
SIPI through its local APIC (all in the kernel). Device models are not thread-safe, so with
several vCPUs every bus access and the emulation-failure handler run under one lock; a
single-vCPU machine never comes here and pays nothing for it.

Stopping: GroupControl is the machine's LoopControl when it has several vCPUs. Its
``request`` (called by devices, the timeout timer, Machine.stop, or any vCPU's loop) sets the
stop on every vCPU's loop control and kicks each vCPU out of KVM_RUN: the immediate_exit flag
for one about to enter, and the kick signal for one blocked in the kernel (halted, or
waiting for SIPI), which only a signal can wake. Kicks work from any thread, whichever
thread runs the vCPUs (vcpu_loop.LoopControl, kvm/vcpu.py bind_kick_signal).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from leanvm.kvm.cpuid import CpuidTable
from leanvm.machine.topology import vcpu_cpuid
from leanvm.machine.vcpu_loop import LoopControl, Stop, StopReason, run_loop

if TYPE_CHECKING:
    from leanvm.devices.bus import Bus
    from leanvm.kvm.exits import InternalError
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.kvm.vm import Vm


def create_aps(vm: "Vm", cpuid: CpuidTable, count: int) -> "list[Vcpu]":
    """vCPUs 1 .. count-1, each with its own CPUID; KVM leaves them waiting for SIPI."""
    aps = []
    for index in range(1, count):
        vcpu = vm.create_vcpu(index)
        vcpu.set_cpuid(vcpu_cpuid(cpuid, index, count))
        aps.append(vcpu)
    return aps


class GroupControl(LoopControl):
    """LoopControl of a machine with several vCPUs (vCPU 0's loop uses it directly; every
    vCPU's loop registers here, so a kick or a stop reaches them all)."""

    __slots__ = ("members", "stopped_by")

    def __init__(self) -> None:
        super().__init__()
        self.members: list[MemberControl] = []
        self.stopped_by: int | None = None  # the vCPU whose thread requested the stop

    def attach(self, members: "list[MemberControl]") -> None:
        with self._lock:
            self.members = members
            for member in members:
                member.stop = self.stop  # a stop requested before the threads started

    def request(self, stop: Stop) -> None:
        with self._lock:
            if self.stop is not None:
                return
            self.requested_ns = time.monotonic_ns()
            self.stop = stop
            me = threading.get_ident()
            self.stopped_by = next((index for index, (thread, _, _) in self._running.items()
                                    if thread == me), None)
            for member in self.members:
                member.stop = stop
        self.kick()
        if self.gate is not None:
            self.gate.wake()


class MemberControl(LoopControl):
    """Loop control of an application processor: its own exit count, the group's stop and
    the group's registry of running vCPUs."""

    __slots__ = ("group", "index")

    def __init__(self, group: GroupControl, index: int) -> None:
        super().__init__()
        self.group = group
        self.index = index

    def request(self, stop: Stop) -> None:
        self.group.request(stop._replace(detail=f"vCPU {self.index}: {stop.detail}"))

    def enter(self, vcpu: "Vcpu") -> None:
        self.group.enter(vcpu)

    def leave(self, vcpu: "Vcpu") -> None:
        self.group.leave(vcpu)

    def kick(self, vcpu_id: int | None = None) -> None:
        self.group.kick(vcpu_id)


class LockedBus:
    """A bus whose reads and writes hold ``lock``: devices see one access at a time."""

    __slots__ = ("read", "write")

    def __init__(self, bus: "Bus", lock: threading.Lock) -> None:
        read, write = bus.read, bus.write

        def locked_read(address: int, size: int) -> int:
            with lock:
                return read(address, size)

        def locked_write(address: int, size: int, value: int) -> None:
            with lock:
                write(address, size, value)

        self.read, self.write = locked_read, locked_write


def _locked_handler(handler: "Callable[[Vcpu, InternalError], bool] | None",
                    lock: threading.Lock) -> "Callable[[Vcpu, InternalError], bool] | None":
    if handler is None:
        return None

    def locked(vcpu: "Vcpu", exit_: "InternalError") -> bool:
        with lock:
            return handler(vcpu, exit_)

    return locked


def run_vcpus(vcpus: "list[Vcpu]", pio: "Bus", mmio: "Bus", control: GroupControl) -> Stop:
    """Run ``vcpus[0]`` on this thread and the rest on threads of their own until the VM
    stops; the stop."""
    lock = threading.Lock()
    locked_pio, locked_mmio = LockedBus(pio, lock), LockedBus(mmio, lock)
    handler = control.on_emulation_failure  # the machine's, called with the failing vCPU
    locked = _locked_handler(handler, lock)
    members = [MemberControl(control, index) for index in range(1, len(vcpus))]
    for member in members:
        member.on_emulation_failure = locked
        member.on_interrupt = control.on_interrupt
        member.ring = control.ring  # one queue for the VM: each vCPU empties it in turn
        member.gate = control.gate
    control.attach(members)
    errors: list[BaseException] = []

    def run_ap(member: MemberControl) -> None:
        try:
            run_loop(vcpus[member.index], locked_pio, locked_mmio, member)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller once everything has stopped
            errors.append(exc)
            control.request(Stop(StopReason.INTERRUPTED,
                                 f"vCPU {member.index} failed: {exc}"))

    threads = [threading.Thread(target=run_ap, args=(member,), name=f"leanvm-vcpu{member.index}",
                                daemon=True) for member in members]
    control.on_emulation_failure = locked
    try:
        for thread in threads:
            thread.start()
        run_loop(vcpus[0], locked_pio, locked_mmio, control)  # type: ignore[arg-type]
    except BaseException as exc:
        control.request(Stop(StopReason.INTERRUPTED, f"vCPU 0 stopped: {exc}"))
        raise
    finally:
        control.on_emulation_failure = handler
        for thread in threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join()
        for member in members:
            control.exits += member.exits
            control.counts.add(member.counts)
    if errors:
        raise errors[0]
    assert control.stop is not None
    return control.stop
