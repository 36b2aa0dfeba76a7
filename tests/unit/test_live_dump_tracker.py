"""The write-protect tracker of live dumps (machine/live_dump.py) on plain host memory, no
KVM: whatever is written or discarded after the snapshot, and in whatever order, reading
through the tracker gives the memory as it was at the snapshot, and what it says was held
is what was. A thread writing through ctypes (which lets go of the GIL, as a vCPU in
KVM_RUN does) waits on the protection while the tracker's thread serves it."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import threading
import time
from multiprocessing.connection import Connection

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanvm.machine.live_dump import Tracker
from leanvm.memory.populated import held_flags
from leanvm.memory.userfaultfd import UffdUnavailable, Userfaultfd

PAGE = 4096
PAGES = 48
MADV_DONTNEED = 4


def _uffd() -> Userfaultfd:
    try:
        return Userfaultfd()
    except UffdUnavailable as exc:
        pytest.skip(f"userfaultfd write-protection is not available here: {exc}")


class Memory:
    """PAGES pages of anonymous memory, and a tracker on them as a live dump's child has."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.uffd = _uffd()
        self.uffd.register(self.address, PAGES * PAGE)
        ours, theirs = socket.socketpair()
        self.vmm = Connection(os.dup(ours.fileno()))
        self.tracker = Tracker(self.uffd, os.getpid(), [(self.address, PAGES * PAGE)],
                               Connection(os.dup(theirs.fileno())))
        ours.close()
        theirs.close()
        self.thread = threading.Thread(target=self.tracker.serve, daemon=True)
        self.thread.start()

    def ask(self, message: tuple) -> tuple:
        self.vmm.send(message)
        assert self.vmm.poll(10), f"no answer to {message[0]}"
        return self.vmm.recv()

    def write(self, page: int, value: int) -> None:
        data = bytes([value]) * 64
        ctypes.memmove(self.address + page * PAGE + 64 * (value % 64), data, len(data))

    def discard(self, page: int, count: int) -> None:
        count = min(count, PAGES - page)
        self.ask(("discard", self.address + page * PAGE, count * PAGE))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.madvise(self.address + page * PAGE, count * PAGE, MADV_DONTNEED) == 0

    def close(self) -> None:
        self.tracker.finish.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the tracker did not end"
        self.vmm.close()
        self.tracker.control.close()
        self.map.close()


def run_in_thread(work: list) -> None:
    """Run the (callable, args) steps on a thread that may wait on protection."""
    thread = threading.Thread(target=lambda: [f(*a) for f, a in work], daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "a write waited on the protection for ever"


page = st.integers(0, PAGES - 1)
value = st.integers(1, 255)
operation = st.one_of(st.tuples(st.just("write"), page, value),
                      st.tuples(st.just("discard"), page, st.integers(1, 4)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.lists(st.tuples(page, value), max_size=30),
       arming=st.lists(operation, max_size=10),
       after=st.lists(operation, min_size=1, max_size=40))
def test_reads_through_the_tracker_give_memory_as_it_was_at_the_snapshot(
        first: list, arming: list, after: list) -> None:
    memory = Memory()
    try:
        steps = [(memory.write, args) for args in first]  # before any protection
        run_in_thread(steps)
        deadline = time.monotonic() + 10
        while memory.ask(("armed?",)) != ("armed", True):
            assert time.monotonic() < deadline, "the tracker did not arm"
        run_in_thread([(getattr(memory, kind), args) for kind, *args in arming])
        present = held_flags(memory.address, PAGES * PAGE, present_only=True)
        expected = bytes(memory.map)  # (maps the zero page where nothing is: after the above)
        assert memory.ask(("snapshot", ([], None)))[0] == "taken"
        run_in_thread([(getattr(memory, kind), args) for kind, *args in after])
        held = memory.tracker.held[memory.address]
        now = memory.tracker.read(memory.address, PAGES * PAGE)
        for index in range(PAGES):  # held pages as they were; the others were zeros
            old = expected[index * PAGE:(index + 1) * PAGE]
            assert held[index] or not present[index], f"page {index} held memory, not counted"
            if held[index]:  # (a page read where nothing was holds the zero page: it counts)
                assert now[index * PAGE:(index + 1) * PAGE] == old, f"page {index}"
            else:
                assert old == bytes(PAGE), f"page {index} held bytes but was not counted"
    finally:
        memory.close()


def test_a_write_after_the_snapshot_waits_until_the_old_page_is_kept() -> None:
    memory = Memory()
    try:
        memory.write(3, 7)
        while memory.ask(("armed?",)) != ("armed", True):
            time.sleep(0.001)
        memory.ask(("snapshot", ([], None)))
        before = memory.tracker.faults
        run_in_thread([(memory.write, (3, 9)), (memory.write, (5, 9))])
        assert memory.tracker.faults == before + 2  # one wait each, then free
        assert set(memory.tracker.saved) == {memory.address + 3 * PAGE}  # page 5 was zeros
        assert memory.map[3 * PAGE + 64 * 9] == 9  # the write landed
        old = memory.tracker.read(memory.address + 3 * PAGE, PAGE)
        assert old[64 * 7] == 7 and old[64 * 9] == 0
    finally:
        memory.close()
