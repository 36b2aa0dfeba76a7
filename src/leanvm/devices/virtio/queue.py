"""The split virtqueue (virtio 1.2, section 2.7), read and written through GuestMemory.

Everything in a ring is guest-supplied and checked before use: the available index may run
at most a queue's worth ahead, descriptor indices must be below the queue size, a chain may
hold at most queue-size descriptors (so a loop ends), every buffer must lie wholly inside
guest RAM that holds memory (not MMIO, not unplugged: GuestMemory refuses those) without
wrapping 64 bits, device-writable buffers come after the readable ones, and indirect
descriptors (VIRTIO_F_INDIRECT_DESC, not offered) are refused. A violation raises
QueueError; the transport then marks the device DEVICE_NEEDS_RESET and stops using the
queue, as the spec allows (2.1.1), and the VMM carries on.

Layouts (little-endian):
  descriptor table  16 bytes each: addr u64, len u32, flags u16, next u16  (2.7.5)
  available ring    flags u16, idx u16, ring[size] u16, used_event u16     (2.7.6)
  used ring         flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16 (2.7.8)
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from leanvm.errors import GuestError

if TYPE_CHECKING:
    from leanvm.memory.guest import GuestMemory

MAX_QUEUE_SIZE = 32768  # 2.7: the largest split queue
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
DESC_F_NEXT = 1  # the chain goes on at `next`
DESC_F_WRITE = 2  # the device writes this buffer (else it reads it)
DESC_F_INDIRECT = 4  # the buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC)
AVAIL_F_NO_INTERRUPT = 1  # the driver needs no interrupt for used buffers
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4  # 2.7: the three parts' alignments
U64 = 1 << 64


class QueueError(GuestError):
    """The driver put something in a ring that breaks the spec."""


class Chain:
    """One descriptor chain popped from the available ring: readable buffers, then the
    writable ones, as (guest address, length)."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_length(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(length for _, length in self.writable)

    def read_all(self, memory: "GuestMemory", limit: int) -> bytes:
        """The readable buffers' bytes, at most ``limit`` of them."""
        out = bytearray()
        for address, length in self.readable:
            take = min(length, limit - len(out))
            if take <= 0:
                break
            out += memory.read(address, take)
        return bytes(out)

    def write_all(self, memory: "GuestMemory", data: bytes) -> int:
        """Write ``data`` across the writable buffers; returns the bytes written (fewer if
        the buffers are shorter)."""
        done = 0
        for address, length in self.writable:
            if done >= len(data):
                break
            piece = data[done:done + length]
            memory.write(address, piece)
            done += len(piece)
        return done


class SplitQueue:
    """One queue's guest-programmed state and the device's position in it."""

    __slots__ = ("max_size", "size", "ready", "desc", "avail", "used", "last_avail",
                 "used_idx", "broken")

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to "
                             f"{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size  # QueueNum; the driver may lower it
        self.ready = False
        self.desc = self.avail = self.used = 0
        self.last_avail = 0  # the next available-ring entry the device takes (mod 2^16)
        self.used_idx = 0  # the used ring's idx as the device last wrote it
        self.broken = False

    def check_layout(self, memory: "GuestMemory") -> None:
        """At QueueReady: size a power of two up to the maximum, each part aligned and
        wholly in guest memory."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two from 1 to "
                             f"{self.max_size}")
        for name, address, align, length in (
                ("descriptor table", self.desc, DESC_ALIGN, DESC_SIZE * size),
                ("available ring", self.avail, AVAIL_ALIGN, 6 + 2 * size),
                ("used ring", self.used, USED_ALIGN, 6 + 8 * size)):
            if address % align:
                raise QueueError(f"{name} at {address:#x} is not {align}-byte aligned")
            _check_buffer(memory, address, length, name)

    # --- the available side ------------------------------------------------------------
    def pending(self, memory: "GuestMemory") -> int:
        """Chains the driver has made available that the device has not taken."""
        avail_idx = memory.read_int(self.avail + 2, 2)
        waiting = (avail_idx - self.last_avail) & 0xFFFF
        if waiting > self.size:
            raise QueueError(f"available index {avail_idx} is {waiting} entries ahead of "
                             f"{self.last_avail}, more than the queue's {self.size}")
        return waiting

    def pop(self, memory: "GuestMemory") -> Chain | None:
        """The next available chain, checked, or None when there is none."""
        if not self.ready or self.broken or not self.pending(memory):
            return None
        slot = self.last_avail % self.size
        head = memory.read_int(self.avail + 4 + 2 * slot, 2)
        chain = self._walk(memory, head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, memory: "GuestMemory", head: int) -> Chain:
        size = self.size
        if head >= size:
            raise QueueError(f"chain head {head} is not below the queue size {size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(size):  # a chain longer than the queue loops
            address, length, flags, following = DESC.unpack(
                memory.read(self.desc + DESC_SIZE * index, DESC_SIZE))
            if flags & DESC_F_INDIRECT:
                raise QueueError(f"descriptor {index} is indirect, which was not negotiated")
            if length:
                _check_buffer(memory, address, length, f"descriptor {index}'s buffer")
            if flags & DESC_F_WRITE:
                writable.append((address, length))
            elif writable:
                raise QueueError(f"descriptor {index} is device-readable after a writable one")
            else:
                readable.append((address, length))
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            if following >= size:
                raise QueueError(f"descriptor {index} chains to {following}, not below the "
                                 f"queue size {size}")
            index = following
        raise QueueError(f"the chain from descriptor {head} is longer than the queue ({size}): "
                         "it loops")

    # --- the used side -----------------------------------------------------------------
    def push(self, memory: "GuestMemory", head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written."""
        slot = self.used_idx % self.size
        memory.write(self.used + 4 + 8 * slot, struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        memory.write_int(self.used + 2, 2, self.used_idx)  # after the entry (one thread)

    def wants_interrupt(self, memory: "GuestMemory") -> bool:
        """Whether the driver asked for interrupts (no VIRTIO_F_EVENT_IDX: the flag alone)."""
        return not memory.read_int(self.avail, 2) & AVAIL_F_NO_INTERRUPT


def _check_buffer(memory: "GuestMemory", address: int, length: int, what: str) -> None:
    if address < 0 or address + length > U64:
        raise QueueError(f"{what} [{address:#x}, +{length:#x}) wraps past 2^64")
    try:
        region = memory.find(address, length)
    except GuestError:
        raise QueueError(f"{what} [{address:#x}, +{length:#x}) is not in guest RAM") from None
    if region.readonly or (region.discard is not None
                           and not memory.holds(address, length)):
        raise QueueError(f"{what} [{address:#x}, +{length:#x}) is in {region.name}, which "
                         "a device may not use there")
