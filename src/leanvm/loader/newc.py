"""Reading cpio "newc" archives the way Linux's initramfs unpacker does, every length checked.

Format (Documentation/driver-api/early-userspace/buffer-format.rst, cpio(5)): a 110-byte
header, magic "070701" (or "070702": the check field then holds the sum of a regular
file's data bytes, which the kernel verifies), then 13 fields of 8 hex digits (ino, mode,
uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize
counting the NUL, check); the name padded to 4 bytes, the data padded to 4 bytes. The entry
named "TRAILER!!!" ends an archive; archives may follow one another, zero bytes between
them, each starting on a 4-byte boundary. No dataclasses here: this is on the boot path.
"""

from __future__ import annotations

import binascii
import struct
from typing import NamedTuple

from leanvm.errors import ImageError

NEWC_MAGIC, CRC_MAGIC = b"070701", b"070702"
MAGICS = (NEWC_MAGIC, CRC_MAGIC)
ODC_MAGIC = b"070707"  # the old portable format the kernel refuses
HEADER_SIZE = 110  # magic + 13 fields of 8 hex digits
TRAILER = b"TRAILER!!!"
ALIGN = 4
S_IFMT, S_IFREG = 0o170000, 0o100000
FIELDS = struct.Struct(">13I")


class Record(NamedTuple):
    """One archive entry; ``start``/``end`` bound its data in the buffer it was read from."""
    offset: int  # of its header
    name: bytes  # without the NUL
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    start: int
    end: int


def _align(offset: int) -> int:
    return offset + (-offset % ALIGN)


def read_archive(data: "bytes | memoryview", at: int, where: str,
                 into: list[Record] | None = None) -> tuple[list[Record], int]:
    """(the entries of the archive whose header is at ``at``, the offset just past its
    trailer's padding, at most the data's end). ImageError names ``where`` and the offset."""
    records = [] if into is None else into
    size = len(data)
    while True:
        if at >= size:
            raise missing_trailer(where)
        magic = bytes(data[at:at + 6])
        if magic not in MAGICS:
            hint = " (the old portable format: the kernel needs newc, cpio -H newc)" \
                if magic == ODC_MAGIC else ""
            raise ImageError(f"{where}: not a newc cpio archive at offset {at:#x} (magic "
                             f"{magic!r}; expected '070701' or '070702'){hint}")
        if at + HEADER_SIZE > size:
            raise ImageError(f"{where}: truncated cpio header at offset {at:#x}")
        try:
            (ino, mode, uid, gid, nlink, mtime, filesize, _, _, rmajor, rminor, namesize,
             check) = FIELDS.unpack(binascii.unhexlify(bytes(data[at + 6:at + HEADER_SIZE])))
        except ValueError:  # binascii's error for a character that is not a hex digit
            raise ImageError(f"{where}: bad hex field in the cpio header at offset "
                             f"{at:#x}") from None
        name_end = at + HEADER_SIZE + namesize
        start = _align(name_end)
        end = start + filesize
        if namesize < 1:
            raise ImageError(f"{where}: cpio entry at offset {at:#x} has a name size of 0 "
                             "(expected at least 1: the name's NUL)")
        if end > size:
            raise ImageError(f"{where}: cpio entry at offset {at:#x} ({namesize} name bytes, "
                             f"{filesize} data bytes) runs past the end of the data at "
                             f"{size:#x}")
        name = bytes(data[at + HEADER_SIZE:name_end - 1])
        if (magic == CRC_MAGIC and mode & S_IFMT == S_IFREG and filesize
                and sum(bytes(data[start:end])) & 0xFFFFFFFF != check):
            raise ImageError(f"{where}: cpio entry {name!r} at offset {at:#x} fails its data "
                             f"checksum (070702 format: the sum of its bytes)")
        following = min(_align(end), size)
        if name == TRAILER:
            return records, following
        records.append(Record(at, name, ino, mode, uid, gid, nlink, mtime, (rmajor, rminor),
                              start, end))
        at = following


def read_archives(data: "bytes | memoryview", where: str) -> list[Record]:
    """The entries of every archive in ``data`` (zero padding between them), which must end
    with a trailer: as the kernel reads a decompressed initramfs member."""
    records: list[Record] = []
    at = skip_padding(data, 0)
    if at >= len(data):
        raise ImageError(f"{where}: no cpio archive (expected one ending in "
                         f"{TRAILER.decode()})")
    while at < len(data):
        check_start(at, where)
        _, at = read_archive(data, at, where, records)
        at = skip_padding(data, at)
    return records


def skip_padding(data: "bytes | memoryview", at: int) -> int:
    """The offset of the first non-zero byte at or after ``at`` (the data's end if none)."""
    size = len(data)
    while at < size and data[at] == 0:
        chunk = bytes(data[at:at + 4096])
        at += len(chunk) - len(chunk.lstrip(b"\0"))
    return at


def check_start(at: int, where: str) -> None:
    if at % ALIGN:
        raise ImageError(f"{where}: a cpio archive starts at offset {at:#x}, not on a "
                         f"{ALIGN}-byte boundary (the kernel would refuse it)")


def missing_trailer(where: str) -> ImageError:
    return ImageError(f"{where}: no {TRAILER.decode()} at the end: the archive is truncated")
