"""The multi-vCPU stop logic (machine/vcpus.py) without KVM: a stop requested anywhere reaches
every vCPU's loop control and kicks every vCPU; the bus lock serializes device access."""

from __future__ import annotations

import signal
import threading

from leanvm.devices.bus import Bus
from leanvm.machine.vcpu_loop import Stop, StopReason
from leanvm.machine.vcpus import GroupControl, LockedBus, MemberControl


class FakeVcpu:
    def __init__(self) -> None:
        self.stops = 0

    def request_stop(self) -> None:
        self.stops += 1


def group_of(count: int) -> tuple[GroupControl, list[MemberControl], list[FakeVcpu]]:
    group = GroupControl()
    members = [MemberControl(group, index) for index in range(1, count)]
    vcpus = [FakeVcpu() for _ in range(count)]
    group.attach(vcpus, members, None)  # type: ignore[arg-type]
    return group, members, vcpus


def test_a_stop_from_a_device_reaches_every_member_and_kicks_every_vcpu() -> None:
    group, members, vcpus = group_of(3)
    group.request(Stop(StopReason.RESET, "reset"))
    assert all(m.stop is group.stop for m in members) and group.stop.reason is StopReason.RESET
    assert [v.stops for v in vcpus] == [1, 1, 1]
    group.request(Stop(StopReason.TIMEOUT, "late"))  # the first stop wins; no second kick
    assert group.stop.reason is StopReason.RESET and [v.stops for v in vcpus] == [1, 1, 1]


def test_an_ap_loop_stop_names_its_vcpu() -> None:
    group, members, _ = group_of(3)
    members[1].request(Stop(StopReason.SHUTDOWN, "the guest triple-faulted"))
    assert group.stop.detail == "vCPU 2: the guest triple-faulted"
    assert members[0].stop is group.stop


def test_the_stopping_thread_is_recorded_and_others_are_signalled() -> None:
    group, members, vcpus = group_of(2)
    sent: list[tuple[int, int]] = []
    original = signal.pthread_kill
    signal.pthread_kill = lambda thread, signum: sent.append((thread, signum))  # type: ignore[assignment]
    try:
        group._kick_signal = signal.SIGUSR1
        group.enter(0)
        ready, done = threading.Event(), threading.Event()

        def ap() -> None:
            group.enter(1)
            ready.set()
            done.wait(5)
            group.leave(1)

        thread = threading.Thread(target=ap)
        thread.start()
        ready.wait(5)
        group.request(Stop(StopReason.GUEST_EXIT, "exit", 0))  # from vCPU 0's thread
        done.set()
        thread.join()
    finally:
        signal.pthread_kill = original  # type: ignore[assignment]
    assert group.stopped_by == 0
    assert sent == [(thread.ident, signal.SIGUSR1)]  # not itself, only the running AP


def test_a_stop_requested_before_attach_reaches_members() -> None:
    group = GroupControl()
    group.request(Stop(StopReason.TIMEOUT, "early"))
    members = [MemberControl(group, 1)]
    group.attach([FakeVcpu(), FakeVcpu()], members, None)  # type: ignore[list-item]
    assert members[0].stop is group.stop


def test_locked_bus_holds_the_lock_around_device_calls() -> None:
    lock = threading.Lock()
    seen: list[bool] = []

    class Device:
        def read(self, offset: int, size: int) -> int:
            seen.append(lock.locked())
            return 0x5A

        def write(self, offset: int, size: int, value: int) -> None:
            seen.append(lock.locked())

    bus = Bus("pio", 0x10000)
    bus.register(0x700, 4, Device(), "dev")
    locked = LockedBus(bus, lock)
    assert locked.read(0x700, 1) == 0x5A
    locked.write(0x701, 1, 1)
    assert seen == [True, True] and not lock.locked()
