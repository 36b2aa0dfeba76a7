"""Firmware flash banks: configuration, the images' sizes for the planner (layout/flash.py
places the banks), memslots that follow the device's read-array mode, and block-by-block
persistence of writable stores (firmware/journal.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from leanvm.devices.pflash import GEOMETRIES, CfiFlash, FlashGeometry
from leanvm.errors import ConfigError
from leanvm.firmware import journal
from leanvm.firmware.image import data_extents
from leanvm.layout.flash import ROLES, BankRequest, PlacedBank
from leanvm.memory.guest import GuestRegion, RegionKind
from leanvm.memory.host import map_flash_bank

if TYPE_CHECKING:
    from collections.abc import Callable

    from leanvm.devices.bus import Bus
    from leanvm.machine.memory_manager import MemoryManager

MODES = ("readonly", "persistent", "ephemeral")
PERSIST_GRANULE = 4096  # persistent stores are written back in 4 KiB blocks


class FlashSpec(NamedTuple):
    role: str  # "code" (bank 0) or "vars" (bank 1)
    path: Path
    mode: str = "readonly"
    geometry: str = "pc"
    size: int | None = None  # bank size; default: the image size (pc) or 64 MiB (virt)


def parse_flash_option(text: str) -> FlashSpec:
    """'code=FILE' or 'vars=FILE,mode=persistent,geometry=virt,size=1M'."""
    from leanvm.machine.config import parse_size

    first, *rest = text.split(",")
    role, eq, path = first.partition("=")
    if not eq or role not in ROLES or not path:
        raise ConfigError(f"bad --flash {text!r}: expected code=FILE or vars=FILE[,mode=...]")
    options = _options(rest, f"--flash {text!r}")
    mode = options.pop("mode", "readonly" if role == "code" else "persistent")
    geometry = options.pop("geometry", "pc")
    size = parse_size(options.pop("size"), "flash size", "B") if "size" in options else None
    if options:
        raise ConfigError(f"bad --flash option {next(iter(options))!r}: expected mode, geometry "
                          "or size")
    return _checked(FlashSpec(role, Path(path), mode, geometry, size))


def parse_drive_option(text: str, unit: int) -> FlashSpec:
    """QEMU's '-drive if=pflash,format=raw,file=F[,readonly=on][,unit=N]'."""
    options = _options(text.split(","), f"-drive {text!r}")
    if options.pop("if", None) != "pflash":
        raise ConfigError(f"bad -drive {text!r}: only if=pflash is supported")
    if options.pop("format", "raw") != "raw":
        raise ConfigError(f"bad -drive {text!r}: only format=raw is supported")
    path = options.pop("file", None)
    if not path:
        raise ConfigError(f"bad -drive {text!r}: file= is required")
    from leanvm.layout.region import parse_switch

    unit_text = options.pop("unit", str(unit))
    if not unit_text.isdigit():
        raise ConfigError(f"bad -drive {text!r}: unit={unit_text!r} is not a number (0 or 1)")
    unit = int(unit_text)
    readonly = parse_switch("-drive readonly", options.pop("readonly", "off"))
    if options:
        raise ConfigError(f"bad -drive option {next(iter(options))!r} in {text!r}")
    if unit not in (0, 1):
        raise ConfigError(f"bad -drive {text!r}: pflash unit must be 0 or 1")
    return _checked(FlashSpec(ROLES[unit], Path(path), "readonly" if readonly else "persistent"))


def _options(items: list[str], what: str) -> dict[str, str]:
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"bad {what}: {item!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def _checked(spec: FlashSpec) -> FlashSpec:
    if spec.mode not in MODES:
        raise ConfigError(f"bad flash mode {spec.mode!r} for {spec.path}: expected "
                          f"{', '.join(MODES)}")
    if spec.geometry not in GEOMETRIES:
        raise ConfigError(f"bad flash geometry {spec.geometry!r}: expected pc or virt")
    return spec


