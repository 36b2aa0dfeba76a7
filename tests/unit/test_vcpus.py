"""The multi-vCPU stop logic (machine/vcpus.py) without KVM: a stop requested anywhere reaches
every vCPU's loop control and kicks every vCPU; the bus lock serializes device access."""

from __future__ import annotations

import signal
import threading

from leanvm.devices.bus import Bus
from leanvm.machine.vcpu_loop import KICK_SIGNAL, Stop, StopReason
from leanvm.machine.vcpus import GroupControl, LockedBus, MemberControl


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.id = index
        self.stops = 0
        self.bound: list[int] = []  # signals bound (and not yet unbound)

    def request_stop(self) -> None:
        self.stops += 1

    def bind_kick_signal(self, signum: int):  # type: ignore[no-untyped-def]
        self.bound.append(signum)
        return lambda: self.bound.remove(signum)


def group_of(count: int) -> tuple[GroupControl, list[MemberControl], list[FakeVcpu]]:
    group = GroupControl()
    members = [MemberControl(group, index) for index in range(1, count)]
    vcpus = [FakeVcpu(index) for index in range(count)]
    group.attach(members)
    return group, members, vcpus


def test_a_stop_from_a_device_reaches_every_member_and_kicks_every_running_vcpu(
        monkeypatch) -> None:
    group, members, vcpus = group_of(3)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(signal, "pthread_kill", lambda t, s: sent.append((t, s)))
    for vcpu, control in zip(vcpus, [group, *members]):
        control.enter(vcpu)  # every loop registers with the group, on this thread here
    assert [v.bound for v in vcpus] == [[KICK_SIGNAL]] * 3
    members[0].request(Stop(StopReason.RESET, "reset"))
    assert all(m.stop is group.stop for m in members) and group.stop.reason is StopReason.RESET
    assert [v.stops for v in vcpus] == [1, 1, 1] and len(sent) == 3
    group.request(Stop(StopReason.TIMEOUT, "late"))  # the first stop wins; no second kick
    assert group.stop.reason is StopReason.RESET and [v.stops for v in vcpus] == [1, 1, 1]
    for vcpu, control in zip(vcpus, [group, *members]):
        control.leave(vcpu)
    assert [v.bound for v in vcpus] == [[], [], []]
    group.kick()  # nothing runs any more: nobody is signalled
    assert len(sent) == 3


def test_an_ap_loop_stop_names_its_vcpu() -> None:
    group, members, _ = group_of(3)
    members[1].request(Stop(StopReason.SHUTDOWN, "the guest triple-faulted"))
    assert group.stop.detail == "vCPU 2: the guest triple-faulted"
    assert members[0].stop is group.stop


def test_the_stopping_thread_is_recorded_and_every_running_thread_is_signalled(
        monkeypatch) -> None:
    group, members, vcpus = group_of(2)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(signal, "pthread_kill", lambda t, s: sent.append((t, s)))
    group.enter(vcpus[0])
    ready, done = threading.Event(), threading.Event()

    def ap() -> None:
        members[0].enter(vcpus[1])
        ready.set()
        done.wait(5)
        members[0].leave(vcpus[1])

    thread = threading.Thread(target=ap)
    thread.start()
    ready.wait(5)
    group.request(Stop(StopReason.GUEST_EXIT, "exit", 0))  # from vCPU 0's thread
    done.set()
    thread.join()
    group.leave(vcpus[0])
    assert group.stopped_by == 0
    assert sorted(sent) == sorted([(threading.get_ident(), KICK_SIGNAL),
                                   (thread.ident, KICK_SIGNAL)])


def test_a_stop_requested_before_attach_reaches_members() -> None:
    group = GroupControl()
    group.request(Stop(StopReason.TIMEOUT, "early"))
    members = [MemberControl(group, 1)]
    group.attach(members)
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


def test_exit_counts_are_bounded_and_fold_together() -> None:
    from leanvm.machine.vcpu_loop import MAX_COUNTED, OTHER, ExitCounts, count

    counts = ExitCounts()
    for address in range(MAX_COUNTED + 500):  # a guest walking addresses
        count(counts.mmio_writes, 0x1000 * address)
    assert len(counts.mmio_writes) == MAX_COUNTED + 1
    assert counts.mmio_writes[OTHER] == 500
    counts.out_ports[0x3F8] = 3
    other = ExitCounts()
    other.out_ports[0x3F8] = 2
    other.others["hlt"] = 1
    counts.add(other)
    assert counts.kinds() == {"pio-out": 5, "mmio-write": MAX_COUNTED + 500, "hlt": 1}
