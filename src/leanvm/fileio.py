"""Files leanvm writes for the user: checked before any work starts, written whole or not at
all (a temporary file beside the target, fsynced, renamed over it, the directory fsynced),
and never a temporary file left behind after a failure. Standard library only (layer 0)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from leanvm.errors import ConfigError


def check_output_path(path: "str | Path", what: str) -> Path:
    """``path`` as a Path if a file could be written there now, else ConfigError naming it:
    its directory exists and is writable, and it is not a directory itself. Creates
    nothing."""
    path = Path(path)
    if not str(path):
        raise ConfigError(f"bad {what} path: empty")
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory (expected a file name for the {what})")
    if not parent.is_dir():
        raise ConfigError(f"{path}: cannot write the {what} there (no directory {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot write the {what} there (directory {parent} is "
                          "not writable)")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: cannot write the {what} (the file is not writable)")
    return path


def write_atomic(path: "str | Path", data: "bytes | Callable[[BinaryIO], None]",
                 what: str = "file") -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) to ``path`` as
    one step: readers see the old file or the whole new one. ConfigError naming ``path``
    if it cannot be written; the temporary file is removed on any failure."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory (expected a file name for the {what})")
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as out:
            if isinstance(data, (bytes, bytearray, memoryview)):
                out.write(data)
            else:
                data(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be
    opened)."""
    try:
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
