"""Linux bzImage files: read and check the setup header (x86 boot protocol 2.00 and later).

Offsets are those of Linux's Documentation/arch/x86/boot.rst: the header starts at 0x1f1 in
the file (and in struct boot_params); "HdrS" at 0x202 marks protocol 2.00+, whose version is
at 0x206. The setup code is (setup_sects + 1) sectors of 512 bytes (setup_sects 0 means 4);
the protected-mode kernel follows it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from leanvm.errors import ImageError

MAGIC_OFFSET, MAGIC = 0x202, b"HdrS"
BOOT_FLAG = 0xAA55
LOADED_HIGH = 0x01  # loadflags: protected-mode code loads at 1 MiB
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01  # xloadflags: has the 64-bit entry at code32_start + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
LOADER_TYPE_UNDECLARED = 0xFF
SECTOR = 512
MIN_PROTOCOL = 0x200
HEADER_END = 0x280  # enough for every field up to protocol 2.15


class SetupHeader(NamedTuple):
    protocol: int  # e.g. 0x20f for 2.15
    setup_sects: int  # as stored (0 means 4)
    loadflags: int
    code32_start: int
    initrd_addr_max: int  # protocol >= 2.03, else the documented default 0x37ffffff
    cmdline_size: int  # protocol >= 2.06, else 255
    xloadflags: int  # protocol >= 2.12
    kernel_alignment: int
    relocatable: bool
    pref_address: int  # protocol >= 2.10
    init_size: int  # protocol >= 2.10: memory the kernel needs from its load address
    payload_offset: int  # protocol >= 2.08: the compressed kernel, from the kernel's start
    payload_length: int
    version: str  # the kernel's version string, "" if it has none
    syssize: int = 0  # protocol >= 2.04: the protected-mode code's size in 16-byte units

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code at the start of the file (header included)."""
        return ((self.setup_sects or 4) + 1) * SECTOR

    @property
    def loads_high(self) -> bool:
        return bool(self.loadflags & LOADED_HIGH)


def is_bzimage(data: bytes) -> bool:
    return data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC


def parse_setup_header(data: bytes, path: str, file_size: int | None = None) -> SetupHeader:
    """The setup header of a bzImage file's contents; ImageError names what is wrong.

    ``data`` may be just the file's first bytes (HEADER_END or more), with ``file_size``
    the whole file's size."""
    if file_size is None:
        file_size = len(data)
    if len(data) < HEADER_END:
        raise ImageError(f"{path}: {file_size} bytes is too short for a Linux kernel "
                         f"(a bzImage has a setup header up to offset {HEADER_END:#x})")
    if not is_bzimage(data):
        raise ImageError(f"{path}: not a Linux bzImage (no 'HdrS' signature at {MAGIC_OFFSET:#x})")
    protocol = struct.unpack_from("<H", data, 0x206)[0]
    if protocol < MIN_PROTOCOL:
        raise ImageError(f"{path}: boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is too old "
                         "(expected 2.00 or later)")
    if struct.unpack_from("<H", data, 0x1FE)[0] != BOOT_FLAG:
        raise ImageError(f"{path}: boot flag at 0x1fe is not 0xaa55: not a Linux bzImage")

    def u8(offset: int) -> int:
        return data[offset]

    def u32(offset: int) -> int:
        return struct.unpack_from("<I", data, offset)[0]

    def u64(offset: int) -> int:
        return struct.unpack_from("<Q", data, offset)[0]

    header = SetupHeader(
        protocol=protocol,
        setup_sects=u8(0x1F1),
        loadflags=u8(0x211),
        code32_start=u32(0x214),
        initrd_addr_max=u32(0x22C) if protocol >= 0x203 else 0x37FFFFFF,
        cmdline_size=u32(0x238) if protocol >= 0x206 else 255,
        xloadflags=struct.unpack_from("<H", data, 0x236)[0] if protocol >= 0x20C else 0,
        kernel_alignment=u32(0x230) if protocol >= 0x205 else 0,
        relocatable=bool(u8(0x234)) if protocol >= 0x205 else False,
        pref_address=u64(0x258) if protocol >= 0x20A else 0x100000,
        init_size=u32(0x260) if protocol >= 0x20A else 0,
        payload_offset=u32(0x248) if protocol >= 0x208 else 0,
        payload_length=u32(0x24C) if protocol >= 0x208 else 0,
        version=_version_string(data, struct.unpack_from("<H", data, 0x20E)[0]),
        syssize=u32(0x1F4) if protocol >= 0x204 else 0,
    )
    if file_size <= header.setup_size:
        raise ImageError(f"{path}: truncated: {file_size} bytes, but the setup code alone is "
                         f"{header.setup_size} bytes")
    if file_size < header.setup_size + header.syssize * 16 - 15:
        raise ImageError(f"{path}: truncated: {file_size} bytes, but the setup header says "
                         f"{header.setup_size + header.syssize * 16} (setup and syssize)")
    return header


def _version_string(data: bytes, pointer: int) -> str:
    if not pointer:
        return ""
    start = pointer + 0x200
    end = data.find(b"\0", start, start + 256)
    if start >= len(data) or end < 0:
        return ""
    return data[start:end].decode("ascii", errors="replace")
