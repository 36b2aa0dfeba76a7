"""Firmware flash banks: configuration, placement, memslots that follow the device's
read-array mode, and block-by-block persistence of writable stores.

x86 pc placement (as QEMU's pc machine): banks are mapped downward from 4 GiB with no
gaps, bank 0 (code) on top; their combined size is limited (max-fw-size, 8 MiB by default,
16 MiB at most); the last 128 KiB of bank 0 also appears at 0xE0000-0xFFFFF. Banks in the
arm virt geometry (64 MiB, 256 KiB sectors, width 4) go to the flash-large window at
0xC000_0000, bank 0 first, so padded AAVMF images can be used and measured.
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
from leanvm.layout.region import MemoryMap
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_flash_bank

if TYPE_CHECKING:
    from leanvm.devices.bus import Bus
    from leanvm.machine.builder import Memslots
    from leanvm.machine.legacy import BiosArea

MiB = 1 << 20
MODES = ("readonly", "persistent", "ephemeral")
ROLES = ("code", "vars")
DEFAULT_MAX_FW_SIZE = 8 * MiB
MAX_FW_SIZE_LIMIT = 16 * MiB
VIRT_BANK_SIZE = 64 * MiB
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
                 geometry: FlashGeometry) -> None:
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
        self.memslots: Memslots | None = None
        self.romd_listeners: list = []  # called with the new mode (the BIOS area, bank 0)

    def _on_write(self, offset: int, length: int) -> None:
        if self._fd is not None:
            first = offset // PERSIST_GRANULE
            self.dirty.update(range(first, (offset + length - 1) // PERSIST_GRANULE + 1))

    def _on_romd(self, on: bool) -> None:
        if self.memslots is not None:
            self.memslots.set_present(self.name, on)
        for listener in self.romd_listeners:
            listener(on)
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


def plan_flash(specs: tuple[FlashSpec, ...], plan: MemoryMap,
               max_fw_size: int = DEFAULT_MAX_FW_SIZE) -> list[tuple[FlashSpec, int, int, int]]:
    """(spec, base, bank size, image size) per bank, bank 0 first; errors name the file."""
    roles = [s.role for s in specs]
    if len(set(roles)) != len(roles):
        raise ConfigError("each flash role (code, vars) may be given once")
    if "vars" in roles and "code" not in roles:
        raise ConfigError("a vars flash needs a code flash (bank 0) as well")
    ordered = sorted(specs, key=lambda s: ROLES.index(s.role))
    geometries = {s.geometry for s in ordered}
    if len(geometries) > 1:
        raise ConfigError("all flash banks must share one geometry (pc or virt)")
    if max_fw_size > MAX_FW_SIZE_LIMIT or max_fw_size <= 0:
        raise ConfigError(f"max-fw-size {max_fw_size} is out of range: at most 16M")
    placed = []
    for spec in ordered:
        geometry = GEOMETRIES[spec.geometry]
        try:
            info = os.stat(spec.path)
        except FileNotFoundError:
            raise ConfigError(f"{spec.path}: no such flash image") from None
        except OSError as exc:
            raise ConfigError(f"{spec.path}: cannot read ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{spec.path}: not a regular file (expected a flash image)")
        image_size = info.st_size
        if image_size == 0 or image_size % geometry.sector_size:
            raise ConfigError(f"{spec.path}: size {image_size} is not a non-zero multiple of the "
                              f"{geometry.sector_size}-byte flash sector")
        default = VIRT_BANK_SIZE if spec.geometry == "virt" else image_size
        bank_size = spec.size or default
        if bank_size % geometry.sector_size:
            raise ConfigError(f"{spec.path}: bank size {bank_size} is not a multiple of the "
                              f"{geometry.sector_size}-byte sector")
        if image_size > bank_size:
            raise ConfigError(f"{spec.path}: image ({image_size} bytes) is larger than its "
                              f"bank ({bank_size} bytes)")
        placed.append([spec, 0, bank_size, image_size])
    if not placed:
        return []
    if ordered[0].geometry == "virt":
        window = plan.get("flash-large")
        base = window.base
        for item in placed:
            item[1] = base
            base += item[2]
        if base > window.end:
            raise ConfigError(f"flash banks need {base - window.base} bytes; the flash-large "
                              f"window holds {window.size}")
    else:
        total = sum(item[2] for item in placed)
        if total > max_fw_size:
            raise ConfigError(f"combined size of system firmware exceeds {max_fw_size} bytes "
                              f"({', '.join(str(s.path) for s in ordered)}: {total} bytes)")
        top = plan.get("firmware").end
        for item in placed:
            top -= item[2]
            item[1] = top
    window_name = "flash-large" if ordered[0].geometry == "virt" else "firmware"
    if not plan.get(window_name).enabled:
        raise ConfigError(f"flash needs the {window_name} region, which is switched off")
    return [tuple(item) for item in placed]  # type: ignore[misc]


def build_flash(specs: tuple[FlashSpec, ...], plan: MemoryMap, memory: GuestMemory,
                memslots: "Memslots", mmio: "Bus", max_fw_size: int
                ) -> tuple[list[FlashBank], "BiosArea | None"]:
    """The banks, and for a pc bank 0 the BIOS area (0xC0000-0xFFFFF) it shows through."""
    banks: list[FlashBank] = []
    try:
        for index, (spec, base, size, image_size) in enumerate(plan_flash(specs, plan, max_fw_size)):
            bank = FlashBank(spec, index, base, size, image_size, GEOMETRIES[spec.geometry])
            banks.append(bank)
            memory.add(bank.region)
            memslots.add(bank.region)
            bank.memslots = memslots
            mmio.register(base, size, bank.device, bank.name)
        area = None
        if banks and banks[0].geometry.name == "pc":
            from leanvm.machine.legacy import WINDOW_BASE, WINDOW_END, BiosArea

            area = BiosArea(memslots, memory.find(WINDOW_BASE, WINDOW_END - WINDOW_BASE), banks[0])
            banks[0].romd_listeners.append(lambda on: area.refresh())
            mmio.register(WINDOW_BASE, WINDOW_END - WINDOW_BASE, area, "bios-area")
    except BaseException:
        for bank in banks:
            bank.close()
        raise
    return banks, area
