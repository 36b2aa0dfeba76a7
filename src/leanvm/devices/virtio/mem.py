"""virtio-mem (virtio 1.2, section 5.15): guest memory plugged and unplugged in blocks.

The device owns a region of guest-physical space (``addr``, ``region_size``) cut into blocks
of ``block_size`` bytes. The host sets ``requested_size``; the driver plugs and unplugs
blocks with requests on its one queue until ``plugged_size`` matches. Which blocks hold
memory is the region's discard manager (memory/discard.py): a PLUG populates its range, an
UNPLUG discards it, and the discard manager's listeners give the pages back to the host.

Offered: VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (the driver never touches unplugged blocks, so
they need no backing at all). Not offered: VIRTIO_MEM_F_ACPI_PXM (one NUMA node).

Requests (24 bytes: type u16, 6 padding bytes, addr u64, nb_blocks u16, 6 padding bytes)
and answers (10 bytes: type u16, 6 padding, state u16), as QEMU's hw/virtio/virtio-mem.c
answers them:
  PLUG / UNPLUG  ERROR for a range that is not whole blocks inside the usable region (or
                 wraps); NACK for a plug beyond requested_size; ERROR unless every block is
                 in the other state; else ACK.
  UNPLUG_ALL     ACK (everything discarded).
  STATE          ERROR for a bad range; else ACK with PLUGGED, UNPLUGGED or MIXED.
  anything else  ERROR.
A request or answer buffer that is too short breaks the protocol: the transport marks the
device DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from leanvm.errors import ConfigError, GuestError

if TYPE_CHECKING:
    from leanvm.devices.virtio.mmio import MmioTransport
    from leanvm.memory.discard import DiscardManager

DEVICE_ID = 24  # VIRTIO_ID_MEM
F_ACPI_PXM = 1 << 0  # node_id is valid (not offered)
F_UNPLUGGED_INACCESSIBLE = 1 << 1  # the driver does not access unplugged memory
QUEUE_SIZE = 128  # as QEMU's
MIN_BLOCK_SIZE = 2 << 20  # QEMU's default and minimum on x86 (a THP)

CONFIG = struct.Struct("<QH6xQQQQQ")  # block_size, node_id, addr, region_size,
assert CONFIG.size == 56  # usable_region_size, plugged_size, requested_size
REQUEST = struct.Struct("<H6xQH6x")  # type, addr, nb_blocks
RESPONSE = struct.Struct("<H6xH")  # type, state
REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, REQ_STATE = 0, 1, 2, 3
RESP_ACK, RESP_NACK, RESP_BUSY, RESP_ERROR = 0, 1, 2, 3
STATE_PLUGGED, STATE_UNPLUGGED, STATE_MIXED = 0, 1, 2
REQUEST_NAMES = {REQ_PLUG: "plug", REQ_UNPLUG: "unplug", REQ_UNPLUG_ALL: "unplug-all",
                 REQ_STATE: "state"}
RESPONSE_NAMES = {RESP_ACK: "ack", RESP_NACK: "nack", RESP_BUSY: "busy", RESP_ERROR: "error"}


class VirtioMem:
    """The device model; ``discard`` tracks its region (block_size granularity)."""

    device_id = DEVICE_ID
    features = F_UNPLUGGED_INACCESSIBLE
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name: str, addr: int, discard: "DiscardManager",
                 requested_size: int = 0) -> None:
        self.name = name
        self.addr = addr
        self.discard = discard
        self.block_size = discard.block_size
        self.region_size = discard.size
        self.usable_region_size = self.region_size
        self.requested_size = 0
        self.transport: "MmioTransport | None" = None
        self.requests: dict[str, int] = {}  # "plug ack" -> count
        self.unplug_ns = 0  # VMM time spent answering unplugs (discarding included)
        self.unplugged_blocks = 0
        self.last_change_ns = 0  # CLOCK_MONOTONIC of the last plug or unplug answered
        self.set_requested(requested_size)

    @property
    def plugged_size(self) -> int:
        return self.discard.populated_bytes

    def set_requested(self, size: int) -> None:
        """The size the host wants plugged (the driver is told if it is running)."""
        if size < 0 or size % self.block_size or size > self.region_size:
            raise ConfigError(f"{self.name}: requested size {size:#x} must be a multiple of the "
                              f"block size {self.block_size >> 10}K from 0 to the region's "
                              f"{self.region_size >> 20}M")
        self.requested_size = size
        if self.transport is not None:
            self.transport.config_changed()

    # --- the transport's interface -------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        data = CONFIG.pack(self.block_size, 0, self.addr, self.region_size,
                           self.usable_region_size, self.plugged_size, self.requested_size)
        return int.from_bytes(data[offset:offset + size], "little")  # beyond: zeros

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # the configuration is read-only to the driver

    def reset(self) -> None:
        """A device reset leaves the blocks as they are (5.15.5): a new driver finds
        plugged_size and unplugs all first."""

    def process(self, queue: int, transport: "MmioTransport") -> None:
        memory = transport.memory
        answered = False
        vq = transport.queues[queue]
        while (chain := vq.pop(memory)) is not None:
            request = chain.read_all(memory, REQUEST.size)
            if len(request) < REQUEST.size or chain.writable_length < RESPONSE.size:
                raise GuestError(f"{self.name}: request of {len(request)} bytes with "
                                 f"{chain.writable_length} bytes for the answer (needs "
                                 f"{REQUEST.size} and {RESPONSE.size})")
            kind, address, blocks = REQUEST.unpack(request)
            answer, state = self.handle(kind, address, blocks)
            name = f"{REQUEST_NAMES.get(kind, 'unknown')} {RESPONSE_NAMES[answer]}"
            self.requests[name] = self.requests.get(name, 0) + 1
            written = chain.write_all(memory, RESPONSE.pack(answer, state))
            vq.push(memory, chain.head, written)
            answered = True
        if answered and vq.wants_interrupt(memory):
            transport.used()

    # --- requests ------------------------------------------------------------------------
    def handle(self, kind: int, address: int, blocks: int) -> tuple[int, int]:
        """(answer, state) for one request."""
        if kind == REQ_UNPLUG_ALL:
            start = time.monotonic_ns()
            count = self.discard.populated_bytes // self.block_size
            self.discard.discard(0, self.region_size)
            self._unplugged(start, count)
            return RESP_ACK, 0
        if kind not in (REQ_PLUG, REQ_UNPLUG, REQ_STATE):
            return RESP_ERROR, 0
        size = blocks * self.block_size
        offset = address - self.addr
        if (not blocks or address % self.block_size or address < self.addr
                or offset + size > self.usable_region_size):
            return RESP_ERROR, 0
        if kind == REQ_STATE:
            if self.discard.is_populated(offset, size):
                return RESP_ACK, STATE_PLUGGED
            if self.discard.is_discarded(offset, size):
                return RESP_ACK, STATE_UNPLUGGED
            return RESP_ACK, STATE_MIXED
        if kind == REQ_PLUG:
            if self.plugged_size + size > self.requested_size:
                return RESP_NACK, 0
            if not self.discard.is_discarded(offset, size):
                return RESP_ERROR, 0
            self.discard.populate(offset, size)
            self.last_change_ns = time.monotonic_ns()
            return RESP_ACK, 0
        if not self.discard.is_populated(offset, size):
            return RESP_ERROR, 0
        start = time.monotonic_ns()
        self.discard.discard(offset, size)
        self._unplugged(start, blocks)
        return RESP_ACK, 0

    def _unplugged(self, start_ns: int, blocks: int) -> None:
        now = time.monotonic_ns()
        self.unplug_ns += now - start_ns
        self.unplugged_blocks += blocks
        self.last_change_ns = now

    def stats(self) -> dict[str, object]:
        return {"name": self.name, "address": self.addr, "region_size": self.region_size,
                "block_size": self.block_size, "requested_size": self.requested_size,
                "plugged_size": self.plugged_size, "requests": dict(self.requests),
                "unplugged_blocks": self.unplugged_blocks,
                "unplug_ns_per_block": (self.unplug_ns // self.unplugged_blocks
                                        if self.unplugged_blocks else None)}
