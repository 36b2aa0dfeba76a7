"""CFI01 parallel NOR flash (the Intel/Sharp command set of QEMU's pflash_cfi01).

The array lives in host memory the machine maps into the guest read-only: in read-array
mode ("ROMD") guest reads never reach this model, guest writes always do. Any command
leaves read-array mode; ``on_romd(False)`` tells the machine to unmap the array so reads
come here (status, identifier, CFI query), and ``on_romd(True)`` maps it back. The model
reports only real transitions, once per guest access, so a command that ends in read-array
mode costs no memslot change.

Bytes past the image (``image_size``) are erased flash: they read as 0xFF, and programming
or erasing there sets the error status. ``writable`` False (read-only code, or a readonly
store) makes every program or erase fail with the locked bit set. ``on_write(offset,
length)`` reports array bytes that changed, for persistence.

Compared with QEMU's model (see docs/flash.md): block lock bits are kept (0x60 0x01 locks
a block, 0x60 0xD0 unlocks all; program/erase on a locked block set 0x02 with the error),
a block erase happens on its 0xD0 confirm, not on the 0x20 setup, and a one-word buffered
write (count 0) works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

# first-cycle commands
CMD_READ_ARRAY = 0xFF
CMD_READ_ARRAY_QEMU = 0x00  # QEMU's model accepts 0x00 as read array too
CMD_AMD_RESET = 0xF0  # an AMD-style probe: treated as read array
CMD_PROGRAM = 0x40
CMD_PROGRAM_ALT = 0x10
CMD_BLOCK_ERASE = 0x20
CMD_CLEAR_STATUS = 0x50
CMD_LOCK_SETUP = 0x60
CMD_READ_STATUS = 0x70
CMD_READ_ID = 0x90
CMD_CFI_QUERY = 0x98
CMD_WRITE_BUFFER = 0xE8
# second-cycle values
CONFIRM = 0xD0  # erase confirm, buffer confirm, unlock all blocks
LOCK_BLOCK = 0x01

STATUS_READY = 0x80
STATUS_ERASE_ERROR = 0x20
STATUS_PROGRAM_ERROR = 0x10
STATUS_LOCKED = 0x02

CFI_TABLE_SIZE = 0x52
_CTZ = {1: 0, 2: 1, 4: 2, 8: 3}


class FlashGeometry(NamedTuple):
    """How the bank looks on the bus. ``device_width`` 0 is QEMU's legacy single-chip view."""

    name: str
    sector_size: int  # erase block as the guest sees it across the bank
    bank_width: int  # bytes per bus access
    device_width: int  # bytes per chip (0: unspecified, legacy addressing)
    ids: tuple[int, int, int, int]  # manufacturer, device, extra ids

    @property
    def devices(self) -> int:
        return self.bank_width // self.device_width if self.device_width else 1

    def buffer_size(self) -> int:
        """Bytes one write-to-buffer may cover (QEMU: 2^8 with width 1, else 2^11 per chip)."""
        return (1 << (0x08 if self.bank_width == 1 else 0x0B)) * self.devices


PC_GEOMETRY = FlashGeometry("pc", 4096, 1, 0, (0, 0, 0, 0))
VIRT_GEOMETRY = FlashGeometry("virt", 256 * 1024, 4, 2, (0x89, 0x18, 0, 0))
GEOMETRIES = {g.name: g for g in (PC_GEOMETRY, VIRT_GEOMETRY)}


def cfi_table(geometry: FlashGeometry, size: int) -> bytes:
    """The CFI query table (offsets 0x00..0x51) for a bank of ``size`` bytes."""
    blocks = size // geometry.sector_size
    sector_per_device = geometry.sector_size // geometry.devices
    device_len = sector_per_device * blocks
    t = bytearray(CFI_TABLE_SIZE)
    t[0x10:0x13] = b"QRY"
    t[0x13], t[0x15] = 0x01, 0x31  # Intel/Sharp command set; primary table at 0x31
    t[0x1B], t[0x1C] = 0x45, 0x55  # Vcc 4.5-5.5 V; no Vpp
    t[0x1F], t[0x20], t[0x21] = 0x07, 0x07, 0x0A  # typical timeouts: word, buffer, block
    t[0x23], t[0x24], t[0x25] = 0x04, 0x04, 0x04  # maximum timeouts (x16)
    t[0x27] = (device_len & -device_len).bit_length() - 1  # device size 2^n per chip
    t[0x28] = 0x02  # x8/x16 asynchronous interface
    t[0x2A] = 0x08 if geometry.bank_width == 1 else 0x0B  # buffer bytes 2^n per chip
    t[0x2C] = 0x01  # one uniform erase-block region
    t[0x2D], t[0x2E] = (blocks - 1) & 0xFF, ((blocks - 1) >> 8) & 0xFF
    t[0x2F], t[0x30] = (sector_per_device >> 8) & 0xFF, (sector_per_device >> 16) & 0xFF
    t[0x31:0x36] = b"PRI10"  # primary extended table, version 1.0
    t[0x3F] = 0x01  # protection register fields
    return bytes(t)


