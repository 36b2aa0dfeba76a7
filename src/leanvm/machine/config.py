"""Machine configuration: frozen values, validated when constructed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ConfigError
from leanvm.machine.qmp.address import QmpAddress, parse_qmp_address

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}  # bare numbers: default_unit
_SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$"  # compiled on first use

DEFAULT_MEMORY = 128 * MiB
KERNEL_BOOT_MODES = ("auto", "pvh", "bzimage")
CPU_PROFILES = ("auto", "host", "emulated")  # machine/cpu_profile.py says what each hides
FALLBACK_MODES = ("auto", "on", "off")  # machine/fallback/: emulation-failure fallback
MAX_VCPUS = 64
MIN_MEMORY = 2 * MiB
MAX_MEMORY = 1 * TiB
PAGE = 4096
PA_BITS_RANGE = (32, 52)  # x86-64: 4 GiB (the firmware window) to the architecture's 52
MAX_FW_SIZE = 16 * MiB  # QEMU's pc machine allows firmware flash up to 16 MiB in all
MAX_NAME = 128  # -name: a label for people and tools


def parse_size(text: str, what: str = "size", default_unit: str = "M") -> int:
    """'512M', '4G', '1.5G', '64K', '512' (MiB, like QEMU's -m) -> bytes."""
    match = re.match(_SIZE_PATTERN, str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"bad {what} {text!r}: expected a number with an optional K, M, G or T "
                          "suffix, e.g. 512M")
    number, unit = match.groups()
    scale = _UNITS[(unit or default_unit).upper()]
    value = float(number) * scale
    if value != int(value):
        raise ConfigError(f"bad {what} {text!r}: not a whole number of bytes")
    return int(value)


def _size_text(size: int) -> str:
    for unit, scale in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size} bytes"


class MemoryOption(NamedTuple):
    """QEMU's -m: 'SIZE[,maxmem=SIZE][,slots=N]'."""

    size: int
    maxmem: int | None = None
    slots: int = 0


def parse_memory_option(text: str) -> MemoryOption:
    """'512M' or '4G,maxmem=511G,slots=4' (QEMU's -m syntax; 'size=' may name the first)."""
    size: int | None = None
    maxmem: int | None = None
    slots = 0
    for index, part in enumerate(p.strip() for p in str(text).split(",")):
        key, eq, value = part.partition("=")
        if not eq and index == 0:
            size = parse_size(part, "memory size")
        elif key == "size":
            size = parse_size(value, "memory size")
        elif key == "maxmem":
            maxmem = parse_size(value, "maxmem")
        elif key == "slots":
            if not value.isdigit():
                raise ConfigError(f"bad slots {value!r}: expected a whole number")
            slots = int(value)
        else:
            raise ConfigError(f"bad -m option {part!r}: expected SIZE[,maxmem=SIZE][,slots=N]")
    if size is None:
        raise ConfigError(f"bad -m {text!r}: no memory size given")
    if maxmem is not None and maxmem < size:
        raise ConfigError(f"bad -m {text!r}: maxmem is smaller than the memory size")
    return MemoryOption(size, maxmem, slots)


class SerialConfig(NamedTuple):
    """Where COM1 goes: 'stdio' (terminal, with input), 'file' (output to ``path``) or
    'none' (output only kept in memory, see Machine.console)."""

    mode: str = "none"
    path: Path | None = None

    def check(self, what: str) -> None:
        """A file output must be writable now: refused before anything is built."""
        if self.mode == "file":
            from leanvm.fileio import check_output_path

            assert self.path is not None
            check_output_path(self.path, f"{what} output")

    @classmethod
    def parse(cls, text: str) -> "SerialConfig":
        """'stdio', 'none' or 'file:PATH'."""
        if text.startswith("file:") and len(text) > 5:
            return cls("file", Path(text[5:]))
        if text in ("stdio", "none"):
            return cls(text)
        raise ConfigError(f"bad serial mode {text!r}: expected stdio, file:PATH or none")


