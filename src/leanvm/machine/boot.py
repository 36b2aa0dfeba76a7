"""How a VM is made: ``build(config, ...) -> Built``, one flat recipe, top to bottom.

    0. read the guest's files          so a bad file is reported before anything is allocated
    1. host check and CPU profile      what this host's KVM can run, the CPUID guests see
    2. plan                            the memory map, flash banks included (layout/)
    3. memory and memslots             one MemoryManager owns both
    4. platform devices                the platform table's devices on their buses
    5. firmware, flash and BIOS area   banks from the plan, the PAM-shaped BIOS area
    6. boot path                       bare, direct or firmware: each gives one Entry
    7. vCPUs                           created and entered; the emulation fallback

Everything a VM is made of comes back in ``Built``: plain parts that a snapshot can walk
later. Nothing here runs the guest; machine.Machine does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanvm.abi.kvm import KVM_CAP_TSC_DEADLINE_TIMER
from leanvm.errors import ImageError
from leanvm.machine.config import MachineConfig
from leanvm.machine.cpu import Entry, EntryMode, enter
from leanvm.machine.memory_manager import MemoryManager
from leanvm.machine.plan import plan_machine
from leanvm.machine.platform import Hooks, Platform, build_platform, coalesce_ports

if TYPE_CHECKING:
    from leanvm.kvm.cpuid import CpuidTable
    from leanvm.kvm.system import Kvm
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.kvm.vm import Vm
    from leanvm.layout.region import MemoryMap
    from leanvm.loader.fwcfg_kernel import FirmwareKernel
    from leanvm.loader.image import GuestImage
    from leanvm.machine.direct_boot import DirectBoot
    from leanvm.machine.entry_trap import EntryTrap
    from leanvm.machine.fallback import Fallback
    from leanvm.machine.host_check import HostFinding
    from leanvm.machine.tracing import BootTrace
    from leanvm.trace.events import Tracer


class BootPath(Enum):
    BARE = "bare"  # a flat or ELF test program, entered in 64-bit long mode
    DIRECT = "direct"  # Linux without firmware: PVH or the 64-bit boot protocol
    FIRMWARE = "firmware"  # firmware from flash at the reset vector (it may load Linux)


def boot_path(config: MachineConfig) -> BootPath:
    if config.firmware:
        return BootPath.FIRMWARE
    return BootPath.DIRECT if config.kernel is not None else BootPath.BARE


_BUILT_PARTS = ("kvm", "vm", "cpu_profile", "kernel_cmdline", "cmdline_added", "plan",
                "memory_manager", "platform", "flash_banks", "bios_area", "boot", "entry",
                "image", "kernel", "direct_boot", "kernel_file", "entry_trap", "vcpus",
                "fallback", "coalesced", "virtio")


class Built:
    """The parts of one VM, as build() made them: kvm, vm; cpu_profile ("host" or
    "emulated"), kernel_cmdline (with what the profile added), cmdline_added; plan,
    memory_manager, platform, flash_banks, bios_area; boot (the BootPath) and entry; what
    was loaded: image (bare guests), kernel (what fw_cfg serves for firmware with
    -kernel), direct_boot and kernel_file (direct boots), entry_trap; vcpus; fallback;
    coalesced (the ring KVM queues the serial console's writes in, if it does); virtio (the
    virtio-mmio devices, machine/virtio.py).
    (A slotted class rather than a NamedTuple: made on every start, and NamedTuple
    classes cost start-up time to create.)"""

    __slots__ = _BUILT_PARTS

    def __init__(self, *parts: Any) -> None:
        for name, value in zip(_BUILT_PARTS, parts, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Built is read-only (tried to set {name})")

    @property
    def memory(self) -> Any:
        return self.memory_manager.memory

    @property
    def kernel_boot_note(self) -> str:
        return self.direct_boot.note if self.direct_boot is not None else ""


class Inputs:
    __slots__ = ("image", "kernel", "initrd")

    def __init__(self, image: "GuestImage | None", kernel: Any, initrd: Any) -> None:
        self.image, self.kernel, self.initrd = image, kernel, initrd  # mapped file bytes


def build(config: MachineConfig, hooks: Hooks, tracer: "Tracer",
          boot_trace: "BootTrace | None", keep: Callable[[Any], Any],
          host_finding: "Callable[[], HostFinding]") -> Built:
    """The recipe. ``keep(resource)`` hands each thing that must be closed to the caller
    as soon as it exists (so a failure half-way leaks nothing)."""
    from leanvm.kvm.system import Kvm

    path = boot_path(config)
    inputs = read_inputs(config, path)                                             # 0
    kvm = keep(Kvm(config.kvm_path))                                               # 1
    profile, cpuid = cpu_profile(config, kvm.supported_cpuid(), host_finding,
                                 bool(kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER)))
    cmdline, added = linux_cmdline(config, profile, host_finding)
    planned = plan_machine(config, cpuid.phys_addr_bits())                         # 2
    vm = keep(kvm.create_vm())                                                     # 3
    setup_kvm_private(vm, planned.memory_map)
    vm.create_irqchip()
    vm.create_pit2()
    memory = keep(MemoryManager(vm, planned.memory_map, config.huge_pages))
    if tracer.enabled:
        tracer.instant("vmm", "memory ready")
    platform = build_platform(planned.memory_map, memory.memory,                   # 4
                              hooks.with_irq_line(vm.irq_line), config.smp)
    if boot_trace is not None:
        platform.fw_cfg_transfers.add(boot_trace.fw_cfg)
    coalescing = config.coalesced_io and coalesce_ports(vm, platform) is not None
    virtio = keep(virtio_devices(config, planned.memory_map, memory, platform, vm))   # 4b
    cmdline = with_virtio_cmdline(config, planned.memory_map, cmdline)
    from leanvm.machine.firmware_boot import build_flash                           # 5
    banks, area = build_flash(planned, memory, platform, keep)
    with explain_cmdline(added):                                                   # 6
        entry, parts = BOOT_PATHS[path](config, planned.memory_map, memory, platform, inputs,
                                        cmdline, tracer)
    vcpus = create_vcpus(vm, cpuid, config.smp, entry)                             # 7
    if config.tsc_khz:
        set_tsc_khz(kvm, vcpus, config.tsc_khz)
    ring = vcpus[0].coalesced_ring(vm.coalesced_ring_offset()) if coalescing else None
    fallback = make_fallback(config, memory, platform, cpuid, host_finding)
    if fallback is not None:
        keep(fallback)
    virtio.start()
    if tracer.enabled:
        tracer.instant("vmm", "images loaded")
    return Built(kvm, vm, profile, cmdline, added, planned.memory_map, memory, platform,
                 tuple(banks), area, path, entry, inputs.image, parts.kernel,
                 parts.direct_boot, inputs.kernel if path is BootPath.DIRECT else None,
                 parts.entry_trap, tuple(vcpus), fallback, ring, virtio)


# --- 0. inputs -----------------------------------------------------------------------------
def demo_guest_path() -> Path:
    """The bundled demo guest (prints a greeting, then resets)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo.bin"


