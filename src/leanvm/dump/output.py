"""The dump file: written under a temporary name beside the target, fsynced and renamed
over it only when complete, so a failed or interrupted dump never leaves a half file under
the final name, and leaves no temporary file behind either."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from leanvm.errors import ConfigError
from leanvm.fileio import check_output_path, fsync_directory


class DumpFileError(ConfigError):
    """The dump could not be written (no space, no permission, no directory)."""


class DumpFile:
    """A sink (write, seek) over the temporary file; ``commit`` or ``discard`` ends it."""

    def __init__(self, path: "str | Path") -> None:
        self.path = check_output_path(path, "dump")
        self.temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.written = 0
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600)
        except OSError as exc:
            raise DumpFileError(f"{self.path}: cannot create the dump ({exc.strerror})") from None

    def write(self, data: "bytes | memoryview") -> int:
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                raise self._failed(exc) from None
            view = view[n:]
            self.written += n
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self.fd, offset, whence)

    def _failed(self, exc: OSError) -> DumpFileError:
        self.discard()
        why = ("the file system is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
               else exc.strerror or str(exc))
        return DumpFileError(f"{self.path}: cannot write the dump: {why} (after "
                             f"{self.written} bytes; nothing was left behind)")

    def commit(self) -> int:
        """fsync, rename over the target; the file's size."""
        try:
            os.fsync(self.fd)
            size = os.fstat(self.fd).st_size
            os.close(self.fd)
            self.fd = -1
            os.replace(self.temp, self.path)
        except OSError as exc:
            raise self._failed(exc) from None
        fsync_directory(self.path.parent)
        return size

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.temp)
        except OSError:
            pass
