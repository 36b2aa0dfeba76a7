"""`flash unpad`: a sparse copy of an image, with holes where it is zero.

The copy is written next to its destination, fsync'd and renamed over it, so an
interrupted unpad never leaves a half-written OUT behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from leanvm.errors import ImageError
from leanvm.firmware.image import PAGE, open_image
from leanvm.firmware.journal import fsync_dir

_ZERO = bytes(PAGE)


def unpad(source: str | Path, destination: str | Path) -> tuple[int, int]:
    """Copy ``source`` to ``destination`` leaving zero pages as holes.
    Returns (size, bytes allocated in the copy)."""
    source, destination = Path(source), Path(destination)
    if source.resolve() == destination.resolve():
        raise ImageError(f"{destination}: unpad writes a new file; give a different OUT")
    if destination.is_dir():
        raise ImageError(f"{destination}: is a directory (expected the name of the copy)")
    data_fd = open_image(source)
    temp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        out_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        os.close(data_fd)
        raise ImageError(f"{destination}: cannot write ({exc.strerror})") from None
    try:
        size = os.fstat(data_fd).st_size
        offset = 0
        while offset < size:
            block = os.pread(data_fd, 1 << 20, offset)
            if not block:
                break
            for start in range(0, len(block), PAGE):
                page = block[start:start + PAGE]
                if page != _ZERO[:len(page)]:
                    os.pwrite(out_fd, page, offset + start)
            offset += len(block)
        os.ftruncate(out_fd, size)  # the tail stays a hole
        os.fsync(out_fd)
        allocated = os.fstat(out_fd).st_blocks * 512
    except BaseException:
        os.close(out_fd)
        temp.unlink(missing_ok=True)
        raise
    finally:
        os.close(data_fd)
    os.close(out_fd)
    try:
        os.replace(temp, destination)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ImageError(f"{destination}: cannot write ({exc.strerror})") from None
    fsync_dir(destination.parent)
    return size, allocated