class VirtioMemSpec:
    """One virtio-mem device: a region of ``size`` bytes in ``block``-byte blocks, of which the
    guest is asked to plug ``requested``. (A slotted class: see MachineConfig.)"""

    __slots__ = ("name", "size", "requested", "block")

    def __init__(self, name: str, size: int, requested: int = 0, block: int = 2 * MiB) -> None:
        if block < 2 * MiB or block & (block - 1):
            raise ConfigError(f"virtio-mem {name}: bad block size {_size_text(block)}: expected "
                              "a power of two of at least 2M")
        if size <= 0 or size % block:
            raise ConfigError(f"virtio-mem {name}: size {_size_text(size)} must be a positive "
                              f"multiple of the block size {_size_text(block)}")
        if not 0 <= requested <= size or requested % block:
            raise ConfigError(f"virtio-mem {name}: requested size {_size_text(requested)} must "
                              f"be a multiple of {_size_text(block)} from 0 to the size "
                              f"{_size_text(size)}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", name):
            raise ConfigError(f"bad virtio-mem id {name!r}: expected a letter, then up to 31 "
                              "letters, digits, '_', '.' or '-'")
        self.name, self.size, self.requested, self.block = name, size, requested, block

    def _key(self) -> tuple[str, int, int, int]:
        return (self.name, self.size, self.requested, self.block)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VirtioMemSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"VirtioMemSpec({self.name!r}, size={_size_text(self.size)}, "
                f"requested={_size_text(self.requested)}, block={_size_text(self.block)})")

    @classmethod
    def parse(cls, text: str, index: int = 0) -> "VirtioMemSpec":
        """'size=4G,requested=1G,block=2M[,id=NAME]' (the id defaults to vmemINDEX)."""
        values: dict[str, str] = {}
        for part in (p.strip() for p in str(text).split(",")):
            key, eq, value = part.partition("=")
            if not eq or key not in ("size", "requested", "block", "id") or key in values:
                raise ConfigError(f"bad --virtio-mem option {part!r}: expected size=SIZE"
                                  "[,requested=SIZE][,block=SIZE][,id=NAME]")
            values[key] = value
        if "size" not in values:
            raise ConfigError(f"bad --virtio-mem {text!r}: no size= given")
        return cls(values.get("id", f"vmem{index}"),
                   parse_size(values["size"], "virtio-mem size"),
                   parse_size(values.get("requested", "0"), "virtio-mem requested size"),
                   parse_size(values.get("block", "2M"), "virtio-mem block size"))


