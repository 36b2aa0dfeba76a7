"""What a flash image holds and what it will cost: data extents (holes found with
SEEK_DATA/SEEK_HOLE), runs of zero and 0xFF pages, UEFI firmware volume headers.

Host memory per VM, for an image mapped the way leanvm maps it: pages that hold data are
read from the page cache, shared by every VM on the host; a VM pays privately only for the
pages it writes (copy-on-write). Holes and zero pages cost nothing until read, and bytes
past the image are erased flash (0xFF) backed by one shared page.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ImageError

PAGE = 4096
FVH_SIGNATURE = b"_FVH"  # EFI_FIRMWARE_VOLUME_HEADER.Signature, at offset 40 of the header
FVH_SIGNATURE_OFFSET = 40
# EFI_FIRMWARE_VOLUME_HEADER: ZeroVector[16], FileSystemGuid[16], u64 FvLength, u32 Signature,
# u32 Attributes, u16 HeaderLength, u16 Checksum, u16 ExtHeaderOffset, u8 Reserved, u8 Revision
FVH = struct.Struct("<16s16sQ4sIHHHBB")
EFI_FIRMWARE_FILE_SYSTEM2_GUID = "8c8ce578-8a3d-4f1c-9935-896185c32dd3"
EFI_FIRMWARE_FILE_SYSTEM3_GUID = "5473c07a-3dcb-4dca-bd6f-1e9689e7349a"
EFI_SYSTEM_NV_DATA_FV_GUID = "fff12b8d-7696-4c8b-a985-2747075b4f50"  # variable store volume


class Run(NamedTuple):
    """``length`` bytes from ``offset`` (page granular)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class FirmwareVolume(NamedTuple):
    offset: int
    length: int
    guid: str
    kind: str  # "ffs2", "ffs3", "nvram" or "unknown"


class ImageInfo(NamedTuple):
    path: str
    size: int
    data_extents: tuple[Run, ...]  # allocated ranges in the file (the rest are holes)
    zero_runs: tuple[Run, ...]  # whole pages of zeros inside data extents or holes
    ff_runs: tuple[Run, ...]  # whole pages of 0xFF
    volumes: tuple[FirmwareVolume, ...]

    @property
    def allocated(self) -> int:
        return sum(r.length for r in self.data_extents)

    @property
    def content(self) -> int:
        """Bytes in pages that are neither all zero nor all 0xFF: what firmware really holds."""
        return self.size - sum(r.length for r in self.zero_runs) - sum(r.length for r in self.ff_runs)

    @property
    def trailing_zero(self) -> int:
        """Zero padding at the end (what `flash unpad` turns into a hole)."""
        if self.zero_runs and self.zero_runs[-1].end >= self.size:
            return self.size - self.zero_runs[-1].offset
        return 0


def data_extents(fd: int, size: int) -> list[Run]:
    """Allocated ranges of an open file, from SEEK_DATA/SEEK_HOLE (the whole file if the
    filesystem cannot tell)."""
    extents: list[Run] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == 6:  # ENXIO: no data after offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append(Run(start, min(end, size) - start))
            offset = end
    except OSError:
        return [Run(0, size)]
    return extents


def open_image(path: Path) -> int:
    """An fd for reading a flash image, or an ImageError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file (expected a flash image)") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path}: not a regular file (expected a flash image)")
    return fd


def analyze(path: str | Path) -> ImageInfo:
    """Read ``path`` once (only its data extents) and describe it."""
    path = Path(path)
    fd = open_image(path)
    try:
        size = os.fstat(fd).st_size
        extents = data_extents(fd, size)
        zero: list[Run] = []
        ff: list[Run] = []
        volumes: list[FirmwareVolume] = []
        cursor = 0
        for extent in extents:
            if extent.offset > cursor:
                _append(zero, Run(cursor, extent.offset - cursor))  # a hole reads as zeros
            os.lseek(fd, extent.offset, os.SEEK_SET)
            position = extent.offset
            while position < extent.end:
                chunk = os.read(fd, min(1 << 20, extent.end - position))
                if not chunk:
                    break
                _scan(chunk, position, zero, ff, volumes)
                position += len(chunk)
            cursor = extent.end
        if cursor < size:
            _append(zero, Run(cursor, size - cursor))
    finally:
        os.close(fd)
    return ImageInfo(str(path), size, tuple(extents), tuple(zero), tuple(ff), tuple(volumes))


_ZERO_PAGE = bytes(PAGE)
_FF_PAGE = b"\xff" * PAGE


def _scan(chunk: bytes, base: int, zero: list[Run], ff: list[Run],
          volumes: list[FirmwareVolume]) -> None:
    for start in range(0, len(chunk), PAGE):
        page = chunk[start:start + PAGE]
        if len(page) < PAGE:
            break
        if page == _ZERO_PAGE:
            _append(zero, Run(base + start, PAGE))
        elif page == _FF_PAGE:
            _append(ff, Run(base + start, PAGE))
    found = chunk.find(FVH_SIGNATURE)
    while found >= 0:
        header_at = found - FVH_SIGNATURE_OFFSET
        if header_at >= 0 and header_at + FVH.size <= len(chunk):
            fields = FVH.unpack_from(chunk, header_at)
            length, header_length, revision = fields[2], fields[5], fields[9]
            # the zero vector may hold a reset vector (ARM builds), so it is not checked
            if length > header_length >= FVH.size and header_length < PAGE and revision == 2:
                guid = _guid(fields[1])
                kind = {EFI_FIRMWARE_FILE_SYSTEM2_GUID: "ffs2", EFI_FIRMWARE_FILE_SYSTEM3_GUID: "ffs3",
                        EFI_SYSTEM_NV_DATA_FV_GUID: "nvram"}.get(guid, "unknown")
                volumes.append(FirmwareVolume(base + header_at, length, guid, kind))
        found = chunk.find(FVH_SIGNATURE, found + 1)


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    d = raw[8:]
    return f"{a:08x}-{b:04x}-{c:04x}-{d[:2].hex()}-{d[2:].hex()}"


def _append(runs: list[Run], run: Run) -> None:
    if runs and runs[-1].end == run.offset:
        runs[-1] = Run(runs[-1].offset, runs[-1].length + run.length)
    else:
        runs.append(run)
