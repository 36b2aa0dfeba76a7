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
PROT_NONE = 0  # a reservation: no access until something is mapped over it
MAP_FIXED = 0x10  # place the mapping exactly at the address given (over a reservation)
MADV_RANDOM = 1  # no read-ahead around faults on this range
MADV_DONTNEED = 4  # drop the pages; anonymous memory reads as zero afterwards
MADV_DONTFORK, MADV_DOFORK = 10, 11  # leave the range out of fork() children, or not


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

    __slots__ = ("address", "size", "writable", "shared", "path", "writable_limit", "overlays")

    def __init__(self, address: int, size: int, *, writable: bool, shared: bool,
                 path: str | None = None, writable_limit: int | None = None) -> None:
        self.address = address
        self.size = size  # 0 once unmapped
        self.writable = writable
        self.shared = shared
        self.path = path
        # bytes from the start that may be written (a flash bank's erased tail may not)
        self.writable_limit = (size if writable else 0) if writable_limit is None else writable_limit
        # (offset, length) of file ranges mapped over anonymous memory (overlay_file): they
        # hold the file's bytes even where no page of them is resident yet
        self.overlays: list[tuple[int, int]] = []

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

    def inherit(self, on: bool) -> None:
        """Whether a fork() child gets this mapping (MADV_DOFORK) or not (MADV_DONTFORK)."""
        if _libc().madvise(self.address, self.size, MADV_DOFORK if on else MADV_DONTFORK) != 0:
            err = ctypes.get_errno()
            raise LeanvmError(f"madvise(MADV_{'DO' if on else 'DONT'}FORK) failed: "
                              f"{os.strerror(err)}")

    def overlay_file(self, offset: int, length: int, path: str, file_offset: int = 0) -> None:
        """Map ``length`` bytes of ``path`` from ``file_offset`` privately over
        [offset, offset + length) of this mapping: reads come from the host page cache (shared
        with every process mapping the file) and the first write to a page copies it. Offsets
        must be page aligned; a partial last page reads as zeros past the file's end."""
        if offset % PAGE_SIZE or file_offset % PAGE_SIZE or length <= 0:
            raise LeanvmError(f"overlay of {path} at {offset:#x} (file offset {file_offset:#x})"
                              " is not page aligned")
        if not self.writable or offset + length > self.size:
            raise LeanvmError(f"overlay of {path} does not fit a writable mapping")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot open ({exc.strerror})") from None
        try:
            if os.fstat(fd).st_size < file_offset + length:  # pages past the end would SIGBUS
                raise ConfigError(f"{path}: shorter than the {length} bytes from offset "
                                  f"{file_offset:#x} to map")
            pages = -(-length // PAGE_SIZE) * PAGE_SIZE
            got = _libc().mmap(self.address + offset, pages, mmap.PROT_READ | mmap.PROT_WRITE,
                               mmap.MAP_PRIVATE | MAP_FIXED, fd, file_offset)
            if got != self.address + offset:
                raise ConfigError(f"{path}: cannot map {length} bytes into guest memory: "
                                  f"{os.strerror(ctypes.get_errno())}")
            self.overlays.append((offset, pages))
        finally:
            os.close(fd)

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


MADV_HUGEPAGE = 14  # back the range with transparent huge pages where the host allows
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def map_anonymous_huge(size: int) -> HostMapping:
    """Like map_anonymous, but aligned to HUGE_PAGE and advised MADV_HUGEPAGE: memory that is
    plugged and given back in 2 MiB blocks (virtio-mem) is then backed by one huge page per
    block where the host has transparent huge pages, and giving a block back frees one page
    instead of 512 (measured here: 9 us instead of 140 us per touched 2 MiB block)."""
    _check_size(size)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    libc = _libc()
    base = libc.mmap(None, size + HUGE_PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if base in (None, MAP_FAILED):
        raise LeanvmError(f"cannot map {size} bytes of guest memory: "
                          f"{os.strerror(ctypes.get_errno())}")
    start = -(-base // HUGE_PAGE) * HUGE_PAGE
    if start > base:
        libc.munmap(base, start - base)
    if base + HUGE_PAGE > start:
        libc.munmap(start + size, base + HUGE_PAGE - start)
    libc.madvise(start, size, MADV_HUGEPAGE)  # advice only: without THP nothing changes
    return HostMapping(start, size, writable=True, shared=False)


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


ERASED_CHUNK = 2 << 20  # the shared erased-flash file is this big and mapped repeatedly
ERASED_NAME = "leanvm-erased-v1-2M"


def erased_source() -> str:
    """Path of a file of 0xFF bytes in shared memory (tmpfs), made once per host and mapped
    read-only by every VM: erased flash then costs its page cache once per host, not per VM."""
    for directory in ("/dev/shm", os.environ.get("XDG_RUNTIME_DIR", ""), "/tmp"):
        if not directory or not os.path.isdir(directory):
            continue
        path = os.path.join(directory, ERASED_NAME)
        try:
            if os.path.getsize(path) == ERASED_CHUNK:
                return path
        except OSError:
            pass
        temp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temp, "wb") as handle:
                handle.write(b"\xff" * ERASED_CHUNK)
            os.chmod(temp, 0o444)
            os.replace(temp, path)  # whole or not at all, even with VMs starting in parallel
            return path
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
    raise LeanvmError("cannot create the shared erased-flash file in /dev/shm, "
                      "$XDG_RUNTIME_DIR or /tmp")


def map_flash_bank(bank_size: int, image: str | None, image_size: int, *, writable: bool,
                   data_extents: list[tuple[int, int]] | None = None) -> HostMapping:
    """A flash bank's host memory: ``image_size`` bytes of the image file (private: writes
    stay in this process), then erased flash (0xFF) from the shared file up to
    ``bank_size``. Nothing is read now; pages cost only when touched. With
    ``data_extents`` ((offset, length) of the file's allocated ranges), the file's holes are
    mapped as anonymous memory instead, which reads as zeros from the kernel's shared zero
    page: holes then cost nothing even when the guest reads them."""
    _check_size(bank_size)
    if image_size % PAGE_SIZE or not 0 <= image_size <= bank_size:
        raise ConfigError(f"{image}: image size {image_size} must be a multiple of {PAGE_SIZE} "
                          f"no larger than the bank ({bank_size})")
    libc = _libc()
    base = libc.mmap(None, bank_size, PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if base in (None, MAP_FAILED):
        raise LeanvmError(f"cannot reserve {bank_size} bytes for a flash bank: "
                          f"{os.strerror(ctypes.get_errno())}")
    mapping = HostMapping(base, bank_size, writable=writable, shared=False, path=image,
                          writable_limit=image_size if writable else 0)
    try:
        if image_size:
            assert image is not None
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            _map_fixed(base, image_size, prot, image)
            if writable:  # a store is usually one VM's own copy: read only what it touches,
                libc.madvise(base, image_size, MADV_RANDOM)  # not the kernel's read-ahead
            if data_extents is not None:
                for start, length in _holes(data_extents, image_size):
                    _map_zero(base + start, length, prot)
        tail = bank_size - image_size
        if tail:
            source = erased_source()
            for offset in range(image_size, bank_size, ERASED_CHUNK):
                _map_fixed(base + offset, min(ERASED_CHUNK, bank_size - offset), mmap.PROT_READ,
                           source)
    except BaseException:
        mapping.unmap()
        raise
    return mapping


def _holes(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Whole pages of [0, size) outside every extent (extents rounded out to pages)."""
    holes, cursor = [], 0
    for offset, length in sorted(extents):
        start = offset // PAGE_SIZE * PAGE_SIZE
        if start > cursor:
            holes.append((cursor, start - cursor))
        cursor = max(cursor, -(-(offset + length) // PAGE_SIZE) * PAGE_SIZE)
    if cursor < size:
        holes.append((cursor, size - cursor))
    return [(start, min(length, size - start)) for start, length in holes if start < size]


def _map_zero(address: int, length: int, prot: int) -> None:
    got = _libc().mmap(address, length, prot,
                       mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
    if got != address:
        raise LeanvmError(f"cannot map {length} bytes of zeros: {os.strerror(ctypes.get_errno())}")


def _map_fixed(address: int, length: int, prot: int, path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        got = _libc().mmap(address, length, prot, mmap.MAP_PRIVATE | MAP_FIXED, fd, 0)
        if got != address:
            raise ConfigError(f"{path}: cannot map {length} bytes: "
                              f"{os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class ReleasePages:
    """A discard listener (memory/discard.py) that gives a region's discarded pages back to
    the host at once: MADV_DONTNEED drops anonymous and private pages (they read as zeros
    and cost nothing until touched again). A shared file mapping would need its file's
    blocks punched out as well (fallocate PUNCH_HOLE); no region of that kind is discarded
    yet, so it is refused rather than half done."""

    __slots__ = ("mapping", "released")

    def __init__(self, mapping: HostMapping) -> None:
        if mapping.shared:
            raise LeanvmError(f"{mapping.path}: shared file-backed memory cannot be discarded "
                              "yet (it would need hole punching)")
        self.mapping = mapping
        self.released = 0  # bytes given back so far

    def on_populate(self, offset: int, size: int) -> None:
        pass  # pages come back on the guest's first touch

    def on_discard(self, offset: int, size: int) -> None:
        self.mapping.discard(offset, size)
        self.released += size