def read_inputs(config: MachineConfig, path: BootPath) -> Inputs:
    from leanvm.loader.files import map_readonly
    from leanvm.loader.image import load_image

    image = load_image(config.guest or demo_guest_path()) if path is BootPath.BARE else None
    kernel = initrd = None
    if config.kernel is not None:  # not closed explicitly: fw_cfg and RAM map views of them
        kernel = map_readonly(config.kernel, "kernel")
        initrd = map_readonly(config.initrd, "initrd") if config.initrd is not None else b""
    return Inputs(image, kernel, initrd)


# --- 1. host check and CPU profile ---------------------------------------------------------
def cpu_profile(config: MachineConfig, supported: "CpuidTable",
                host_finding: "Callable[[], HostFinding]",
                tsc_deadline: bool) -> "tuple[str, CpuidTable]":
    """("host" or "emulated", the CPUID table guests get) (docs/emulation.md): KVM's
    supported CPUID, with the paravirtual leaves QEMU gives a KVM guest, less what the
    profile and --cpu-hide hide."""
    from leanvm.machine import cpu_profile as profiles

    name = profiles.resolve(config.cpu_profile, lambda: host_finding().needs_fallback)
    return name, profiles.apply(supported, name, config.hide_cpu_features, tsc_deadline)


def linux_cmdline(config: MachineConfig, profile: str,
                  host_finding: "Callable[[], HostFinding]") -> tuple[str, tuple[str, ...]]:
    """(the kernel command line to boot, the parameters leanvm added): the emulated profile
    asks Linux itself to leave alone what this host's CPUID shows despite the profile."""
    if config.kernel is None or profile != "emulated":
        return config.cmdline, ()
    from leanvm.machine.cpu_profile import linux_parameters, with_parameters

    return with_parameters(config.cmdline, linux_parameters(profile, host_finding().unhidden))


