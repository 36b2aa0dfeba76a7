"""The virtio-mmio transport, version 2 ("modern") registers (virtio 1.2, section 4.2.2).

The transport owns what every virtio device has: feature negotiation, device status and
reset, the queues' registers, the interrupt status and the configuration generation. A
device model (mem.py, later blk.py, console.py) supplies its id, its feature bits, its
configuration space and what to do with a queue's buffers; it never sees a register.

Notifications: the driver writes a queue's index to QueueNotify. Where KVM has ioeventfd the
machine lets that write signal an eventfd instead of exiting and calls ``notify`` from its
I/O thread; otherwise the write arrives here as an MMIO exit and is handled on the spot.
Interrupts go through ``interrupt``, a callback the machine wires to an irqfd (or, without
one, to an edge on the VM's IRQ line). Everything is done under one lock, as vCPU, I/O and
API threads all reach the device.

A driver that breaks the spec in a ring (devices/virtio/queue.py) puts the device into
DEVICE_NEEDS_RESET with a configuration-change interrupt (2.1.1); nothing more happens
until the driver resets it (Status = 0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from leanvm.devices.virtio.queue import QueueError, SplitQueue
from leanvm.errors import GuestError

if TYPE_CHECKING:
    from leanvm.memory.guest import GuestMemory

WINDOW_SIZE = 0x200  # the register block and up to 256 bytes of configuration space
MAGIC = 0x74726976  # "virt"
VERSION = 2  # modern (1.0+) register layout; 1 is the legacy layout
VENDOR_ID = 0x4C4E564D  # "LNVM": any value; Linux prints it, nothing else reads it
CONFIG_OFFSET = 0x100

# registers (4.2.2): offset -> meaning; R read-only, W write-only
MAGIC_VALUE = 0x000  # R
VERSION_REG = 0x004  # R
DEVICE_ID = 0x008  # R
VENDOR = 0x00C  # R
DEVICE_FEATURES = 0x010  # R: 32 feature bits, the word DeviceFeaturesSel selects
DEVICE_FEATURES_SEL = 0x014  # W
DRIVER_FEATURES = 0x020  # W
DRIVER_FEATURES_SEL = 0x024  # W
QUEUE_SEL = 0x030  # W
QUEUE_NUM_MAX = 0x034  # R: 0 when the selected queue does not exist
QUEUE_NUM = 0x038  # W
QUEUE_READY = 0x044  # RW
QUEUE_NOTIFY = 0x050  # W: the queue's index
INTERRUPT_STATUS = 0x060  # R
INTERRUPT_ACK = 0x064  # W
STATUS = 0x070  # RW: writing 0 resets the device
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084  # W
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094  # W: the available ring
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4  # W: the used ring
SHM_SEL = 0x0AC  # W: shared memory regions (none here)
SHM_LEN_LOW, SHM_LEN_HIGH = 0x0B0, 0x0B4  # R: all ones = no such region
SHM_BASE_LOW, SHM_BASE_HIGH = 0x0B8, 0x0BC  # R
CONFIG_GENERATION = 0x0FC  # R

# device status bits (2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80
# interrupt status bits (4.2.2)
USED_BUFFER, CONFIG_CHANGE = 1, 2
# transport feature bits (6)
F_VERSION_1 = 1 << 32  # required of a modern device and driver
F_ACCESS_PLATFORM = 1 << 33
TRANSPORT_FEATURES = F_VERSION_1


class VirtioDevice(Protocol):
    """What a device model gives the transport."""

    device_id: int
    features: int  # device-specific feature bits (the transport adds VERSION_1)
    queue_sizes: tuple[int, ...]  # each queue's maximum size

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def process(self, queue: int, transport: "MmioTransport") -> None:
        """Take and answer what the driver made available on ``queue``."""

    def reset(self) -> None:
        """The driver reset the device (Status = 0)."""


class MmioTransport:
    """One virtio-mmio window (WINDOW_SIZE bytes) holding ``device``."""

    def __init__(self, device: VirtioDevice, memory: "GuestMemory",
                 interrupt: Callable[[], None]) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt  # raise an edge on the device's interrupt line
        self.lock = threading.RLock()
        self.queues = [SplitQueue(size) for size in device.queue_sizes]
        self.offered = device.features | TRANSPORT_FEATURES
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.notifies = 0  # counted for the stats
        self.interrupts = 0
        self.errors: list[str] = []  # why the device needed a reset (the last few)

    # --- the device's side ---------------------------------------------------------------
    @property
    def driver_ok(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.status & DEVICE_NEEDS_RESET

    def negotiated(self, feature_bit: int) -> bool:
        return bool(self.driver_features >> feature_bit & 1)

    def used(self) -> None:
        """The device returned buffers: interrupt unless the driver said not to."""
        self._raise(USED_BUFFER)

    def config_changed(self) -> None:
        """The device's configuration changed: a new generation, and an interrupt once the
        driver is up."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & DRIVER_OK:
                self._raise(CONFIG_CHANGE)

    def fail(self, why: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET, and the driver hears of it."""
        with self.lock:
            self.errors = [*self.errors[-7:], why]
            for queue in self.queues:
                queue.broken = True
            if not self.status & DEVICE_NEEDS_RESET:
                self.status |= DEVICE_NEEDS_RESET
                self._raise(CONFIG_CHANGE)

    def _raise(self, bit: int) -> None:
        self.interrupt_status |= bit
        self.interrupts += 1
        self.interrupt()

    def notify(self, queue: int) -> None:
        """The driver notified ``queue`` (from QueueNotify or its ioeventfd)."""
        with self.lock:
            self.notifies += 1
            if not self.driver_ok or not 0 <= queue < len(self.queues):
                return
            if not self.queues[queue].ready:
                return
            try:
                self.device.process(queue, self)
            except GuestError as exc:  # QueueError included: a hostile or broken driver
                self.fail(str(exc))

    # --- registers -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                return self._read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4:
                return 0  # 4.2.2.2: registers are read 32 bits wide
            return self._read_register(offset)

    def _read_config(self, offset: int, size: int) -> int:
        if size == 8:  # two 32-bit halves, as a driver must read 64-bit fields anyway
            return self._read_config(offset, 4) | self._read_config(offset + 4, 4) << 32
        if offset % size or offset + size > WINDOW_SIZE - CONFIG_OFFSET:
            return 0
        return self.device.read_config(offset, size) & ((1 << (8 * size)) - 1)

    def _read_register(self, offset: int) -> int:
        queue = self._selected()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self.offered >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # 4.2.2: no shared memory region with that id
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only and reserved registers read as zero

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                if offset % size == 0 and offset + size <= WINDOW_SIZE:
                    self.device.write_config(offset - CONFIG_OFFSET, size, value)
                return
            if size != 4 or offset % 4:
                return
            self._write_register(offset, value)
        if offset == QUEUE_NOTIFY:  # outside the lock's first hold: notify takes it itself
            self.notify(value)

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._selected()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & FEATURES_OK or self.driver_features_sel >= 2:
                return  # features are fixed once FEATURES_OK is set
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) \
                | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif queue is not None and not queue.ready:  # a queue is programmed before ready
            self._write_queue(queue, offset, value)
        elif queue is not None and offset == QUEUE_READY and not value:
            queue.ready = False

    def _write_queue(self, queue: SplitQueue, offset: int, value: int) -> None:
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY and value:
            try:
                queue.check_layout(self.memory)
            except QueueError as exc:
                self.fail(f"queue {self.queue_sel}: {exc}")
                return
            queue.ready = True
        elif offset in (QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW):
            name = {QUEUE_DESC_LOW: "desc", QUEUE_DRIVER_LOW: "avail",
                    QUEUE_DEVICE_LOW: "used"}[offset]
            setattr(queue, name, (getattr(queue, name) & ~0xFFFFFFFF) | value)
        elif offset in (QUEUE_DESC_HIGH, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_HIGH):
            name = {QUEUE_DESC_HIGH: "desc", QUEUE_DRIVER_HIGH: "avail",
                    QUEUE_DEVICE_HIGH: "used"}[offset]
            setattr(queue, name, (getattr(queue, name) & 0xFFFFFFFF) | value << 32)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            # 3.1.1: FEATURES_OK only for a subset of what was offered, with VERSION_1
            if self.driver_features & ~self.offered or not self.driver_features & F_VERSION_1:
                value &= ~FEATURES_OK
        if value & DRIVER_OK and not (value | self.status) & FEATURES_OK:
            value &= ~DRIVER_OK  # DRIVER_OK before features were accepted
        self.status = (self.status & DEVICE_NEEDS_RESET) | (value & 0xFF)
        if value & DRIVER_OK:
            for index, queue in enumerate(self.queues):  # buffers made available earlier
                if queue.ready:
                    self.notify(index)

    def reset(self) -> None:
        with self.lock:
            self.status = 0
            self.interrupt_status = 0
            self.driver_features = 0
            self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
            for queue in self.queues:
                queue.reset()
            self.device.reset()

    def _selected(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if 0 <= self.queue_sel < len(self.queues) else None
