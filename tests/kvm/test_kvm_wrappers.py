"""leanvm.kvm on its own: capabilities, memslots, registers, MSRs, CPUID, interrupts."""

from __future__ import annotations

import os

import pytest

from leanvm.abi import kvm as abi
from leanvm.errors import KvmError
from leanvm.kvm.system import Kvm
from leanvm.memory.host import map_anonymous


@pytest.fixture
def vm():
    kvm = Kvm()
    machine = kvm.create_vm()
    yield machine
    machine.close()
    kvm.close()


def test_capabilities_and_cpuid() -> None:
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY)
        assert kvm.check_extension(abi.KVM_CAP_NR_MEMSLOTS) > 0
        assert kvm.vcpu_mmap_size() >= 4096
        table = kvm.supported_cpuid()
        assert table.lookup(0) is not None and table.has("lm")
        assert 32 <= table.phys_addr_bits() <= 57


def test_missing_device_is_a_kvm_error() -> None:
    with pytest.raises(KvmError, match="open /nonexistent failed: ENOENT"):
        Kvm("/nonexistent")


def test_memslots_are_counted_and_bad_ones_name_the_ioctl(vm) -> None:
    mem = map_anonymous(1 << 20)
    vm.set_memory_region(0, 0, mem.size, mem.address)
    vm.set_memory_region(1, 1 << 30, mem.size, mem.address, readonly=True)
    vm.set_memory_region(1, 1 << 30, 0, mem.address)  # delete
    assert vm.memslot_changes == 3
    with pytest.raises(KvmError, match=r"KVM_SET_USER_MEMORY_REGION\(slot 2, gpa 0x100"):
        vm.set_memory_region(2, 0x100, mem.size, mem.address)  # gpa not page aligned
    mem.unmap()


def test_registers_msrs_and_cpuid_round_trip(vm) -> None:
    vcpu = vm.create_vcpu(0)
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip = 0x1234, 0xFEEDFACE, 0x5000
    vcpu.set_regs(regs)
    again = vcpu.get_regs()
    assert (again.rax, again.r15, again.rip) == (0x1234, 0xFEEDFACE, 0x5000)
    vcpu.set_msrs({abi.MSR_LSTAR: 0xFFFFFFFF81000000})
    assert vcpu.get_msrs([abi.MSR_LSTAR]) == {abi.MSR_LSTAR: 0xFFFFFFFF81000000}
    with pytest.raises(KvmError, match="MSR 0x12345678"):
        vcpu.get_msrs([0x12345678])
    table = vm.kvm.supported_cpuid().without(["sse4_2"])
    vcpu.set_cpuid(table)
    sregs = vcpu.get_sregs()
    sregs.cr4 |= abi.X86_CR4_PAE
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs().cr4 & abi.X86_CR4_PAE
    events = vcpu.get_events()
    vcpu.set_events(events)
    fpu = vcpu.get_fpu()
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def test_irqchip_pit_irq_lines_irqfd_and_ioeventfd(vm) -> None:
    vm.create_irqchip()
    vm.create_pit2()
    vm.irq_line(4, True)
    vm.irq_line(4, False)
    fd = os.eventfd(0)
    try:
        vm.irqfd(fd, 5)
        vm.irqfd(fd, 5, deassign=True)
        vm.ioeventfd(0x600, 2, fd, pio=True, datamatch=7)
        vm.ioeventfd(0x600, 2, fd, pio=True, datamatch=7, deassign=True)
        with pytest.raises(KvmError, match="KVM_IOEVENTFD"):
            vm.ioeventfd(0x600, 3, fd, pio=True)  # length must be 0, 1, 2, 4 or 8
    finally:
        os.close(fd)