@contextlib.contextmanager
def explain_cmdline(added: tuple[str, ...]) -> Iterator[None]:
    """A command line too long for the kernel says what leanvm added to it."""
    try:
        yield
    except ImageError as exc:
        if "command line" not in str(exc) or not added:
            raise
        raise ImageError(f"{exc} (with {' '.join(added)} that the emulated CPU profile added; "
                         "--cpu-profile host leaves them out)") from None


# --- 3. memory -----------------------------------------------------------------------------
def setup_kvm_private(vm: "Vm", plan: "MemoryMap") -> None:
    """KVM on Intel needs an identity-map page and a three-page TSS for real mode, in
    guest-physical space that is not RAM: the plan's kvm-private region holds both."""
    from leanvm.layout.region import RegionRole

    for region in plan.enabled():
        if region.role is RegionRole.KVM_PRIVATE:
            vm.set_identity_map_addr(region.base)
            vm.set_tss_addr(region.base + 0x1000)


# --- 4b. virtio devices --------------------------------------------------------------------
def virtio_devices(config: MachineConfig, plan: "MemoryMap", memory: MemoryManager,
                   platform: Platform, vm: "Vm") -> Any:
    """The virtio-mmio devices (machine/virtio.py; an empty set without --virtio-mem)."""
    from leanvm.machine.virtio import VirtioDevices, build_virtio

    devices = VirtioDevices()
    if config.virtio_mem:
        try:
            build_virtio(config, plan, memory, platform, vm, devices)
        except BaseException:
            devices.close()
            raise
    return devices


def with_virtio_cmdline(config: MachineConfig, plan: "MemoryMap", cmdline: str) -> str:
    """The command line with virtio_mmio.device= parameters when discovery is "cmdline"."""
    if not config.virtio_mem or config.virtio_discovery != "cmdline":
        return cmdline
    from leanvm.machine.virtio import cmdline_devices

    return " ".join(part for part in (cmdline, cmdline_devices(config, plan)) if part)


# --- 6. boot paths: each loads what it boots and says how vCPU 0 starts ------------------
class BootParts:
    """What a boot path loaded, besides the entry."""

    __slots__ = ("kernel", "direct_boot", "entry_trap")

    def __init__(self, kernel: "FirmwareKernel | None" = None,
                 direct_boot: "DirectBoot | None" = None,
                 entry_trap: "EntryTrap | None" = None) -> None:
        self.kernel, self.direct_boot, self.entry_trap = kernel, direct_boot, entry_trap


def boot_bare(config: MachineConfig, plan: "MemoryMap", memory: MemoryManager,
              platform: Platform, inputs: Inputs, cmdline: str, tracer: "Tracer"
              ) -> tuple[Entry, BootParts]:
    from leanvm.loader.bare import load_bare

    assert inputs.image is not None
    return Entry(EntryMode.LONG, load_bare(memory.memory, inputs.image, config.args)), BootParts()