class MachineConfig:
    """Everything needed to build one VM, validated on construction (this is the one place
    configuration is checked); treat it as a value (``replace`` makes a changed copy).
    ``guest`` None means the bundled demo guest.

    A plain slotted class rather than a dataclass: importing dataclasses and building the
    classes cost about a third of leanvm's start-up on a slow host.
    """

    __slots__ = ("memory", "guest", "args", "serial", "hide_cpu_features", "kvm_path", "maxmem",
                 "slots", "machine", "pa_bits", "layout", "flash", "max_fw_size", "bios",
                 "debugcon", "kernel", "initrd", "cmdline", "trace", "probe_names",
                 "kernel_boot", "smp", "cpu_profile", "emulation_fallback", "zero_copy",
                 "initrd_unpack", "sample_hz", "symbols", "name", "coalesced_io", "tsc_khz",
                 "virtio_mem", "virtio_discovery", "qmp", "huge_pages")

    def __init__(self, memory: int | str = DEFAULT_MEMORY, guest: Path | str | None = None,
                 args: str = "", serial: SerialConfig | str = SerialConfig(),
                 hide_cpu_features: tuple[str, ...] = (), kvm_path: str = "/dev/kvm",
                 maxmem: int | str | None = None, slots: int = 0, machine: str = "leanvm",
                 pa_bits: int | None = None, layout: tuple[tuple[str, str], ...] = (),
                 flash: tuple = (), max_fw_size: int | str = 8 * MiB,
                 bios: Path | str | None = None, debugcon: SerialConfig | str = SerialConfig(),
                 kernel: Path | str | None = None, initrd: Path | str | None = None,
                 cmdline: str = "", trace: bool = False,
                 probe_names: tuple[tuple[int, str], ...] = (),
                 kernel_boot: str = "auto", smp: int = 1, cpu_profile: str = "auto",
                 emulation_fallback: str = "auto", zero_copy: bool = True,
                 initrd_unpack: bool = True, sample_hz: float = 0.0,
                 symbols: Path | str | None = None, name: str = "", coalesced_io: bool = True,
                 tsc_khz: int | None = None, virtio_mem: "tuple[VirtioMemSpec | str, ...]" = (),
                 virtio_discovery: str = "acpi", qmp: "str | QmpAddress | None" = None,
                 huge_pages: bool = False) -> None:
        self.memory, self.maxmem, self.slots = _memory(memory, maxmem, slots)  # bytes, bytes|None, n
        self.machine: str = machine  # a memory-map version: leanvm, leanvm-1, ...
        self.pa_bits: int | None = _pa_bits(pa_bits)  # None: from the vCPU's CPUID
        self.layout: tuple[tuple[str, str], ...] = tuple(layout)  # memory-map switches
        self.guest: Path | None = _path(guest)  # a bare guest program
        self.args: str = args  # its argument string
        self.serial: SerialConfig = _console(serial, "serial")  # COM1
        self.debugcon: SerialConfig = _console(debugcon, "debug console")  # port 0x402
        self.kvm_path: str = kvm_path
        self.hide_cpu_features: tuple[str, ...] = tuple(hide_cpu_features)
        self.flash: tuple = tuple(flash)  # machine.flash.FlashSpec values, any order
        self.max_fw_size: int = _max_fw_size(max_fw_size)
        self.bios: Path | None = _path(bios)  # firmware for flash bank 0
        self.kernel: Path | None = _path(kernel)  # a bzImage or ELF vmlinux
        self.initrd, self.cmdline = _path(initrd), cmdline  # Path | None, str
        # direct boot: "pvh" (ELF, or a bzImage decompressed on the host), "bzimage" (64-bit
        # boot protocol, the guest decompresses), "auto" (pvh when possible)
        self.kernel_boot: str = _choice(kernel_boot, KERNEL_BOOT_MODES, "kernel boot mode")
        # direct boot: map kernel and initrd pages copy-on-write from their files instead
        # of copying them; decompress a compressed initramfs on the host
        self.zero_copy, self.initrd_unpack = bool(zero_copy), bool(initrd_unpack)
        self.smp: int = _vcpus(smp)  # vCPUs, one host thread each
        # "host": what KVM offers; "emulated": hides what a host that emulates supervisor
        # code cannot run; "auto": "emulated" on such hosts, else "host"
        self.cpu_profile: str = _choice(cpu_profile, CPU_PROFILES, "CPU profile")
        # run instructions the host's KVM cannot emulate in a user-mode emulator
        # (machine/fallback/): "auto" = on hosts that need it
        self.emulation_fallback: str = _choice(emulation_fallback, FALLBACK_MODES,
                                               "emulation fallback")
        self.trace: bool = trace  # record the boot timeline (Machine.tracer)
        self.probe_names: tuple[tuple[int, str], ...] = tuple(probe_names)  # probe id -> name
        # sample every vCPU's RIP this many times a second (machine/sampler.py); 0: off
        self.sample_hz: float = _sample_hz(sample_hz)
        self.symbols: Path | None = _path(symbols)  # System.map or ELF; None: looked for
        self.name: str = _name(name)  # -name: shown in the summary and the stats
        # let KVM queue the console's writes where it can (platform.py COALESCED_PORTS)
        self.coalesced_io: bool = bool(coalesced_io)
        self.tsc_khz: int | None = _tsc_khz(tsc_khz)  # None: the host's TSC frequency
        # virtio-mem devices; how Linux finds virtio-mmio devices (machine/virtio.py)
        self.virtio_mem, self.virtio_discovery = _virtio(virtio_mem, virtio_discovery)
        self.qmp: "QmpAddress | None" = None if qmp is None else parse_qmp_address(qmp)  # -qmp
        self.huge_pages: bool = bool(huge_pages)  # RAM advised MADV_HUGEPAGE (memory/host.py)
        _check_combination(self)

    @property
    def firmware(self) -> bool:
        """Whether the VM boots firmware from flash (--bios, or a code bank without --guest)."""
        return self.bios is not None or (
            self.guest is None and any(spec.role == "code" for spec in self.flash))

    @property
    def flash_banks(self) -> tuple:
        """The flash banks to build: --bios is bank 0 (read-only), then the flash specs."""
        if self.bios is None:
            return self.flash
        from leanvm.machine.flash import FlashSpec

        return (FlashSpec("code", self.bios, "readonly"), *self.flash)

    def _items(self) -> tuple[tuple[str, object], ...]:
        return tuple((name, getattr(self, name)) for name in self.__slots__)

    def replace(self, **changes: object) -> "MachineConfig":
        return MachineConfig(**{**dict(self._items()), **changes})  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return "MachineConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MachineConfig) and self._items() == other._items()

    def __hash__(self) -> int:
        return hash(self._items())


# --- validators: each checks one setting and gives the one-line error ----------------------
def _memory(memory: int | str, maxmem: int | str | None, slots: int
            ) -> tuple[int, int | None, int]:
    given = memory
    if isinstance(memory, str):
        option = parse_memory_option(memory)
        memory = option.size
        maxmem = option.maxmem if maxmem is None else maxmem
        slots = option.slots or slots
    if isinstance(maxmem, str):
        maxmem = parse_size(maxmem, "maxmem")
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise ConfigError(f"bad memory size {memory!r}: expected bytes or a size such as 512M")
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        shown = f"{given.split(',')[0]!r}" if isinstance(given, str) else _size_text(memory)
        raise ConfigError(f"memory size {shown} is out of range: expected 2M to 1T")
    if memory % PAGE:
        raise ConfigError(f"memory size {memory} bytes is not a multiple of 4K")
    return memory, maxmem, slots