class CfiFlash:
    """One flash bank's command state machine over ``array`` (the whole bank's bytes)."""

    def __init__(self, array: memoryview, geometry: FlashGeometry, *, image_size: int,
                 writable: bool, on_romd: Callable[[bool], None] = lambda on: None,
                 on_write: Callable[[int, int], None] = lambda offset, length: None) -> None:
        self.array = array
        self.size = len(array)
        self.geometry = geometry
        self.image_size = image_size
        self.writable = writable
        self._on_romd = on_romd
        self._on_write = on_write
        self.table = cfi_table(geometry, self.size)
        self.status = STATUS_READY
        self.cmd = 0x00  # 0x00: read array
        self.wcycle = 0
        self.counter = 0
        self.buffer_base = -1
        self.buffer: bytearray | None = None
        self.locked: set[int] = set()  # locked block numbers
        self.romd = True
        self.romd_switches = 0
        bw = geometry.bank_width
        self._shift = _CTZ[bw]  # QEMU: ctz(bank) + ctz(max device width) - ctz(device width)

    # --- reads (only while not in read-array mode, or when the machine forwards them) ---
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return (1 << (8 * size)) - 1
        if self.cmd == 0x00:
            return int.from_bytes(self.array[offset:offset + size], "little")
        if size > 4:  # QEMU answers at most 4 bytes at a time: wider reads are 4-byte halves
            return self._command_read(offset, 4) | self._command_read(offset + 4, 4) << 32
        return self._command_read(offset, size)

    def _command_read(self, offset: int, size: int) -> int:
        """A read of at most 4 bytes in a command mode: status, identifier or query."""
        cmd = self.cmd
        if cmd == CMD_READ_ID:
            return self._id_read(offset, size)
        if cmd == CMD_CFI_QUERY:
            return self._query_read(offset, size)
        return self._replicate_status(size)

    def _replicate_status(self, size: int) -> int:
        dw = self.geometry.device_width
        value = self.status
        if dw and size > dw:
            for shift in range(dw * 8, size * 8 - dw * 8 + 1, dw * 8):
                value |= self.status << shift
        elif not dw and size > 2:
            value |= self.status << 16
        return value

    def _lanes(self, offset: int, size: int, lookup: Callable[[int], int]) -> int:
        """An identifier or query read of ``size`` <= 4 bytes. Legacy addressing (device
        width 0): the one table value, whatever the width. Otherwise each bank word (one
        chip per ``device_width`` bytes) carries the same chip answer in every lane, as
        QEMU's pflash_cfi_query and pflash_devid_query replicate it; the bank word at
        ``offset + i`` answers for entry ``(offset + i) >> shift``."""
        bw, dw = self.geometry.bank_width, self.geometry.device_width
        mask = (1 << (8 * size)) - 1
        if not dw:  # legacy: one value from the table, addressed within 256 bytes
            return lookup((offset & 0xFF) >> self._shift) & mask
        chip_mask = (1 << (8 * dw)) - 1
        value = 0
        for i in range(0, size, bw):
            item = lookup((offset + i) >> self._shift) & chip_mask
            for lane in range(0, bw, dw):  # each chip answers in its own lane
                value |= item << (8 * (i + lane))
        return value & mask

    def _query_read(self, offset: int, size: int) -> int:
        return self._lanes(offset, size, lambda i: self.table[i] if i < CFI_TABLE_SIZE else 0)

    def _id_read(self, offset: int, size: int) -> int:
        ids = self.geometry.ids
        block = offset // self.geometry.sector_size

        def lookup(index: int) -> int:
            index &= 0xFF
            if not self.geometry.device_width:  # QEMU's legacy pairs
                return (ids[0] << 8 | ids[1]) if index == 0 else (ids[2] << 8 | ids[3]) if index == 1 \
                    else int(block in self.locked) if index == 2 else 0
            return ids[0] if index == 0 else ids[1] if index == 1 else \
                int(block in self.locked) if index == 2 else 0

        return self._lanes(offset, size, lookup)

    # --- writes ------------------------------------------------------------------------
    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            return
        before = self.romd
        self._write(offset, size, value)
        if self.romd != before:
            self.romd_switches += 1
            self._on_romd(self.romd)

    def _write(self, offset: int, size: int, value: int) -> None:
        """One bus write, by where the command sequence is (``wcycle``)."""
        if self.wcycle == 0:
            self._first_cycle(value & 0xFF)
        elif self.wcycle == 1:
            self._second_cycle(offset, size, value)
        elif self.wcycle == 2:
            self._buffer_data(offset, size, value)
        else:
            self._buffer_confirm(value & 0xFF)

    def _first_cycle(self, command: int) -> None:
        self.romd = False
        if command in (CMD_READ_ARRAY, CMD_READ_ARRAY_QEMU, CMD_AMD_RESET):
            self._read_array()
        elif command in (CMD_PROGRAM, CMD_PROGRAM_ALT, CMD_BLOCK_ERASE, CMD_LOCK_SETUP,
                         CMD_CFI_QUERY):
            self.cmd, self.wcycle = command, 1
        elif command == CMD_CLEAR_STATUS:
            self.status = 0x00
            self._read_array()
        elif command in (CMD_READ_STATUS, CMD_READ_ID):
            self.cmd = command
        elif command == CMD_WRITE_BUFFER:
            self.status |= STATUS_READY
            self.cmd, self.wcycle = command, 1
        else:
            self._read_array()  # unknown command: back to reading the array

    def _second_cycle(self, offset: int, size: int, value: int) -> None:
        cmd, command = self.cmd, value & 0xFF
        if cmd in (CMD_PROGRAM, CMD_PROGRAM_ALT):
            self._program(offset, value.to_bytes(size, "little"))
            self.wcycle = 0
        elif cmd == CMD_BLOCK_ERASE:
            if command == CONFIRM:
                self._erase(offset)
                self.wcycle = 0
            else:
                self._read_array()
        elif cmd == CMD_LOCK_SETUP:
            if command in (LOCK_BLOCK, CONFIRM):
                if command == LOCK_BLOCK:
                    self.locked.add(offset // self.geometry.sector_size)
                else:
                    self.locked.clear()
                self.status |= STATUS_READY
                self.wcycle = 0
            else:
                self._read_array()
        elif cmd == CMD_CFI_QUERY:
            if command == CMD_READ_ARRAY:
                self._read_array()  # only 0xFF leaves query mode, as in QEMU
        elif cmd == CMD_WRITE_BUFFER:
            width = self.geometry.device_width or self.geometry.bank_width
            self.counter = value & ((1 << (8 * width)) - 1)
            self.buffer_base = -1
            self.wcycle = 2

    def _buffer_data(self, offset: int, size: int, value: int) -> None:
        """Write-to-buffer data: counter + 1 bus writes."""
        buffer_size = self.geometry.buffer_size()
        if self.buffer is None:
            self.buffer_base = offset & ~(buffer_size - 1)
            self.buffer = bytearray(self.array[self.buffer_base:self.buffer_base + buffer_size])
        start = offset - self.buffer_base
        if 0 <= start and start + size <= buffer_size:
            self.buffer[start:start + size] = value.to_bytes(size, "little")
        else:
            self.status |= STATUS_PROGRAM_ERROR
        self.status |= STATUS_READY
        if self.counter == 0:
            self.wcycle = 3
        else:
            self.counter -= 1

    def _buffer_confirm(self, command: int) -> None:
        buffer, base = self.buffer, self.buffer_base
        self.buffer, self.buffer_base = None, -1
        if command == CONFIRM and not self.status & STATUS_PROGRAM_ERROR and buffer is not None:
            self._program(base, bytes(buffer))
            self.wcycle = 0
        else:
            self._read_array()

    def _read_array(self) -> None:
        self.cmd, self.wcycle = 0x00, 0
        self.buffer, self.buffer_base = None, -1
        self.romd = True

    def _refuse(self, offset: int, length: int) -> int:
        """The error bits a program or erase of [offset, +length) must fail with, or 0."""
        if not self.writable:
            return STATUS_LOCKED
        if offset + length > self.image_size:
            return -1  # past the image: erased flash that cannot change
        sector = self.geometry.sector_size
        if any(b in self.locked for b in range(offset // sector, (offset + length - 1) // sector + 1)):
            return STATUS_LOCKED
        return 0

    def _program(self, offset: int, data: bytes) -> None:
        refused = self._refuse(offset, len(data))
        if refused:
            self.status |= STATUS_PROGRAM_ERROR | (refused if refused > 0 else 0)
        else:
            self.array[offset:offset + len(data)] = data
            self._on_write(offset, len(data))
        self.status |= STATUS_READY

    def _erase(self, offset: int) -> None:
        sector = self.geometry.sector_size
        start = offset & ~(sector - 1)
        refused = self._refuse(start, sector)
        if refused:
            self.status |= STATUS_ERASE_ERROR | (refused if refused > 0 else 0)
        else:
            self.array[start:start + sector] = b"\xff" * sector
            self._on_write(start, sector)
        self.status |= STATUS_READY

    def reset(self) -> None:
        """Machine reset: read-array mode, status ready, no open buffer."""
        before = self.romd
        self._read_array()
        self.status = STATUS_READY
        if self.romd != before:
            self.romd_switches += 1
            self._on_romd(True)
