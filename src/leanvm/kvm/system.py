"""The /dev/kvm system fd: API version, capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from leanvm.abi import kvm as abi
from leanvm.errors import KvmError
from leanvm.kvm._ioctl import ioctl
from leanvm.kvm.cpuid import CpuidTable

if TYPE_CHECKING:
    from leanvm.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"


class Kvm:
    """An open /dev/kvm. Use as a context manager or call close()."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"open {path}", errno.ENOENT,
                           "KVM is not available: load kvm_intel or kvm_amd, or run on a host "
                           "with hardware virtualisation") from None
        except PermissionError:
            raise KvmError(f"open {path}", errno.EACCES,
                           "add yourself to the 'kvm' group or run as root") from None
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from None
        version = ioctl(self.fd, abi.KVM_GET_API_VERSION, "KVM_GET_API_VERSION")
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", errno.EPROTO,
                           f"kernel reports API {version}, leanvm needs {abi.KVM_API_VERSION}")
        self.api_version = version

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else a capability-specific positive value."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> CpuidTable:
        """KVM_GET_SUPPORTED_CPUID as a table that can be masked and handed to a vCPU."""
        n = abi.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = abi.kvm_cpuid2_with(n)()
            buf.nent = n
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return CpuidTable.from_entries(buf.entries[: buf.nent])

    def create_vm(self) -> "Vm":
        from leanvm.kvm.vm import Vm

        fd = ioctl(self.fd, abi.KVM_CREATE_VM, "KVM_CREATE_VM", 0)
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

