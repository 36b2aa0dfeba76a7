"""Machine configuration: frozen values, validated when constructed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}  # bare numbers: default_unit
_SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$"  # compiled on first use

DEFAULT_MEMORY = 128 * MiB
KERNEL_BOOT_MODES = ("auto", "pvh", "bzimage")
CPU_PROFILES = ("auto", "host", "emulated")  # machine/cpu_profile.py says what each hides
FALLBACK_MODES = ("auto", "on", "off")  # machine/fallback.py: emulation-failure fallback
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


class MachineConfig:
    """Everything needed to build one VM, validated on construction; treat it as a value
    (``replace`` makes a changed copy). ``guest`` None means the bundled demo guest.

    A plain slotted class rather than a dataclass: importing dataclasses and building the
    classes cost about a third of leanvm's start-up on a slow host.
    """

    __slots__ = ("memory", "guest", "args", "serial", "hide_cpu_features", "kvm_path", "maxmem",
                 "slots", "machine", "pa_bits", "layout", "flash", "max_fw_size", "bios",
                 "debugcon", "kernel", "initrd", "cmdline", "trace", "probe_names",
                 "kernel_boot", "smp", "cpu_profile", "emulation_fallback", "zero_copy", "initrd_unpack",
                 "sample_hz", "symbols", "name")

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
                 symbols: Path | str | None = None, name: str = "") -> None:
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
        self.memory: int = memory
        self.guest: Path | None = Path(guest) if guest is not None else None
        self.args: str = args
        self.serial: SerialConfig = SerialConfig.parse(serial) if isinstance(serial, str) else serial
        self.serial.check("serial")
        self.hide_cpu_features: tuple[str, ...] = tuple(hide_cpu_features)
        self.kvm_path: str = kvm_path
        self.maxmem: int | None = maxmem  # None: no memory beyond RAM
        self.slots: int = slots
        self.machine: str = machine  # a memory-map version: leanvm, leanvm-1, ...
        if pa_bits is not None and (isinstance(pa_bits, bool) or not isinstance(pa_bits, int)
                                    or not PA_BITS_RANGE[0] <= pa_bits <= PA_BITS_RANGE[1]):
            raise ConfigError(f"bad physical address bits {pa_bits!r}: expected "
                              f"{PA_BITS_RANGE[0]} to {PA_BITS_RANGE[1]}")
        self.pa_bits: int | None = pa_bits  # None: from the vCPU's CPUID
        self.layout: tuple[tuple[str, str], ...] = tuple(layout)  # memory-map switches
        self.flash: tuple = tuple(flash)  # machine.flash.FlashSpec values, any order
        self.max_fw_size: int = (parse_size(max_fw_size, "max-fw-size", "B")
                                 if isinstance(max_fw_size, str) else max_fw_size)
        if not PAGE <= self.max_fw_size <= MAX_FW_SIZE or self.max_fw_size % PAGE:
            raise ConfigError(f"bad max-fw-size {max_fw_size!r}: expected a multiple of 4K "
                              "from 4K to 16M")
        self.bios: Path | None = Path(bios) if bios is not None else None  # firmware in flash
        self.debugcon: SerialConfig = (SerialConfig.parse(debugcon) if isinstance(debugcon, str)
                                       else debugcon)  # where port 0x402 output goes
        self.debugcon.check("debug console")
        self.kernel: Path | None = Path(kernel) if kernel is not None else None  # a bzImage
        self.initrd: Path | None = Path(initrd) if initrd is not None else None
        self.cmdline: str = cmdline
        self.trace: bool = trace  # record the boot timeline (Machine.tracer)
        self.probe_names: tuple[tuple[int, str], ...] = tuple(probe_names)  # probe id -> name
        if kernel_boot not in KERNEL_BOOT_MODES:
            raise ConfigError(f"bad kernel boot mode {kernel_boot!r}: expected "
                              + ", ".join(KERNEL_BOOT_MODES))
        # direct boot: "pvh" (ELF, or a bzImage decompressed on the host), "bzimage" (64-bit
        # boot protocol, the guest decompresses), "auto" (pvh when possible)
        self.kernel_boot: str = kernel_boot
        if not isinstance(smp, int) or not 1 <= smp <= MAX_VCPUS:
            raise ConfigError(f"bad vCPU count {smp!r}: expected 1 to {MAX_VCPUS}")
        self.smp: int = smp  # vCPUs, one host thread each
        if cpu_profile not in CPU_PROFILES:
            raise ConfigError(f"bad CPU profile {cpu_profile!r}: expected "
                              + ", ".join(CPU_PROFILES))
        # "host": what KVM offers; "emulated": hides what a host that emulates supervisor
        # code cannot run; "auto": "emulated" on such hosts, else "host"
        self.cpu_profile: str = cpu_profile
        if emulation_fallback not in FALLBACK_MODES:
            raise ConfigError(f"bad emulation fallback {emulation_fallback!r}: expected "
                              + ", ".join(FALLBACK_MODES))
        # run instructions the host's KVM cannot emulate in a user-mode emulator: "auto" = on
        # hosts that need it
        self.emulation_fallback: str = emulation_fallback
        # direct boot: map kernel and initrd pages copy-on-write from their files (shared
        # page cache) instead of copying them into guest RAM
        self.zero_copy: bool = bool(zero_copy)
        # direct boot: a compressed initramfs is decompressed on the host (cached) so the
        # guest only copies files out of it
        self.initrd_unpack: bool = bool(initrd_unpack)
        if not isinstance(sample_hz, (int, float)) or not 0 <= sample_hz <= 1000:
            raise ConfigError(f"bad sampling rate {sample_hz!r}: expected 0 (off) to 1000 Hz")
        # sample vCPU 0's RIP this many times a second (machine/sampler.py); 0: off
        self.sample_hz: float = float(sample_hz)
        # where the guest kernel's symbols are (System.map or ELF); None: looked for
        self.symbols: Path | None = Path(symbols) if symbols is not None else None
        if self.bios is not None and self.guest is not None:
            raise ConfigError("give either --bios (firmware boot) or --guest (bare guest)")
        if self.kernel is not None and self.guest is not None:
            raise ConfigError("give either -kernel (Linux) or --guest (bare guest)")
        if self.kernel is None and (self.initrd is not None or cmdline):
            raise ConfigError("-initrd and -append need -kernel")
        firmware = self.bios is not None or any(spec.role == "code" for spec in self.flash)
        if firmware and kernel_boot != "auto":
            raise ConfigError(f"--kernel-boot {kernel_boot} chooses how leanvm enters a kernel "
                              "without firmware; with firmware (--bios or a code flash) the "
                              "firmware loads the kernel: leave it out")
        if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
            raise ConfigError(f"bad VM name {name!r}: expected printable text of at most "
                              f"{MAX_NAME} characters")
        self.name: str = name  # -name: shown in the summary and the stats

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
