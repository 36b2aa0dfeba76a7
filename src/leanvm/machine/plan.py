"""The memory map a machine uses: one function, shared by `leanvm run` and `leanvm memmap`,
so that what memmap prints is what run builds."""

from __future__ import annotations

from leanvm.layout.region import MemoryMap
from leanvm.layout.x86 import plan_x86_layout
from leanvm.machine.config import MachineConfig


def plan_for(config: MachineConfig, cpu_pa_bits: int) -> MemoryMap:
    """The x86 plan for ``config``; physical address bits from the config, else the vCPU's."""
    return plan_x86_layout(config.memory, maxmem=config.maxmem, slots=config.slots,
                           pa_bits=config.pa_bits or cpu_pa_bits, machine=config.machine,
                           settings=dict(config.layout))


def host_pa_bits(kvm_path: str = "/dev/kvm") -> int | None:
    """Physical address bits KVM offers guests here (CPUID 0x80000008), or None without KVM."""
    from leanvm.errors import KvmError
    from leanvm.kvm.system import Kvm

    try:
        with Kvm(kvm_path) as kvm:
            return kvm.supported_cpuid().phys_addr_bits()
    except KvmError:
        return None
