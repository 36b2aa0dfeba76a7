"""Crash-safe block writes for persistent flash stores (UEFI variable stores).

A group of modified blocks is written in three steps:
  1. IMAGE.journal gets every block (offset, length, CRC-32, data) and a trailer with the
     CRC of it all; fsync.
  2. Each block is written in place in IMAGE; fsync.
  3. The journal is removed; the directory fsync'd.
Opening a store first replays a complete journal (the group was decided: redo it) and
drops a torn one (the group never happened). So whenever the writer dies (kill -9, power
loss after fsync), IMAGE holds each block as it was before the group or as it is after it,
never a mixture inside a block.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

from leanvm.errors import ImageError

MAGIC = b"LVMJRNL1"
HEADER = struct.Struct("<8sI")  # magic, entry count
ENTRY = struct.Struct("<QII")  # offset, length, crc32(data)
TRAILER = struct.Struct("<I")  # crc32 of everything before it


def journal_path(image: Path) -> Path:
    return image.with_name(image.name + ".journal")


def commit(image: Path, blocks: Mapping[int, bytes], fd: int | None = None) -> None:
    """Write ``blocks`` ({offset: data}) to ``image`` atomically as a group."""
    if not blocks:
        return
    body = bytearray(HEADER.pack(MAGIC, len(blocks)))
    for offset, data in sorted(blocks.items()):
        body += ENTRY.pack(offset, len(data), zlib.crc32(data))
        body += data
    body += TRAILER.pack(zlib.crc32(body))
    journal = journal_path(image)
    temp = journal.with_name(journal.name + ".tmp")
    jfd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(jfd, bytes(body), 0)
        os.fsync(jfd)
    finally:
        os.close(jfd)
    os.replace(temp, journal)  # the journal appears whole or not at all
    fsync_dir(image.parent)
    own = fd is None
    ifd = os.open(image, os.O_WRONLY) if own else fd
    try:
        for offset, data in blocks.items():
            _write_all(ifd, data, offset)
        os.fsync(ifd)
    finally:
        if own:
            os.close(ifd)
    journal.unlink()
    fsync_dir(image.parent)


def recover(image: Path) -> int:
    """Finish or drop an interrupted group. Returns the number of blocks replayed."""
    journal = journal_path(image)
    journal.with_name(journal.name + ".tmp").unlink(missing_ok=True)
    if not journal.exists():
        return 0
    data = journal.read_bytes()
    blocks = parse(data)
    if blocks is None:  # torn or corrupt: the group never reached the image
        journal.unlink()
        return 0
    try:
        fd = os.open(image, os.O_WRONLY)
    except OSError as exc:
        raise ImageError(f"{image}: cannot replay its journal ({exc.strerror})") from None
    try:
        for offset, block in blocks.items():
            _write_all(fd, block, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    journal.unlink()
    fsync_dir(image.parent)
    return len(blocks)


def parse(data: bytes) -> dict[int, bytes] | None:
    """The blocks of a complete, intact journal; None for anything else."""
    if len(data) < HEADER.size + TRAILER.size:
        return None
    (crc,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if zlib.crc32(data[:-TRAILER.size]) != crc:
        return None
    magic, count = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        return None
    blocks: dict[int, bytes] = {}
    position = HEADER.size
    for _ in range(count):
        if position + ENTRY.size > len(data) - TRAILER.size:
            return None
        offset, length, block_crc = ENTRY.unpack_from(data, position)
        position += ENTRY.size
        block = data[position:position + length]
        if len(block) != length or zlib.crc32(block) != block_crc:
            return None
        blocks[offset] = block
        position += length
    return blocks


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
