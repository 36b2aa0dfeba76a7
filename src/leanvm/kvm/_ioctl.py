"""ioctl calls that turn OSError into KvmError naming the ioctl."""

from __future__ import annotations

import ctypes
import fcntl
from functools import lru_cache

from leanvm.errors import KvmError

_INT_MAX = (1 << 31) - 1


@lru_cache(maxsize=1)
def _libc_ioctl() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    func = libc.ioctl
    func.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    func.restype = ctypes.c_int
    return func


def ioctl(fd: int, request: int, name: str, arg: "int | ctypes.Structure | ctypes._SimpleCData" = 0, hint: str = "") -> int:
    """Issue ``request`` on ``fd``; ``arg`` is an int or a ctypes structure (mutated in place)."""
    if isinstance(arg, int) and arg > _INT_MAX:  # fcntl.ioctl takes a C int; KVM an unsigned long
        result = _libc_ioctl()(fd, request, arg)
        if result < 0:
            raise KvmError(name, ctypes.get_errno(), hint)
        return result
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise KvmError(name, exc.errno or 0, hint) from None

