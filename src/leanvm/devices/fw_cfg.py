"""QEMU's firmware configuration device (fw_cfg), with its DMA interface.

Port interface (x86): selector at 0x510 (16-bit write), data at 0x511 (8-bit reads walk the
selected item), DMA address at 0x514-0x51B (64-bit, big-endian; a write of the low 32 bits
at 0x518, or a 64-bit write at 0x514, starts a transfer). Reading the DMA register returns
"QEMU CFG". Register the device at port 0x510 with size 12.

The DMA register is big-endian: the guest stores the address's bytes most significant
first (cpu_to_be32 before outl). A DMA descriptor {be32 control; be32 length; be64 address} lives in guest memory; control
bits ERROR 0x01, READ 0x02, SKIP 0x04, SELECT 0x08 (item key in bits 16-31), WRITE 0x10.
On completion control becomes 0, or keeps ERROR. Every address and length the guest hands
over is checked against guest memory: a descriptor or buffer outside it gets ERROR and
touches nothing. Reads past an item's end give zeros; writes are refused unless the item
was added as writable.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from leanvm.errors import DeviceError, GuestError
from leanvm.memory.guest import GuestMemory

# ports, as offsets from 0x510
SELECTOR = 0  # 16-bit
DATA = 1  # 8-bit
DMA_ADDRESS = 4  # 8 bytes, big-endian: 4..11
DMA_SIGNATURE = b"QEMU CFG"
PORT_SIZE = 12  # selector, data, DMA address (where: machine/platform.py)

# item keys (QEMU docs/specs/fw_cfg.rst)
SIGNATURE = 0x00  # "QEMU"
ID = 0x01  # bit 0: traditional interface, bit 1: DMA
UUID = 0x02
RAM_SIZE = 0x03
NB_CPUS = 0x05
KERNEL_ADDR = 0x07
KERNEL_SIZE = 0x08
KERNEL_CMDLINE = 0x09
INITRD_ADDR = 0x0A
INITRD_SIZE = 0x0B
BOOT_DEVICE = 0x0C
MAX_CPUS = 0x0F
KERNEL_ENTRY = 0x10
KERNEL_DATA = 0x11
INITRD_DATA = 0x12
CMDLINE_ADDR = 0x13
CMDLINE_SIZE = 0x14
CMDLINE_DATA = 0x15
SETUP_ADDR = 0x16
SETUP_SIZE = 0x17
SETUP_DATA = 0x18
FILE_DIR = 0x19
FILE_FIRST = 0x20
ARCH_LOCAL = 0x8000
X86_ACPI_TABLES = 0x8000
X86_SMBIOS = 0x8001
X86_IRQ0_OVERRIDE = 0x8002
X86_E820 = 0x8003
KEY_MASK = 0xBFFF  # bit 14, the legacy write channel, is not part of the key
ID_TRADITIONAL, ID_DMA = 0x01, 0x02

CTL_ERROR = 0x01
CTL_READ = 0x02
CTL_SKIP = 0x04
CTL_SELECT = 0x08
CTL_WRITE = 0x10
DESCRIPTOR = struct.Struct(">IIQ")  # control, length, address
FILE_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name
MAX_FILE_NAME = 55
ZERO_CHUNK = 1 << 20  # a hostile length never makes the VMM allocate more than this


VMCOREINFO_FILE = "etc/vmcoreinfo"  # written by the guest kernel (QEMU docs/specs/vmcoreinfo.rst)
VMCOREINFO_FORMAT_ELF = 1  # the address names an ELF note "VMCOREINFO"

class Item(NamedTuple):
    data: "bytearray | memoryview"  # read-only items may be views of mapped files
    writable: bool
    name: str  # for traces: the file name, or the key's name


class Transfer(NamedTuple):
    """One completed access to an item, for the boot timeline."""

    key: int
    name: str
    bytes: int
    start_ns: int
    end_ns: int
    dma: bool


KEY_NAMES = {SIGNATURE: "signature", ID: "id", RAM_SIZE: "ram-size", NB_CPUS: "nb-cpus",
             KERNEL_ADDR: "kernel-addr", KERNEL_SIZE: "kernel-size",
             KERNEL_CMDLINE: "kernel-cmdline", INITRD_ADDR: "initrd-addr",
             INITRD_SIZE: "initrd-size", BOOT_DEVICE: "boot-device", MAX_CPUS: "max-cpus",
             KERNEL_ENTRY: "kernel-entry", KERNEL_DATA: "kernel", INITRD_DATA: "initrd",
             CMDLINE_ADDR: "cmdline-addr", CMDLINE_SIZE: "cmdline-size",
             CMDLINE_DATA: "cmdline", SETUP_ADDR: "setup-addr", SETUP_SIZE: "setup-size",
             SETUP_DATA: "setup", FILE_DIR: "file-dir", X86_E820: "e820"}


def _store(data: "bytes | memoryview", writable: bool) -> "bytearray | memoryview":
    if isinstance(data, memoryview) and not writable:
        return data.cast("B") if data.format != "B" else data
    return bytearray(data)


class FwCfg:
    def __init__(self, memory: GuestMemory,
                 on_transfer: Callable[[Transfer], None] | None = None) -> None:
        self.memory = memory
        self.items: dict[int, Item] = {}
        self.files: dict[str, int] = {}
        self.selected = 0
        self.offset = 0
        self.dma_address = 0
        self.dma_errors = 0
        self._read_started = 0
        self.on_transfer = on_transfer  # for the boot timeline; assignable
        self.add(SIGNATURE, b"QEMU")
        self.add(ID, struct.pack("<I", ID_TRADITIONAL | ID_DMA))
        self._rebuild_directory()

    # --- items ---------------------------------------------------------------------------
    def add(self, key: int, data: "bytes | memoryview", *, writable: bool = False) -> None:
        """Set an item. A memoryview is kept as it is (no copy) unless the item is writable."""
        if key == FILE_DIR or not 0 <= key <= KEY_MASK:
            raise DeviceError(f"fw_cfg key {key:#x} cannot be set directly")
        self.items[key] = Item(_store(data, writable), writable, KEY_NAMES.get(key, f"{key:#06x}"))

    def add_u32(self, key: int, value: int) -> None:
        self.add(key, struct.pack("<I", value))

    def add_u64(self, key: int, value: int) -> None:
        self.add(key, struct.pack("<Q", value))

    def add_file(self, name: str, data: "bytes | memoryview", *, writable: bool = False) -> int:
        """Add (or replace) a named file; returns its key."""
        if not name or len(name.encode()) > MAX_FILE_NAME:
            raise DeviceError(f"fw_cfg file name {name!r} must be 1 to {MAX_FILE_NAME} bytes")
        key = self.files.get(name, FILE_FIRST + len(self.files))
        self.files[name] = key
        self.items[key] = Item(_store(data, writable), writable, name)
        self._rebuild_directory()
        return key

    def file(self, name: str) -> bytes:
        return bytes(self.items[self.files[name]].data)

    def _rebuild_directory(self) -> None:
        entries = sorted(self.files.items())  # the directory is sorted by name, as QEMU's
        body = struct.pack(">I", len(entries)) + b"".join(
            FILE_ENTRY.pack(len(self.items[key].data), key, 0, name.encode())
            for name, key in entries)
        self.items[FILE_DIR] = Item(bytearray(body), False, "file-dir")

    # --- port I/O ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == DATA:
            return self._read_data(size)
        if DMA_ADDRESS <= offset < DMA_ADDRESS + 8:  # the bytes "QEMU CFG", in order
            start = offset - DMA_ADDRESS
            return int.from_bytes(DMA_SIGNATURE[start:start + size].ljust(size, b"\0"), "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= DMA_ADDRESS:  # a big-endian register: the guest writes its bytes in order
            value = int.from_bytes(value.to_bytes(size, "little"), "big")
        if offset == SELECTOR and size >= 2:
            self.select(value & KEY_MASK)
        elif offset == DATA:
            pass  # writes through the data port are ignored (QEMU 2.4 and later)
        elif offset == DMA_ADDRESS and size == 8:
            self.dma_address = value
            self._dma(value)
        elif offset == DMA_ADDRESS and size == 4:
            self.dma_address = (value << 32) | (self.dma_address & 0xFFFFFFFF)
        elif offset == DMA_ADDRESS + 4 and size == 4:
            address = (self.dma_address & ~0xFFFFFFFF) | value
            self.dma_address = 0
            self._dma(address)

    def select(self, key: int) -> None:
        self.selected, self.offset = key & KEY_MASK, 0
        self._read_started = 0

    def _read_data(self, size: int) -> int:
        item = self.items.get(self.selected)
        value = 0
        for index in range(size):  # wider reads are several byte reads, as on QEMU's x86 port
            byte = item.data[self.offset] if item is not None and self.offset < len(item.data) else 0
            value |= byte << (8 * index)
            if item is not None and self.offset < len(item.data):
                if self.offset == 0:
                    self._read_started = time.monotonic_ns()
                self.offset += 1
                if self.offset == len(item.data):
                    self._report(self.selected, item, len(item.data), self._read_started,
                                 dma=False)
        return value

    # --- DMA -----------------------------------------------------------------------------
    def _dma(self, address: int) -> None:
        start = time.monotonic_ns()
        try:
            control, length, target = DESCRIPTOR.unpack(self.memory.read(address, DESCRIPTOR.size))
        except GuestError:
            self.dma_errors += 1  # no descriptor to report the error in
            return
        error = False
        if control & CTL_SELECT:
            self.select(control >> 16)
        item = self.items.get(self.selected)
        try:
            if control & CTL_READ:
                self._dma_read(item, target, length)
            elif control & CTL_WRITE:
                error = not self._dma_write(item, target, length)
            elif control & CTL_SKIP:
                self.offset += length
        except GuestError:
            error = True
        if error:
            self.dma_errors += 1
        elif item is not None and control & (CTL_READ | CTL_WRITE):
            self._report(self.selected, item, length, start, dma=True)
        try:
            self.memory.write(address, struct.pack(">I", CTL_ERROR if error else 0))
        except GuestError:
            self.dma_errors += 1

    def _dma_read(self, item: Item | None, target: int, length: int) -> None:
        self.memory.find(target, length)  # the whole buffer must be guest memory first
        data = memoryview(item.data)[self.offset:self.offset + length] if item is not None else b""
        self.memory.write(target, data)
        done = len(data)
        while done < length:  # past the item's end: zeros, in bounded chunks
            chunk = min(length - done, ZERO_CHUNK)
            self.memory.write(target + done, bytes(chunk))
            done += chunk
        self.offset += length

    def _dma_write(self, item: Item | None, target: int, length: int) -> bool:
        if item is None or not item.writable or self.offset + length > len(item.data):
            return False
        item.data[self.offset:self.offset + length] = self.memory.read(target, length)
        self.offset += length
        return True

    def _report(self, key: int, item: Item, count: int, start: int, dma: bool) -> None:
        if self.on_transfer is not None:
            now = time.monotonic_ns()
            self.on_transfer(Transfer(key, item.name, count, start or now, now, dma))
