"""Live dumps whose pause does not grow with guest memory: userfaultfd write-protection
instead of a fork of guest RAM.

A fork() copies the page tables of all populated guest RAM while the vCPUs are held (about
19 ms a GiB populated here), so the pause grows with the guest. Here instead:

1. The VMM forks a child with guest RAM left out of it (MADV_DONTFORK, so the fork copies
   almost nothing) that holds a userfaultfd on the VMM's guest RAM. The VMM keeps no copy
   of the descriptor: if the child dies, the kernel drops the tracking and wakes every
   waiter.
2. Arming, while the guest runs: the child write-protects guest RAM a chunk at a time
   (pages not yet populated too). A write to a protected page waits for the child, which
   notes the page as written and lifts its protection.
3. The snapshot, with the vCPUs held: the VMM reads their registers and asks the child to
   protect again the pages written while it armed; then the guest runs on. The pause is
   that round trip and the pages written during arming, not the size of guest RAM.
4. Copying: the first write to a page after the snapshot waits while the child copies the
   page's old bytes; the child reads guest memory from the VMM (process_vm_readv), takes
   the saved copy of every page written since, and writes the dump. It then lifts all
   protection and ends.

Discards (virtio-mem unplug) tell the child before the pages go (a discard listener): while
arming, the range is protected again at the snapshot; after it, its held pages are saved
first. Host memory cost: one copy of each page the guest writes while the dump is written,
in the child, as with fork; each such first write waits about a hundred microseconds.

Needs userfaultfd with write-protection of unpopulated pages (Linux 6.4, privileged or
vm.unprivileged_userfaultfd=1) and guest RAM that is all anonymous (files mapped over RAM,
or file-backed RAM, cannot be write-protected so); otherwise machine/dump.py forks.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from leanvm.errors import GuestError, LeanvmError
from leanvm.memory.userfaultfd import UffdUnavailable, Userfaultfd, read_remote

if TYPE_CHECKING:
    from leanvm.dump.source import DumpSource
    from leanvm.machine.dump import DumpRequest, LiveDump
    from leanvm.machine.machine import Machine
    from leanvm.memory.guest import GuestRegion

PAGE = 4096
ARM_CHUNK = 64 << 20  # bytes protected per ioctl while arming (faults are served between)
REARM_PAGES = 2048  # pages written while arming above which they are protected again first
REARM_PASSES = 3  # at most, so that a guest that writes everything still gets its dump
ARM_TIMEOUT = 60.0  # seconds the VMM waits for the child to arm
REPLY_TIMEOUT = 30.0  # seconds the VMM waits for an answer to a snapshot or a discard
ZERO_PAGE = bytes(PAGE)


def _ranges(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page addresses as (address, size) runs."""
    out: list[list[int]] = []
    for page in sorted(pages):
        if out and out[-1][0] + out[-1][1] == page:
            out[-1][1] += PAGE
        else:
            out.append([page, PAGE])
    return [(a, n) for a, n in out]


