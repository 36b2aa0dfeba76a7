"""A VM fd: memslots, irqchip and PIT, IRQ lines, ioeventfd/irqfd, vCPU creation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from leanvm.abi import kvm as abi
from leanvm.errors import KvmError
from leanvm.kvm._ioctl import ioctl
from leanvm.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from leanvm.kvm.system import Kvm


class Vm:
    """One virtual machine. Counts memslot changes so callers can keep them few."""

    def __init__(self, kvm: "Kvm", fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.memslot_changes = 0
        self.vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", cap)

    # --- memory ------------------------------------------------------------------------
    def set_memory_region(self, slot: int, guest_phys_addr: int, size: int, host_addr: int,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        """Create, move or (with size 0) delete memslot ``slot``."""
        region = abi.kvm_userspace_memory_region(
            slot=slot,
            flags=(abi.KVM_MEM_READONLY if readonly else 0)
            | (abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0),
            guest_phys_addr=guest_phys_addr, memory_size=size, userspace_addr=host_addr)
        hint = ""
        if readonly and not self.check_extension(abi.KVM_CAP_READONLY_MEM):
            hint = "this host's KVM has no read-only memslots (KVM_CAP_READONLY_MEM)"
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION,
              f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {guest_phys_addr:#x}, size {size:#x})",
              region, hint)
        self.memslot_changes += 1

    def set_tss_addr(self, address: int) -> None:
        """Three pages the host needs for real-mode emulation on Intel (must not be RAM)."""
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_addr(self, address: int) -> None:
        import ctypes

        value = ctypes.c_uint64(address)
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", value)

    # --- interrupts --------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and a LAPIC per vCPU (create before vCPUs)."""
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP", 0)

    def create_pit2(self) -> None:
        """In-kernel i8254 PIT on ports 0x40-0x43 (speaker port handled as a dummy)."""
        ioctl(self.fd, abi.KVM_CREATE_PIT2, "KVM_CREATE_PIT2",
              abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, abi.KVM_IRQ_LINE, "KVM_IRQ_LINE", abi.kvm_irq_level(irq=irq, level=int(level)))

    def ioeventfd(self, address: int, length: int, fd: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Guest writes to ``address`` signal eventfd ``fd`` in the kernel, with no exit."""
        flags = (abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0) \
            | (abi.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) \
            | (abi.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        arg = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=fd,
                                flags=flags)
        ioctl(self.fd, abi.KVM_IOEVENTFD, f"KVM_IOEVENTFD({address:#x}, len {length})", arg)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Writes to eventfd ``fd`` raise interrupt ``gsi`` in the kernel (needs the irqchip)."""
        arg = abi.kvm_irqfd(fd=fd, gsi=gsi,
                            flags=abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        ioctl(self.fd, abi.KVM_IRQFD, f"KVM_IRQFD(gsi {gsi})", arg)

    def coalesce(self, address: int, size: int, *, pio: bool, remove: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: guest writes to [address, address + size) are
        queued in the coalesced ring (kvm/coalesced.py) instead of exiting; ``remove``
        (KVM_UNREGISTER_COALESCED_MMIO) makes them exit again."""
        zone = abi.kvm_coalesced_mmio_zone(addr=address, size=size, pio=int(pio))
        name = "KVM_UNREGISTER_COALESCED_MMIO" if remove else "KVM_REGISTER_COALESCED_MMIO"
        request = abi.KVM_UNREGISTER_COALESCED_MMIO if remove else abi.KVM_REGISTER_COALESCED_MMIO
        ioctl(self.fd, request, f"{name}({address:#x}, {size})", zone)

    def coalesced_ring_offset(self) -> int:
        """Where the coalesced ring is in a vCPU's mapping (bytes), 0 without one; port
        ranges need KVM_CAP_COALESCED_PIO besides."""
        return self.kvm.check_extension(abi.KVM_CAP_COALESCED_MMIO) * 4096

    # --- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, f"KVM_CREATE_VCPU({vcpu_id})", vcpu_id)
        try:
            size = self.kvm.vcpu_mmap_size()
            vcpu = Vcpu(self.fd, vcpu_id, fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Vm", "KvmError"]
