"""One error root for everything leanvm raises on purpose.

    LeanvmError
     +-- KvmError       an ioctl on /dev/kvm or a VM/vCPU fd failed (names the ioctl, errno)
     +-- ConfigError    the user asked for something invalid (a size, a flag, a file)
     +-- ImageError     a guest image (binary, ELF, firmware) cannot be used as given
     +-- GuestError     the guest did something invalid (touched memory it does not have)
     +-- DeviceError    a device model was wired or used wrongly by the VMM itself
     +-- QmpError       a QMP command failed (QEMU's error class and description), in
                        process (Machine.execute) or from a QMP server (leanvm qmp)

The CLI prints ``str(error)`` as one line; every message says what was wrong and, where
it can, what to do about it.
"""

from __future__ import annotations

import errno as _errno
import os


class LeanvmError(Exception):
    """Root of every error leanvm raises deliberately."""


class KvmError(LeanvmError):
    """A KVM ioctl (or opening /dev/kvm) failed."""

    def __init__(self, ioctl: str, err: int, hint: str = "") -> None:
        self.ioctl = ioctl
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        message = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class ConfigError(LeanvmError):
    """Invalid configuration: a bad size, flag, path or combination."""


class ImageError(LeanvmError):
    """A guest image cannot be loaded as given."""


class GuestError(LeanvmError):
    """The guest did something invalid, such as addressing memory it does not have."""


class DeviceError(LeanvmError):
    """A device or bus was wired wrongly (overlapping ranges, bad sizes)."""


class QmpError(LeanvmError):
    """A QMP command failed: ``error_class`` is QEMU's (GenericError, CommandNotFound,
    DeviceNotFound, ...), ``desc`` its description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