def boot_direct(config: MachineConfig, plan: "MemoryMap", memory: MemoryManager,
                platform: Platform, inputs: Inputs, cmdline: str, tracer: "Tracer"
                ) -> tuple[Entry, BootParts]:
    from leanvm.machine.direct_boot import load_direct

    boot = load_direct(config, plan, memory.memory, inputs.kernel, inputs.initrd, tracer,
                       cmdline)
    mode = EntryMode.PROTECTED if boot.mode == "pvh" else EntryMode.LONG
    return Entry(mode, boot.kernel.boot), BootParts(direct_boot=boot)


def boot_firmware(config: MachineConfig, plan: "MemoryMap", memory: MemoryManager,
                  platform: Platform, inputs: Inputs, cmdline: str, tracer: "Tracer"
                  ) -> tuple[Entry, BootParts]:
    """The vCPU stays at the reset vector (F000:FFF0); with -kernel, fw_cfg serves the
    kernel as QEMU's loader does and a trap catches the firmware entering it."""
    if inputs.kernel is None:
        return Entry(EntryMode.RESET, None), BootParts()
    from leanvm.machine.firmware_boot import serve_kernel

    kernel, trap = serve_kernel(config, plan, memory, platform, inputs.kernel, inputs.initrd,
                                cmdline)
    return Entry(EntryMode.RESET, None), BootParts(kernel=kernel, entry_trap=trap)


BOOT_PATHS = {BootPath.BARE: boot_bare, BootPath.DIRECT: boot_direct,
              BootPath.FIRMWARE: boot_firmware}


# --- 7. vCPUs --------------------------------------------------------------------------------
def create_vcpus(vm: "Vm", cpuid: "CpuidTable", count: int, entry: Entry) -> "list[Vcpu]":
    """vCPU 0 entered as ``entry`` says; the others (after the irqchip) wait for SIPI."""
    from leanvm.machine.topology import vcpu_cpuid

    vcpu = vm.create_vcpu(0)
    enter(vcpu, entry, vcpu_cpuid(cpuid, 0, count))  # vCPU 0's APIC id and topology
    vcpus = [vcpu]
    if count > 1:
        from leanvm.machine.vcpus import create_aps

        vcpus += create_aps(vm, cpuid, count)
    return vcpus


def set_tsc_khz(kvm: "Kvm", vcpus: "list[Vcpu]", khz: int) -> None:
    """The guest's TSC frequency (KVM_SET_TSC_KHZ, every vCPU alike): KVM scales the TSC,
    and kvm-clock tells the guest the frequency. Refused where KVM cannot scale it."""
    from leanvm.abi.kvm import KVM_CAP_TSC_CONTROL
    from leanvm.errors import ConfigError

    if not kvm.check_extension(KVM_CAP_TSC_CONTROL):
        raise ConfigError(f"--tsc-khz {khz}: this host's KVM cannot set the guest's TSC "
                          "frequency (no KVM_CAP_TSC_CONTROL); leave it out to run at the "
                          f"host's {vcpus[0].get_tsc_khz()} kHz")
    for vcpu in vcpus:
        vcpu.set_tsc_khz(khz)


def make_fallback(config: MachineConfig, memory: MemoryManager, platform: Platform,
                  cpuid: "CpuidTable", host_finding: "Callable[[], HostFinding]"
                  ) -> "Fallback | None":
    """The emulation fallback (docs/emulation.md), where it is on. Pages KVM does not map
    as RAM go to the MMIO bus, as a plain load would; with several vCPUs the fallback runs
    under the lock every vCPU's bus accesses take (vcpus.run_vcpus)."""
    mode = config.emulation_fallback
    if mode == "off" or (mode == "auto" and not host_finding().needs_fallback):
        return None
    from leanvm.machine.fallback import Fallback
    from leanvm.machine.fallback.device_pages import memslot_backing

    return Fallback(memory.memory, cpuid.phys_addr_bits(), mmio=platform.mmio,
                    backing=memslot_backing(memory.slots))