class FlashBank:
    """One bank: its guest region, device model and (for persistent stores) write-back."""

    def __init__(self, spec: FlashSpec, index: int, base: int, size: int, image_size: int,
                 geometry: FlashGeometry, memslots: "MemoryManager | None" = None,
                 on_romd: "Callable[[bool], None] | None" = None) -> None:
        self.spec = spec
        self.index = index
        self.base = base
        self.size = size
        self.image_size = image_size
        self.geometry = geometry
        self.name = f"flash{index}"
        writable = spec.mode != "readonly"
        fd = _open_image(spec.path, os.O_RDONLY, "read the flash image")
        self._fd: int | None = None
        try:
            if spec.mode == "persistent":  # decided now, not at the guest's first write
                self._fd = _open_store(spec.path)
                journal.recover(spec.path)  # finish or drop a write group a crash interrupted
            extents = [(e.offset, e.length) for e in data_extents(fd, image_size)]
            mapping = map_flash_bank(size, str(spec.path), image_size, writable=writable,
                                     data_extents=extents)
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
            raise
        finally:
            os.close(fd)
        self.region = GuestRegion(self.name, base, mapping, RegionKind.ROM, readonly=True)
        self.dirty: set[int] = set()
        self.flushes = 0
        self.device = CfiFlash(self.region.view, geometry, image_size=image_size,
                               writable=writable, on_romd=self._on_romd, on_write=self._on_write)
        self.memslots = memslots  # unmaps the bank while the device is in a command mode
        self.on_romd = on_romd  # told of every read-array change too (bank 0: the BIOS area)

    def _on_write(self, offset: int, length: int) -> None:
        if self._fd is not None:
            first = offset // PERSIST_GRANULE
            self.dirty.update(range(first, (offset + length - 1) // PERSIST_GRANULE + 1))

    def _on_romd(self, on: bool) -> None:
        if self.memslots is not None:
            self.memslots.set_present(self.name, on)
        if self.on_romd is not None:
            self.on_romd(on)
        if on:
            self.flush()  # a write sequence ended: persist what it changed

    def flush(self) -> None:
        """Write modified blocks of a persistent store back to its file, crash-safely."""
        if self._fd is None or not self.dirty:
            return
        view = self.region.view
        blocks = {page * PERSIST_GRANULE: bytes(view[page * PERSIST_GRANULE:
                                                     (page + 1) * PERSIST_GRANULE])
                  for page in sorted(self.dirty)}
        journal.commit(self.spec.path, blocks, self._fd)
        self.dirty.clear()
        self.flushes += 1

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_image(path: Path, flags: int, what: str) -> int:
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot {what} ({exc.strerror})") from None


def _open_store(path: Path) -> int:
    """A write fd for a persistent store, once it is certain that writes can be kept: the
    file is writable and so is its directory (the journal lives beside it)."""
    fd = _open_image(path, os.O_WRONLY, "write the variable store (use mode=ephemeral to "
                     "run without keeping changes)")
    directory = path.parent if str(path.parent) else Path(".")
    if not os.access(directory, os.W_OK | os.X_OK):
        os.close(fd)
        raise ConfigError(f"{path}: cannot keep changes: its directory {directory} is not "
                          "writable (the write journal goes there; use mode=ephemeral to "
                          "run without keeping changes)")
    return fd


def bank_requests(specs: tuple[FlashSpec, ...]) -> tuple[BankRequest, ...]:
    """What the planner needs of each image (its size), read from the files now: errors name
    the file."""
    requests = []
    for spec in specs:
        try:
            info = os.stat(spec.path)
        except FileNotFoundError:
            raise ConfigError(f"{spec.path}: no such flash image") from None
        except OSError as exc:
            raise ConfigError(f"{spec.path}: cannot read ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{spec.path}: not a regular file (expected a flash image)")
        geometry = GEOMETRIES[spec.geometry]
        requests.append(BankRequest(spec.role, str(spec.path), info.st_size, spec.size,
                                    spec.geometry, geometry.sector_size))
    return tuple(requests)


def build_banks(specs: tuple[FlashSpec, ...], placed: "tuple[PlacedBank, ...]",
                memory: "MemoryManager", mmio: "Bus",
                bank0_listeners: "Callable[[bool], None] | None" = None) -> list[FlashBank]:
    """The banks the plan placed, in guest memory and on the MMIO bus (bank 0 also tells
    ``bank0_listeners`` of its read-array changes)."""
    by_role = {spec.role: spec for spec in specs}
    banks: list[FlashBank] = []
    try:
        for bank in placed:
            spec = by_role[bank.request.role]
            built = FlashBank(spec, bank.index, bank.base, bank.size, bank.request.image_size,
                              GEOMETRIES[spec.geometry], memory,
                              bank0_listeners if bank.index == 0 else None)
            banks.append(built)
            memory.add(built.region)
            mmio.register(bank.base, bank.size, built.device, built.name)
    except BaseException:
        for built in banks:
            built.close()
        raise
    return banks
