"""Machine configuration: frozen values, validated when constructed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from leanvm.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": MiB, "K": KiB, "M": MiB, "G": GiB, "T": TiB}  # bare numbers are MiB, as in QEMU
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

DEFAULT_MEMORY = 128 * MiB
MIN_MEMORY = 2 * MiB
MAX_MEMORY = 1 * TiB
PAGE = 4096


def parse_size(text: str, what: str = "size", default_unit: str = "M") -> int:
    """'512M', '4G', '1.5G', '64K', '512' (MiB, like QEMU's -m) -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"bad {what} {text!r}: expected a number with an optional K, M, G or T "
                          "suffix, e.g. 512M")
    number, unit = match.groups()
    scale = _UNITS[unit.upper()] if unit else _UNITS[default_unit]
    value = float(number) * scale
    if value != int(value):
        raise ConfigError(f"bad {what} {text!r}: not a whole number of bytes")
    return int(value)


@dataclass(frozen=True, slots=True)
class SerialConfig:
    """Where COM1 goes: 'stdio' (terminal, with input), 'file' (output to ``path``) or
    'none' (output only kept in memory, see Machine.console)."""

    mode: str = "none"
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("stdio", "file", "none"):
            raise ConfigError(f"bad serial mode {self.mode!r}: expected stdio, file:PATH or none")
        if self.mode == "file" and self.path is None:
            raise ConfigError("serial mode 'file' needs a path: file:PATH")

    @classmethod
    def parse(cls, text: str) -> "SerialConfig":
        if text.startswith("file:"):
            return cls("file", Path(text[5:]))
        return cls(text)


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """Everything needed to build one VM. ``guest`` None means the bundled demo guest."""

    memory: int = DEFAULT_MEMORY
    guest: Path | None = None
    args: str = ""
    serial: SerialConfig = field(default_factory=SerialConfig)
    hide_cpu_features: tuple[str, ...] = ()
    kvm_path: str = "/dev/kvm"

    def __post_init__(self) -> None:
        if isinstance(self.memory, str):
            object.__setattr__(self, "memory", parse_size(self.memory, "memory size"))
        if isinstance(self.guest, str):
            object.__setattr__(self, "guest", Path(self.guest))
        if isinstance(self.serial, str):
            object.__setattr__(self, "serial", SerialConfig.parse(self.serial))
        if not isinstance(self.memory, int) or self.memory % PAGE:
            raise ConfigError(f"memory size {self.memory} must be a multiple of 4K")
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise ConfigError(f"memory size {self.memory >> 20}M is out of range: expected 2M to 1T")
