"""Kernel and initrd files, mapped read-only: their pages stay in the host's page cache (one
copy shared by every VM that boots them) until something copies them into guest RAM."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from leanvm.errors import ImageError


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
