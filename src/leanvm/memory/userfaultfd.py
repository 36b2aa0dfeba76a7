"""Write-protect tracking of host memory with userfaultfd(2), and reading another process's
memory (process_vm_readv). Live dumps use both (machine/live_dump.py): guest RAM is
write-protected, each write to a protected page (by a vCPU through KVM, or by the VMM)
waits until the page's old bytes are copied, and the dump is read from the VMM by a
child process that does not map guest RAM at all.

A userfaultfd acts on the memory of the process that opened it, whoever holds the
descriptor. Calls go through ctypes so they release the GIL.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

from leanvm.abi import userfaultfd as abi
from leanvm.errors import LeanvmError


class UffdUnavailable(LeanvmError):
    """Write-protect tracking is not available here (the reason says why)."""


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
    libc.ioctl.restype = ctypes.c_int
    libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                      ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    return libc


class Userfaultfd:
    """One userfaultfd of this process, with write-protect faults and protection of pages
    not yet populated (UFFD_FEATURE_WP_UNPOPULATED, Linux 6.4). Raises UffdUnavailable
    when the kernel or the caller's privileges do not allow it."""

    def __init__(self) -> None:
        libc = _libc()
        fd = libc.syscall(abi.SYS_USERFAULTFD, abi.O_CLOEXEC | abi.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            why = ("needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1" if err == 1
                   else os.strerror(err))
            raise UffdUnavailable(f"userfaultfd: {why}")
        self.fd = fd
        try:
            api = self._ioctl(abi.UFFDIO_API, abi.API.pack(abi.UFFD_API,
                                                           abi.UFFD_FEATURE_WP_UNPOPULATED, 0),
                              "UFFDIO_API")
        except LeanvmError as exc:
            os.close(fd)
            raise UffdUnavailable(f"userfaultfd without write-protection of unpopulated "
                                  f"pages (Linux 6.4 has it): {exc}") from None
        self.features = abi.API.unpack(api)[1]

    def _ioctl(self, request: int, arg: bytes, name: str) -> bytes:
        buffer = ctypes.create_string_buffer(arg, len(arg))
        if _libc().ioctl(self.fd, request, buffer) != 0:
            err = ctypes.get_errno()
            raise LeanvmError(f"{name} failed: {os.strerror(err)}")
        return buffer.raw

    def register(self, address: int, size: int) -> None:
        """Track writes to write-protected pages of [address, address + size)."""
        self._ioctl(abi.UFFDIO_REGISTER,
                    abi.REGISTER.pack(address, size, abi.UFFDIO_REGISTER_MODE_WP, 0),
                    "UFFDIO_REGISTER")

    def unregister(self, address: int, size: int) -> None:
        self._ioctl(abi.UFFDIO_UNREGISTER, abi.RANGE.pack(address, size), "UFFDIO_UNREGISTER")

    def protect(self, address: int, size: int, on: bool = True) -> None:
        """Write-protect the range, or (``on`` False) lift the protection and wake whoever
        waits on a write to it."""
        mode = abi.UFFDIO_WRITEPROTECT_MODE_WP if on else 0
        self._ioctl(abi.UFFDIO_WRITEPROTECT, abi.WRITEPROTECT.pack(address, size, mode),
                    "UFFDIO_WRITEPROTECT")

    def faults(self) -> list[int]:
        """Addresses (page aligned) of the writes waiting now, without blocking."""
        out: list[int] = []
        while True:
            try:
                raw = os.read(self.fd, abi.MSG.size * 64)
            except BlockingIOError:
                return out
            for at in range(0, len(raw) - abi.MSG.size + 1, abi.MSG.size):
                event, _, _, _, flags, address, _ = abi.MSG.unpack_from(raw, at)
                if event == abi.UFFD_EVENT_PAGEFAULT and flags & abi.UFFD_PAGEFAULT_FLAG_WP:
                    out.append(address & ~0xFFF)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def read_remote(pid: int, address: int, size: int) -> bytearray:
    """``size`` bytes at ``address`` in process ``pid`` (process_vm_readv; needs the right
    to ptrace it, as a parent's child of the same user has)."""
    buffer = bytearray(size)
    base = ctypes.addressof((ctypes.c_char * size).from_buffer(buffer)) if size else 0
    local, remote = _Iovec(), _Iovec()
    done = 0
    while done < size:
        local.base, local.len = base + done, size - done
        remote.base, remote.len = address + done, size - done
        got = _libc().process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise LeanvmError(f"reading {size} bytes at {address:#x} of process {pid}: "
                              f"{os.strerror(err) if got < 0 else 'nothing read'}")
        done += got
    return buffer