def _pa_bits(pa_bits: int | None) -> int | None:
    if pa_bits is not None and (isinstance(pa_bits, bool) or not isinstance(pa_bits, int)
                                or not PA_BITS_RANGE[0] <= pa_bits <= PA_BITS_RANGE[1]):
        raise ConfigError(f"bad physical address bits {pa_bits!r}: expected "
                          f"{PA_BITS_RANGE[0]} to {PA_BITS_RANGE[1]}")
    return pa_bits


def _path(value: Path | str | None) -> Path | None:
    return Path(value) if value is not None else None


def _console(value: SerialConfig | str, what: str) -> SerialConfig:
    console = SerialConfig.parse(value) if isinstance(value, str) else value
    console.check(what)
    return console


def _max_fw_size(value: int | str) -> int:
    size = parse_size(value, "max-fw-size", "B") if isinstance(value, str) else value
    if not PAGE <= size <= MAX_FW_SIZE or size % PAGE:
        raise ConfigError(f"bad max-fw-size {value!r}: expected a multiple of 4K from 4K "
                          "to 16M")
    return size


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"bad {what} {value!r}: expected " + ", ".join(choices))
    return value


def _vcpus(smp: int) -> int:
    if not isinstance(smp, int) or not 1 <= smp <= MAX_VCPUS:
        raise ConfigError(f"bad vCPU count {smp!r}: expected 1 to {MAX_VCPUS}")
    return smp


def _sample_hz(hz: float) -> float:
    if not isinstance(hz, (int, float)) or not 0 <= hz <= 1000:
        raise ConfigError(f"bad sampling rate {hz!r}: expected 0 (off) to 1000 Hz")
    return float(hz)


def _tsc_khz(khz: int | None) -> int | None:
    if khz is not None and (isinstance(khz, bool) or not isinstance(khz, int)
                            or not 1000 <= khz <= 100_000_000):
        raise ConfigError(f"bad TSC frequency {khz!r}: expected kHz from 1000 (1 MHz) to "
                          "100000000 (100 GHz)")
    return khz


def _virtio(specs: "tuple[VirtioMemSpec | str, ...]", discovery: str
            ) -> tuple[tuple[VirtioMemSpec, ...], str]:
    """The virtio-mem specs (text is parsed), names unique; discovery "acpi" (DSDT entries)
    or "cmdline" (virtio_mmio.device= parameters)."""
    _choice(discovery, ("acpi", "cmdline"), "virtio discovery")
    out = tuple(VirtioMemSpec.parse(s, i) if isinstance(s, str) else s
                for i, s in enumerate(specs))
    names = [spec.name for spec in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two virtio-mem devices are called {name!r}: give each its "
                              "own id=")
    return out, discovery


def _name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
        raise ConfigError(f"bad VM name {name!r}: expected printable text of at most "
                          f"{MAX_NAME} characters")
    return name


def _check_combination(config: MachineConfig) -> None:
    """Settings that contradict each other."""
    import os

    if config.bios is not None and config.guest is not None:
        raise ConfigError("give either --bios (firmware boot) or --guest (bare guest)")
    if config.bios is not None and any(spec.role == "code" for spec in config.flash):
        raise ConfigError("give either --bios or a code flash bank, not both")
    if config.kernel is not None and config.guest is not None:
        raise ConfigError("give either -kernel (Linux) or --guest (bare guest)")
    if config.kernel is None and (config.initrd is not None or config.cmdline):
        raise ConfigError("-initrd and -append need -kernel")
    if config.firmware and config.kernel_boot != "auto":
        raise ConfigError(f"--kernel-boot {config.kernel_boot} chooses how leanvm enters a "
                          "kernel without firmware; with firmware (--bios or a code flash) "
                          "the firmware loads the kernel: leave it out")
    if config.virtio_discovery == "cmdline" and config.kernel is None:
        raise ConfigError("--virtio-discovery cmdline adds to the kernel command line: give "
                          "-kernel")
    if config.symbols is not None and not os.access(config.symbols, os.R_OK):
        raise ConfigError(f"{config.symbols}: cannot read the symbols file")
    if config.symbols is not None and not config.sample_hz:
        raise ConfigError("--symbols names sampled addresses: give --sample-rip HZ too")
