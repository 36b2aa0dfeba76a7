"""Where firmware flash banks go in leanvm's x86 machine: pure placement, no files read.

pc geometry (as QEMU's pc machine): banks are mapped downward from 4 GiB with no gaps, bank
0 (code) on top, inside the "firmware" window; their combined size is limited (max-fw-size,
8 MiB by default, 16 MiB at most). virt geometry (64 MiB banks, as QEMU's arm virt machine):
banks go upward from the start of the "flash-large" window, bank 0 first, so padded AAVMF
images can be used and measured. See docs/flash.md and docs/facts.md#x86-firmware-flash-and-cfi01.
"""

from __future__ import annotations

from typing import NamedTuple

from leanvm.errors import ConfigError
from leanvm.layout.region import MemoryMap, MiB, Region, RegionRole

ROLES = ("code", "vars")  # bank 0, bank 1
DEFAULT_MAX_FW_SIZE = 8 * MiB
MAX_FW_SIZE_LIMIT = 16 * MiB
VIRT_BANK_SIZE = 64 * MiB
WINDOWS = {"pc": "firmware", "virt": "flash-large"}


class BankRequest(NamedTuple):
    """One bank to place: what the image is and how the bank should look."""

    role: str  # "code" or "vars"
    path: str  # for messages
    image_size: int
    bank_size: int | None  # None: the image size (pc) or 64 MiB (virt)
    geometry: str  # "pc" or "virt"
    sector_size: int


class PlacedBank(NamedTuple):
    index: int
    base: int
    size: int
    request: BankRequest

    @property
    def region(self) -> Region:
        return Region(f"flash{self.index}", self.base, self.size, role=RegionRole.FLASH,
                      reason=self.request.role)


def _sized(request: BankRequest) -> int:
    sector = request.sector_size
    if request.image_size == 0 or request.image_size % sector:
        raise ConfigError(f"{request.path}: size {request.image_size} is not a non-zero "
                          f"multiple of the {sector}-byte flash sector")
    default = VIRT_BANK_SIZE if request.geometry == "virt" else request.image_size
    size = request.bank_size or default
    if size % sector:
        raise ConfigError(f"{request.path}: bank size {size} is not a multiple of the "
                          f"{sector}-byte sector")
    if request.image_size > size:
        raise ConfigError(f"{request.path}: image ({request.image_size} bytes) is larger than "
                          f"its bank ({size} bytes)")
    return size


def place_flash(requests: tuple[BankRequest, ...], plan: MemoryMap,
                max_fw_size: int = DEFAULT_MAX_FW_SIZE) -> tuple[PlacedBank, ...]:
    """The banks, bank 0 first; errors name the file at fault."""
    roles = [r.role for r in requests]
    if len(set(roles)) != len(roles):
        raise ConfigError("each flash role (code, vars) may be given once")
    if "vars" in roles and "code" not in roles:
        raise ConfigError("a vars flash needs a code flash (bank 0) as well")
    if len({r.geometry for r in requests}) > 1:
        raise ConfigError("all flash banks must share one geometry (pc or virt)")
    if not 0 < max_fw_size <= MAX_FW_SIZE_LIMIT:
        raise ConfigError(f"max-fw-size {max_fw_size} is out of range: at most 16M")
    ordered = sorted(requests, key=lambda r: ROLES.index(r.role))
    if not ordered:
        return ()
    sizes = [_sized(r) for r in ordered]
    geometry = ordered[0].geometry
    window = plan.get(WINDOWS[geometry])
    if not window.enabled:
        raise ConfigError(f"flash needs the {window.name} region, which is switched off")
    placed = []
    if geometry == "virt":
        base = window.base
        for index, (request, size) in enumerate(zip(ordered, sizes)):
            placed.append(PlacedBank(index, base, size, request))
            base += size
        if base > window.end:
            raise ConfigError(f"flash banks need {base - window.base} bytes; the flash-large "
                              f"window holds {window.size}")
        return tuple(placed)
    total = sum(sizes)
    if total > max_fw_size:
        raise ConfigError(f"combined size of system firmware exceeds {max_fw_size} bytes "
                          f"({', '.join(r.path for r in ordered)}: {total} bytes)")
    top = window.end
    for index, (request, size) in enumerate(zip(ordered, sizes)):
        top -= size
        placed.append(PlacedBank(index, top, size, request))
    return tuple(placed)
