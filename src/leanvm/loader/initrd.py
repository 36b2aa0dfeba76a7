"""Host-side decompression of an initramfs: what the guest kernel would unpack, unpacked here.

An initramfs is a series of members, each an uncompressed "newc" cpio archive (magic
"070701" or "070702") or a compressed stream holding cpio archives, with zero padding
between them; Linux's unpack_to_rootfs walks them in order. Decompressing in the guest costs
a minute or more on a host that emulates kernel code (67 s for a gzip initrd here:
docs/facts.md#timings), so leanvm writes the same members uncompressed, once per initrd
content, into its cache; the guest then only copies files out of the archives. The result
maps zero-copy like any file.

Every member is checked as the kernel would read it, and more: each compressed stream
against its container's sizes and checksums (loader/compression.py), each archive walked
entry by entry to its trailer (loader/newc.py). A member that fails is one ImageError line
naming the file; nothing is written to the cache before every member has passed. Only
initramfs images are rewritten: for anything else (an old-style ramdisk image, an unknown
compression, a damaged member) the caller boots the file as given, with that line as a note.
`entries` lists what the kernel would create, in order (`leanvm initrd list`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader import newc
from leanvm.loader.decompress import cache_dir, kernel_digest

CACHE_VERSION = 2  # 2: members are checked (sizes, checksums, whole cpio archives) first


class Unpacked(NamedTuple):
    path: Path  # the uncompressed initramfs (in the cache)
    cached: bool  # found in the cache: nothing was decompressed now
    formats: tuple[str, ...]  # the compressed members' formats, in order
    size: int  # bytes of the uncompressed initramfs


class Member(NamedTuple):
    kind: str  # "cpio" (stored as is) or the compression format
    offset: int  # where it starts in the initramfs file
    data: "bytes | memoryview"  # its cpio archives, uncompressed


def members(data: "bytes | memoryview", path: str) -> list[Member]:
    """The initramfs's members in the order the kernel unpacks them: uncompressed cpio
    archives as they are, compressed streams decompressed (every check their container
    carries) and holding nothing but whole cpio archives. ImageError, one line naming
    ``path``, for anything else."""
    from leanvm.loader.compression import decompress_stream, sniff

    view = memoryview(data)
    found: list[Member] = []
    at = newc.skip_padding(view, 0)
    while at < len(view):
        head = bytes(view[at:at + 6])
        if head in newc.MAGICS or head == newc.ODC_MAGIC:  # read_archive names the old one
            newc.check_start(at, path)
            _, end = newc.read_archive(view, at, path)
            found.append(Member("cpio", at, view[at:end]))
            at = newc.skip_padding(view, end)
            continue
        kind = sniff(head)
        if kind is None:
            raise ImageError(f"{path}: byte {at:#x} starts neither a cpio archive nor a "
                             f"compressed stream (magic {head.hex()})")
        what = f"member at byte {at:#x}"
        out, used = decompress_stream(kind, view[at:], path, what)
        if out[:6] not in newc.MAGICS:
            raise ImageError(f"{path}: the {kind} {what} does not hold a cpio archive")
        newc.read_archives(out, f"{path}: the {kind} {what}, decompressed")
        found.append(Member(kind, at, out))
        at = newc.skip_padding(view, at + used)
    return found


def entries(data: "bytes | memoryview", path: str) -> list[tuple[Member, newc.Record]]:
    """Every entry of the initramfs, in unpacking order, with the member holding it (the
    record's start and end index that member's data)."""
    listed: list[tuple[Member, newc.Record]] = []
    found = members(data, path)
    if not found:
        raise ImageError(f"{path}: no cpio archive in it (an initramfs holds archives "
                         "ending in TRAILER!!!, uncompressed or compressed)")
    for member in found:
        for record in newc.read_archives(member.data, path):
            listed.append((member, record))
    return listed


def unpacked_initrd(data: "bytes | memoryview", path: str) -> Unpacked | None:
    """The initramfs with every member uncompressed, from the cache or made now; None when
    it has nothing compressed (boot it as it is). ImageError when it is not an initramfs
    leanvm can rewrite (the caller then boots it as given)."""
    view = memoryview(data)
    if not len(view):
        return None
    digest = kernel_digest(view)
    target = cache_dir() / f"initramfs-{digest[:32]}-v{CACHE_VERSION}.cpio"
    formats_file = target.with_suffix(".formats")
    hit = _cached(target, formats_file)
    if hit is not None:
        return hit
    parts = members(view, path)
    formats = tuple(part.kind for part in parts if part.kind != "cpio")
    if not formats:
        return None
    size = sum(len(part.data) + (-len(part.data) % 4) for part in parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace(formats_file, f"{' '.join(formats)}\n{size}\n".encode())
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            for part in parts:
                out.write(part.data)
                out.write(bytes(-out.tell() % 4))  # members start 4-byte aligned
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise ImageError(f"cannot write the unpacked initramfs to {target.parent} "
                         f"({exc.strerror}); set LEANVM_CACHE to a writable directory") from None
    return Unpacked(target, False, formats, target.stat().st_size)


def _cached(target: Path, formats_file: Path) -> Unpacked | None:
    """The cache entry, if both its files are there and agree on the size."""
    try:
        formats, size = formats_file.read_text().split("\n")[:2]
        if target.stat().st_size == int(size):
            return Unpacked(target, True, tuple(formats.split()), int(size))
    except (OSError, ValueError):
        pass  # absent, half written or from elsewhere: make it again
    return None


def _replace(target: Path, data: bytes) -> None:
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