class Tracker:
    """The child's side. ``held``: a byte per page of each range, 1 where the page held
    memory (what the dump holds), kept true through arming and frozen at the snapshot;
    ``saved``: the old bytes of each held page written (or discarded) since. Faults and
    the VMM's requests are served by one thread (``serve``); the writer reads through
    ``read``."""

    def __init__(self, uffd: Userfaultfd, pid: int, ranges: list[tuple[int, int]],
                 control: Connection) -> None:
        self.uffd, self.pid, self.ranges, self.control = uffd, pid, ranges, control
        self.armed = False  # all of guest RAM protected
        self.copying = False  # the snapshot is taken
        self.held = {address: bytearray(size // PAGE) for address, size in ranges}
        self.written: set[int] = set()  # pages written while arming
        self.dropped: list[tuple[int, int]] = []  # ranges discarded while arming
        self.saved: dict[int, bytes] = {}  # page -> its bytes at the snapshot
        self.lock = threading.Lock()
        self.snapshot = threading.Event()
        self.finish = threading.Event()
        self.message: Any = None  # what the VMM sent with the snapshot
        self.faults = 0
        self.error: BaseException | None = None  # why serving stopped early, if it did

    def _flags(self, address: int) -> tuple[bytearray, int]:
        """The held bytes of the range holding ``address``, and its page's index there."""
        for base, size in self.ranges:
            if base <= address < base + size:
                return self.held[base], (address - base) // PAGE
        raise LeanvmError(f"a write fault at {address:#x}, outside guest RAM")

    # --- the fault-serving thread ------------------------------------------------------
    def _arm(self, address: int, size: int) -> None:
        """Protect a chunk. Held: what held memory before, or is present after (populated
        in between; a protected page never populated reads as swapped)."""
        from leanvm.memory.populated import held_flags

        before = held_flags(address, size, self.pid)
        self.uffd.protect(address, size)
        after = held_flags(address, size, self.pid, present_only=True)
        both = int.from_bytes(before, "little") | int.from_bytes(after, "little")
        flags, index = self._flags(address)
        flags[index:index + len(before)] = both.to_bytes(len(before), "little")

    def _serve_faults(self) -> None:
        for page in self.uffd.faults():
            self.faults += 1
            flags, index = self._flags(page)
            if not self.copying:
                self.written.add(page)
                flags[index] = 1  # the write populates it
            elif flags[index] and page not in self.saved:
                self._save(page, PAGE)
            self.uffd.protect(page, PAGE, on=False)

    def _save(self, address: int, size: int) -> None:
        """Keep the old bytes of the held pages of the range not saved yet."""
        flags, index = self._flags(address)
        wanted = [at for at in range(0, size, PAGE)
                  if flags[index + at // PAGE] and address + at not in self.saved]
        if not wanted:
            return
        data = read_remote(self.pid, address + wanted[0], wanted[-1] + PAGE - wanted[0])
        with self.lock:
            for at in wanted:
                offset = at - wanted[0]
                self.saved[address + at] = bytes(data[offset:offset + PAGE])

    def _take_snapshot(self) -> None:
        from leanvm.memory.populated import held_flags

        self._serve_faults()
        for address, size in self.dropped:  # emptied since: what has been written there?
            flags, index = self._flags(address)  # (the protection of an empty page may or may
            flags[index:index + size // PAGE] = held_flags(  # not outlive a discard, by kernel)
                address, size, self.pid, present_only=True)
        for address, size in _ranges(list(self.written)) + self.dropped:
            self.uffd.protect(address, size)
        self.copying = True

    def _on_discard(self, address: int, size: int) -> None:
        if self.copying:
            self._save(address, size)
        else:
            self.dropped.append((address, size))

    def _request(self) -> None:
        try:
            message = self.control.recv()
        except (EOFError, OSError):
            self.finish.set()
            return
        kind = message[0]
        if kind == "snapshot":
            self.message = message[1]
            self._take_snapshot()
            self.control.send(("taken", self.faults))
            self.snapshot.set()
        elif kind == "discard":
            self._on_discard(message[1], message[2])
            self.control.send(("saved",))
        elif kind == "armed?":
            self.control.send(("armed", self.armed))

    def serve(self) -> None:
        """Arm, then serve faults and the VMM's requests until ``finish``; lift all
        protection at the end."""
        selector = selectors.DefaultSelector()
        selector.register(self.uffd.fd, selectors.EVENT_READ, "fault")
        selector.register(self.control.fileno(), selectors.EVENT_READ, "control")
        pending = [(a + o, min(ARM_CHUNK, n - o)) for a, n in self.ranges
                   for o in range(0, n, ARM_CHUNK)]
        passes = 0
        try:
            while not self.finish.is_set():
                if pending:
                    address, size = pending.pop(0)
                    if passes:  # known held: protect again, no pagemap needed
                        self.uffd.protect(address, size)
                    else:
                        self._arm(address, size)
                    if not pending and len(self.written) > REARM_PAGES and passes < REARM_PASSES:
                        passes += 1  # a busy guest: protect its writes again before the pause
                        pending, self.written = _ranges(list(self.written)), set()
                    self.armed = not pending
                for key, _ in selector.select(0 if pending else 0.05):
                    if key.data == "fault":
                        self._serve_faults()
                    else:
                        self._request()
        except BaseException as exc:  # the writer fails rather than write a torn dump
            self.error = exc
        finally:
            self.finish.set()
            for address, size in self.ranges:  # the guest writes freely again
                for offset in range(0, size, ARM_CHUNK):
                    self.uffd.protect(address + offset, min(ARM_CHUNK, size - offset),
                                      on=False)
                    self._serve_faults()
                self.uffd.unregister(address, size)
            self.uffd.close()

    # --- the dump writer -----------------------------------------------------------------
    def read(self, address: int, size: int) -> bytes:
        """Guest memory as it was at the snapshot: read from the VMM, then the saved old
        bytes of every page written since laid over it (saved before the write lands, so
        whatever the read raced with is covered)."""
        if self.error is not None:
            raise LeanvmError(f"the live dump lost track of guest writes: {self.error}")
        data = read_remote(self.pid, address, size)
        with self.lock:
            saved = self.saved
            if saved:
                for at in range(0, size, PAGE):
                    old = saved.get(address + at)
                    if old is not None:
                        data[at:at + PAGE] = old
        return bytes(data)

    def held_runs(self, address: int) -> list[tuple[int, int]]:
        """(offset, length) of the pages of the range at ``address`` that held memory at
        the snapshot."""
        from leanvm.memory.populated import flag_runs

        return flag_runs(self.held[address])


class _RemoteMemory:
    """What the page-table walk (ELF paging) needs of GuestMemory, read through the
    tracker: guest-physical reads as at the snapshot."""

    def __init__(self, machine: "Machine", tracker: Tracker) -> None:
        self.regions = machine.memory.regions
        self._ram = machine.memory.ram_regions()
        self._tracker = tracker

    def read(self, address: int, size: int) -> bytes:
        for region in self._ram:
            if region.base <= address and address + size <= region.base + region.size:
                return self._tracker.read(region.mapping.address + address - region.base, size)
        raise GuestError(f"guest-physical {address:#x} is not RAM")


class _DiscardTap:
    """A discard listener in the VMM: before a range of guest RAM is given back, the child
    saves what it needs of it. Added last, so it hears a discard before the memory
    manager gives the pages back."""

    def __init__(self, ask: Callable[[tuple], Any], region: "GuestRegion") -> None:
        self._ask, self._region = ask, region
        self.active = True

    def on_populate(self, offset: int, size: int) -> None:
        pass

    def on_discard(self, offset: int, size: int) -> None:
        if self.active:
            self._ask(("discard", self._region.mapping.address + offset, size))


def build_child_source(machine: "Machine", tracker: Tracker, request: "DumpRequest"
                       ) -> "DumpSource":
    from leanvm.dump.source import LazyBytes
    from leanvm.machine.dump import assemble_source, memory_runs

    cpus, vmcoreinfo = tracker.message
    runs, ram = memory_runs(
        machine.memory,
        held_of=lambda r: tracker.held_runs(r.mapping.address),
        data_of=lambda r, o, n: LazyBytes(tracker.read, r.mapping.address + o, n))
    return assemble_source(machine, runs, ram, cpus, vmcoreinfo, request,
                           _RemoteMemory(machine, tracker))  # type: ignore[arg-type]


class _Channel:
    """The VMM's end of the control socket: one request at a time, each answered; None
    once the child is gone (the kernel has dropped the tracking with it)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def ask(self, message: tuple) -> Any:
        with self._lock:
            try:
                self._connection.send(message)
                if not self._connection.poll(REPLY_TIMEOUT):
                    raise LeanvmError("the dump process did not answer")
                return self._connection.recv()
            except (EOFError, OSError):
                return None

    def wait_armed(self) -> None:
        """Ask until the child has protected all guest RAM (asked, never told: a discard's
        question and this one never cross)."""
        deadline = time.monotonic() + ARM_TIMEOUT
        while time.monotonic() < deadline:
            answer = self.ask(("armed?",))
            if answer is None:
                raise LeanvmError("the dump process failed while arming")
            if answer[1]:
                return
            time.sleep(0.002)
        raise LeanvmError("the dump process did not arm in time")

    def close(self) -> None:
        self._connection.close()


def _tap_discards(regions: "list[GuestRegion]", channel: _Channel) -> Callable[[], None]:
    """Hear discards of guest RAM from now on; the function that stops it."""
    taps = [(r.discard, _DiscardTap(channel.ask, r)) for r in regions if r.discard is not None]
    for manager, tap in taps:
        manager.add_listener(tap, replay=False)

    def untap() -> None:
        for manager, tap in taps:
            tap.active = False
            manager.remove_listener(tap)

    return untap


def _fork_without_ram(regions: "list[GuestRegion]") -> int:
    """fork(), guest RAM left out of the child (so the fork copies almost nothing)."""
    pid = -1
    for region in regions:
        region.mapping.inherit(False)
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            for region in regions:
                region.mapping.inherit(True)
    return pid


def _snapshot(machine: "Machine", channel: _Channel) -> float:
    """Hold the vCPUs, read their registers and VMCOREINFO, have the child protect again
    what was written while it armed, let them go: the pause in milliseconds."""
    from leanvm.machine.dump import _vmcoreinfo_record, cpu_state, guest_vmcoreinfo

    gate = machine.pause_gate
    held = time.perf_counter()
    gate.hold(machine.loop_control)
    try:
        cpus = [cpu_state(vcpu) for vcpu in machine.vcpus]
        vmcoreinfo = guest_vmcoreinfo(machine.memory, _vmcoreinfo_record(machine))
        answer = channel.ask(("snapshot", (cpus, vmcoreinfo)))
    finally:
        gate.release()
    if answer is None or answer[0] != "taken":
        raise LeanvmError("the dump process failed before the snapshot")
    return (time.perf_counter() - held) * 1e3


def _tracking(machine: "Machine") -> tuple[Userfaultfd, list[tuple[int, int]]]:
    from leanvm.machine.dump import _anonymous_only

    if not _anonymous_only(machine.memory):
        raise UffdUnavailable("files are mapped over guest RAM")
    ranges = [(r.mapping.address, r.size) for r in machine.memory.ram_regions()]
    uffd = Userfaultfd()
    try:
        for address, size in ranges:
            uffd.register(address, size)
    except LeanvmError as exc:
        uffd.close()
        raise UffdUnavailable(str(exc)) from None
    return uffd, ranges


def dump_protected(machine: "Machine", request: "DumpRequest",
                   progress: Callable[[int], None] | None = None) -> "LiveDump":
    """A live dump through write-protection (this module's docstring). Raises
    UffdUnavailable, before the guest is touched, where this cannot be done."""
    from leanvm.machine.dump import LiveDump, _preload, report_child

    started = time.monotonic()
    uffd, ranges = _tracking(machine)
    _preload(request)
    ours, theirs = socket.socketpair()
    channel = _Channel(Connection(os.dup(ours.fileno())))
    ours.close()
    reader, writer = os.pipe()
    regions = machine.memory.ram_regions()
    untap = _tap_discards(regions, channel)  # before arming: no discard goes unheard
    try:
        pid = _fork_without_ram(regions)
    except BaseException:
        untap()
        uffd.close()
        for fd in (reader, writer):
            os.close(fd)
        raise
    if pid == 0:  # the child never returns from here
        os.close(reader)
        channel.close()
        tracker = Tracker(uffd, os.getppid(), ranges, Connection(os.dup(theirs.fileno())))
        report_child(writer, request, lambda: build_child_source(machine, tracker, request),
                     tracker=tracker)
    uffd.close()  # the child holds the only descriptor now
    theirs.close()
    os.close(writer)

    def end() -> None:
        untap()
        channel.close()

    try:
        channel.wait_armed()
        pause_ms = _snapshot(machine, channel)
    except (EOFError, OSError, LeanvmError):
        end()  # the child reports its error on the pipe, or gives up at EOF
        return LiveDump(pid, reader, request, 0.0, started, progress, method="protect")
    return LiveDump(pid, reader, request, pause_ms, started, progress, on_end=end,
                    method="protect")


def start_serving(tracker: Tracker) -> threading.Thread:
    """In the child: start the fault-serving thread and wait for the snapshot."""
    thread = threading.Thread(target=tracker.serve, name="leanvm-dump-faults", daemon=True)
    thread.start()
    while not tracker.snapshot.wait(0.1):
        if tracker.finish.is_set() or not thread.is_alive():
            raise LeanvmError("the live dump was given up before its snapshot")
    return thread
