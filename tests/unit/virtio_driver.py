"""A tiny virtio-mmio driver for tests: it programs a transport as Linux's virtio_mmio does
(status, features, one queue in guest RAM) and submits descriptor chains."""

from __future__ import annotations

import struct

from leanvm.devices.virtio import mmio as m
from leanvm.devices.virtio.queue import DESC, DESC_F_NEXT, DESC_F_WRITE
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

RAM = 1 << 20  # guest RAM [0, 1 MiB) for rings and buffers
DESC_AT, AVAIL_AT, USED_AT, BUFFERS_AT = 0x1000, 0x3000, 0x4000, 0x8000


def guest_ram() -> GuestMemory:
    memory = GuestMemory()
    memory.add(GuestRegion("ram", 0, map_anonymous(RAM), RegionKind.RAM))
    return memory


class Driver:
    def __init__(self, transport: m.MmioTransport, queue_size: int = 16) -> None:
        self.t = transport
        self.memory = transport.memory
        self.size = queue_size
        self.avail_idx = 0
        self.used_seen = 0
        self.next_buffer = BUFFERS_AT

    def reg(self, offset: int) -> int:
        return self.t.read(offset, 4)

    def set(self, offset: int, value: int) -> None:
        self.t.write(offset, 4, value)

    def features(self) -> int:
        self.set(m.DEVICE_FEATURES_SEL, 0)
        low = self.reg(m.DEVICE_FEATURES)
        self.set(m.DEVICE_FEATURES_SEL, 1)
        return low | self.reg(m.DEVICE_FEATURES) << 32

    def start(self, features: int | None = None) -> bool:
        """Probe as Linux does; True when the device accepted the features."""
        assert self.reg(m.MAGIC_VALUE) == m.MAGIC and self.reg(m.VERSION_REG) == 2
        self.set(m.STATUS, 0)
        self.set(m.STATUS, m.ACKNOWLEDGE)
        self.set(m.STATUS, m.ACKNOWLEDGE | m.DRIVER)
        wanted = self.features() if features is None else features
        for word in (0, 1):
            self.set(m.DRIVER_FEATURES_SEL, word)
            self.set(m.DRIVER_FEATURES, (wanted >> (32 * word)) & 0xFFFFFFFF)
        self.set(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK)
        if not self.reg(m.STATUS) & m.FEATURES_OK:
            return False
        self.avail_idx = self.used_seen = 0  # fresh rings, as a driver allocates them
        for address in (DESC_AT, AVAIL_AT, USED_AT):
            self.memory.write(address, bytes(0x1000))
        self.set(m.QUEUE_SEL, 0)
        assert self.reg(m.QUEUE_NUM_MAX) >= self.size
        self.set(m.QUEUE_NUM, self.size)
        for low, address in ((m.QUEUE_DESC_LOW, DESC_AT), (m.QUEUE_DRIVER_LOW, AVAIL_AT),
                             (m.QUEUE_DEVICE_LOW, USED_AT)):
            self.set(low, address & 0xFFFFFFFF)
            self.set(low + 4, address >> 32)
        self.set(m.QUEUE_READY, 1)
        self.set(m.STATUS, m.ACKNOWLEDGE | m.DRIVER | m.FEATURES_OK | m.DRIVER_OK)
        return True

    def submit(self, readable: list[bytes], writable: list[int], head: int = 0,
               notify: bool = True) -> list[int]:
        """Put a chain at descriptors head.. and make it available; returns the writable
        buffers' addresses."""
        index, out = head, []
        parts = [(data, 0) for data in readable] + [(bytes(n), DESC_F_WRITE) for n in writable]
        for number, (data, flags) in enumerate(parts):
            if self.next_buffer + len(data) + 64 > RAM:
                self.next_buffer = BUFFERS_AT  # reuse: earlier chains are answered by now
            address = self.next_buffer
            self.next_buffer += max(len(data), 1) + 64
            self.memory.write(address, data)
            last = number == len(parts) - 1
            following = (index + 1) % self.size
            self.memory.write(DESC_AT + 16 * index, DESC.pack(
                address, len(data), flags | (0 if last else DESC_F_NEXT), following))
            if flags & DESC_F_WRITE:
                out.append(address)
            index = following
        self.memory.write_int(AVAIL_AT + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(AVAIL_AT + 2, 2, self.avail_idx)
        if notify:
            self.set(m.QUEUE_NOTIFY, 0)
        return out

    def used(self) -> list[tuple[int, int]]:
        """(id, len) of the used entries not seen yet."""
        idx = self.memory.read_int(USED_AT + 2, 2)
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.memory.read(USED_AT + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
