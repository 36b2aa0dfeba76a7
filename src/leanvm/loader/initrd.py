"""Host-side decompression of an initramfs: what the guest kernel would unpack, unpacked here.

An initramfs is a series of members, each an uncompressed "newc" cpio archive (magic
"070701" or "070702") or a compressed stream holding cpio archives, with zero padding
between them; Linux's unpack_to_rootfs walks them in order. Decompressing in the guest costs
a minute or more on a host that emulates kernel code (SPECS.md: 67 s for a gzip initrd), so
leanvm writes the same members uncompressed, once per initrd content, into its cache; the
guest then only copies files out of the archives. The result maps zero-copy like any file.

Only initramfs images are rewritten: anything whose members do not decompress to cpio
archives (an old-style ramdisk image, an unknown compression) is booted as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader.decompress import cache_dir, kernel_digest

CPIO_MAGICS = (b"070701", b"070702")
NEWC_HEADER = 110
TRAILER = b"TRAILER!!!"
CACHE_VERSION = 1


class Unpacked(NamedTuple):
    path: Path  # the uncompressed initramfs (in the cache)
    cached: bool  # found in the cache: nothing was decompressed now
    formats: tuple[str, ...]  # the compressed members' formats, in order
    size: int  # bytes of the uncompressed initramfs


def _cpio_end(data: memoryview, at: int, path: str) -> int:
    """Offset just past the newc archive that starts at ``at`` (after its trailer)."""
    while True:
        if at + NEWC_HEADER > len(data) or bytes(data[at:at + 6]) not in CPIO_MAGICS:
            raise ImageError(f"{path}: cpio archive broken at byte {at:#x}")
        try:
            filesize = int(bytes(data[at + 54:at + 62]), 16)
            namesize = int(bytes(data[at + 94:at + 102]), 16)
        except ValueError:
            raise ImageError(f"{path}: cpio header at byte {at:#x} is not hex") from None
        name_end = at + NEWC_HEADER + namesize
        data_at = -(-name_end // 4) * 4
        name = bytes(data[at + NEWC_HEADER:name_end]).rstrip(b"\0")
        at = -(-(data_at + filesize) // 4) * 4
        if at > len(data) + 3:
            raise ImageError(f"{path}: cpio archive runs past the end of its member")
        if name == TRAILER:
            return min(at, len(data))


def members(data: "bytes | memoryview", path: str) -> list[tuple[str, bytes | memoryview]]:
    """The initramfs's members as (format, bytes): "cpio" members as they are, compressed
    ones decompressed. ImageError if a member is neither."""
    from leanvm.loader.compression import MAGICS, decompress_stream

    view = memoryview(data)
    found: list[tuple[str, bytes | memoryview]] = []
    at = 0
    while at < len(view):
        if view[at] == 0:  # padding between members, as the kernel allows
            at += 1
            continue
        head = bytes(view[at:at + 6])
        if head in CPIO_MAGICS:
            end = _cpio_end(view, at, path)
            found.append(("cpio", view[at:end]))
            at = end
            continue
        kind = next((name for magic, name in MAGICS if head.startswith(magic)), None)
        if kind is None:
            raise ImageError(f"{path}: byte {at:#x} starts neither a cpio archive nor a "
                             f"compressed stream (magic {head.hex()})")
        out, used = decompress_stream(kind, view[at:], path)
        if not out[:6] in CPIO_MAGICS:
            raise ImageError(f"{path}: the {kind} member at byte {at:#x} does not hold a cpio "
                             "archive")
        found.append((kind, out))
        at += used
    return found


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
    if target.is_file() and formats_file.is_file():
        formats = tuple(formats_file.read_text().split())
        return Unpacked(target, True, formats, target.stat().st_size)
    parts = members(view, path)
    formats = tuple(kind for kind, _ in parts if kind != "cpio")
    if not formats:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            for _, body in parts:
                out.write(body)
                out.write(bytes(-out.tell() % 4))  # members start 4-byte aligned
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        formats_file.write_text(" ".join(formats))
    except OSError as exc:
        raise ImageError(f"cannot write the unpacked initramfs to {target.parent} "
                         f"({exc.strerror}); set LEANVM_CACHE to a writable directory") from None
    return Unpacked(target, False, formats, target.stat().st_size)
