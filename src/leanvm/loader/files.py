"""Kernel and initrd files, mapped read-only: their pages stay in the host's page cache (one
copy shared by every VM that boots them) until something copies them into guest RAM."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from leanvm.errors import ImageError
from leanvm.memory.guest import GuestMemory
from leanvm.memory.host import PAGE_SIZE


def map_readonly(path: str | Path, what: str) -> "mmap.mmap | bytes":
    """The file's contents as a read-only mapping (b"" for an empty file).

    ``what`` names the file's role in errors ("kernel", "initrd")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory; the {what} must be a regular file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot open the {what} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        size = info.st_size
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{path}: is a directory; the {what} must be a regular file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path}: not a regular file; the {what} must be one")
        if size == 0:
            return b""
        return mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    except OSError as exc:
        raise ImageError(f"{path}: cannot map the {what} ({exc.strerror})") from None
    finally:
        os.close(fd)


def place(memory: GuestMemory, address: int, data: "bytes | memoryview | mmap.mmap",
          path: "str | Path | None", file_offset: int = 0) -> bool:
    """Put ``data`` (the bytes of ``path`` from ``file_offset``) at guest ``address``: mapped
    copy-on-write from the file where alignment allows (True), else copied (False)."""
    length = len(data)
    if not length:
        return False
    if path is not None and memory.map_file(address, length, str(path), file_offset):
        return True
    memory.write(address, memoryview(data) if not isinstance(data, memoryview) else data)
    return False


def place_range(memory: GuestMemory, start: int, view: memoryview, offset: int, filesz: int,
                path: str | None) -> int:
    """Put ``view[offset:offset + filesz]`` (bytes of the file ``path``) at guest ``start``:
    the whole pages mapped copy-on-write from the file where the file offset and the address
    agree modulo the page size, the ragged ends copied. Returns the bytes mapped."""
    if not filesz:
        return 0
    head = -start % PAGE_SIZE  # bytes before the first whole page
    body = (filesz - head) // PAGE_SIZE * PAGE_SIZE if filesz > head else 0
    if path is None or (offset - start) % PAGE_SIZE or body <= 0 or not memory.map_file(
            start + head, body, path, offset + head):
        memory.write(start, view[offset:offset + filesz])
        return 0
    memory.write(start, view[offset:offset + head])
    tail = head + body
    memory.write(start + tail, view[offset + tail:offset + filesz])
    return body
