"""Host memory mappings made with libc mmap (the mmap module cannot map read-only files
at a known address, nor reserve without backing)."""

from __future__ import annotations

import ctypes
import mmap
import os
from functools import lru_cache

from leanvm.errors import ConfigError, LeanvmError

PAGE_SIZE = mmap.PAGESIZE
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_NORESERVE = 0x4000  # do not reserve swap for this mapping
MADV_DONTNEED = 4  # drop the pages; anonymous memory reads as zero afterwards


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class HostMapping:
    """A range of this process's address space backing guest memory."""

    __slots__ = ("address", "size", "writable", "shared", "path")

    def __init__(self, address: int, size: int, *, writable: bool, shared: bool,
                 path: str | None = None) -> None:
        self.address = address
        self.size = size  # 0 once unmapped
        self.writable = writable
        self.shared = shared
        self.path = path

    def __repr__(self) -> str:
        return (f"HostMapping(address={self.address:#x}, size={self.size:#x}, "
                f"writable={self.writable}, shared={self.shared}, path={self.path!r})")

    def view(self) -> memoryview:
        """A byte view of the whole mapping (read-only when the mapping is)."""
        array = (ctypes.c_ubyte * self.size).from_address(self.address)
        view = memoryview(array).cast("B")
        return view if self.writable else view.toreadonly()

    def discard(self, offset: int, length: int) -> None:
        """Give pages back to the host (MADV_DONTNEED)."""
        if _libc().madvise(self.address + offset, length, MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise LeanvmError(f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")

    def unmap(self) -> None:
        if self.size:
            _libc().munmap(self.address, self.size)
            self.size = 0


def map_anonymous(size: int) -> HostMapping:
    """Private zero-filled memory, reserved lazily: pages cost nothing until touched."""
    _check_size(size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    address = _libc().mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise LeanvmError(f"cannot map {size} bytes of guest memory: {os.strerror(err)}")
    return HostMapping(address, size, writable=True, shared=False)


def map_file(path: str, size: int, *, offset: int = 0, writable: bool, shared: bool) -> HostMapping:
    """Map ``size`` bytes of ``path``. Private writable mappings are copy-on-write; shared
    ones write through to the file; read-only ones share the host page cache."""
    _check_size(size)
    try:
        fd = os.open(path, os.O_RDWR if writable and shared else os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        address = _libc().mmap(None, size, prot, flags, fd, offset)
        if address in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise ConfigError(f"{path}: cannot map {size} bytes: {os.strerror(err)}")
    finally:
        os.close(fd)
    return HostMapping(address, size, writable=writable, shared=shared, path=path)


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"memory size {size} must be a positive multiple of {PAGE_SIZE}")
