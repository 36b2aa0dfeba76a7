"""KVM's coalesced I/O ring, read as leanvm reads it (kvm/coalesced.py), and the flusher
that keeps it moving when the guest makes no exits (machine/flusher.py)."""

from __future__ import annotations

import struct
import threading

from leanvm.abi import kvm as abi
from leanvm.kvm.coalesced import CoalescedRing
from leanvm.machine.flusher import RingFlusher


def ring_with(entries: list[tuple[int, int, int, bytes]], first: int = 0) -> bytearray:
    """A ring page as KVM writes it: (address, length, pio, data) appended from ``first``."""
    page = bytearray(4096)
    slot = first
    for address, length, pio, data in entries:
        struct.pack_into("<QII8s", page, abi.COALESCED_RING_HEADER + slot * abi.COALESCED_ENTRY,
                         address, length, pio, data.ljust(8, b"\0"))
        slot = (slot + 1) % abi.COALESCED_MAX
    struct.pack_into("<II", page, 0, first, slot)
    return page


def test_writes_come_out_in_order_across_the_wrap_and_the_ring_is_freed() -> None:
    first = abi.COALESCED_MAX - 2  # the queue wraps past the ring's end
    page = ring_with([(0x3F8, 1, 1, b"a"), (0x3F8, 1, 1, b"b"), (0x3F8, 1, 1, b"c"),
                      (0xD000_0000, 4, 0, b"\x01\x02\x03\x04")], first)
    ring = CoalescedRing(memoryview(page))
    seen: list[tuple[bool, int, int, int]] = []
    assert ring.pending()
    assert ring.drain(lambda *write: seen.append(write)) == 4
    assert seen == [(True, 0x3F8, 1, ord("a")), (True, 0x3F8, 1, ord("b")),
                    (True, 0x3F8, 1, ord("c")), (False, 0xD000_0000, 4, 0x04030201)]
    assert struct.unpack_from("<II", page, 0) == (2, 2) and not ring.pending()
    assert ring.consumed == 4 and ring.drain(lambda *write: seen.append(write)) == 0


def test_impossible_entries_are_skipped_and_a_bad_index_is_not_followed() -> None:
    page = ring_with([(0x3F8, 0, 1, b""), (0x3F8, 99, 1, b"x"), (0x3F8, 1, 1, b"z")])
    seen: list[int] = []
    CoalescedRing(memoryview(page)).drain(lambda pio, address, size, value: seen.append(value))
    assert seen == [ord("z")]
    struct.pack_into("<II", page, 0, abi.COALESCED_MAX + 5, 3)  # first beyond the ring
    assert CoalescedRing(memoryview(page)).drain(lambda *w: seen.append(0)) == 0


def test_the_flusher_kicks_only_when_nobody_empties_the_queue() -> None:
    page = ring_with([(0x3F8, 1, 1, b"a")])
    ring = CoalescedRing(memoryview(page))
    kicked = threading.Event()
    flusher = RingFlusher(ring, kicked.set, interval=0.005)
    flusher.start()
    try:
        assert kicked.wait(2), "a queue nobody empties must be kicked"
    finally:
        flusher.stop()
    ring.drain(lambda *write: None)
    quiet = threading.Event()
    idle = RingFlusher(ring, quiet.set, interval=0.005)
    idle.start()
    try:
        assert not quiet.wait(0.1)  # an empty queue never needs a kick
    finally:
        idle.stop()


def test_the_uart_says_when_its_transmit_interrupt_goes_on_and_off() -> None:
    from leanvm.devices.serial import IER, IER_RDI, IER_THRI, Serial16550

    told: list[bool] = []
    uart = Serial16550(lambda data: None, on_tx_interrupts=told.append)
    uart.write(IER, 1, IER_RDI)  # another interrupt: nothing to say
    uart.write(IER, 1, IER_RDI | IER_THRI)
    uart.write(IER, 1, IER_THRI)  # still on
    uart.write(IER, 1, 0)
    assert told == [True, False]


def test_the_console_queue_is_taken_back_while_the_guest_waits_for_interrupts() -> None:
    from leanvm.machine.platform import PORT, ConsoleQueue

    calls: list[tuple[int, int, bool, bool]] = []

    class FakeVm:
        def coalesce(self, address: int, size: int, *, pio: bool, remove: bool = False) -> None:
            calls.append((address, size, pio, remove))

    queue = ConsoleQueue(FakeVm())
    queue.set(True)
    queue.set(True)  # no second registration
    queue.set(False)
    queue.set(True)
    com1 = PORT["com1"].base
    assert calls == [(com1, 1, True, False), (com1, 1, True, True), (com1, 1, True, False)]
    assert queue.queued and queue.switches == 3
