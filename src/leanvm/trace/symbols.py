"""Kernel symbols for guest addresses: System.map files and ELF symbol tables.

Used by the RIP sampler (machine/sampler.py) to say which function a guest was in. Only
text symbols count. A kernel whose text moved (KASLR in a bzImage boot) needs ``nokaslr``;
PVH boots skip the decompressor that would move it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

from leanvm.errors import ConfigError

DEBUG_DIRS = (Path("/boot"), Path("/usr/lib/debug/boot"))  # where Debian keeps them
_MAP_LINE = re.compile(rb"^([0-9a-fA-F]{8,16}) ([tTwW]) (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Symbols:
    addresses: tuple[int, ...]  # sorted starts of text symbols
    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.addresses)

    def function(self, address: int) -> str | None:
        """The text symbol at or below ``address`` (None below the first one, or more than
        1 MiB past the last, which is not kernel text)."""
        index = bisect.bisect_right(self.addresses, address) - 1
        if index < 0 or (index == len(self.addresses) - 1
                         and address - self.addresses[index] > 1 << 20):
            return None
        return self.names[index]


def _from_pairs(pairs: list[tuple[int, str]], source: str) -> Symbols:
    pairs.sort()
    return Symbols(tuple(a for a, _ in pairs), tuple(n for _, n in pairs), source)


def load_symbols(path: Path) -> Symbols:
    """A System.map (``ADDRESS TYPE NAME`` lines) or an ELF file's .symtab."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
            if head == b"\x7fELF":
                return _elf_symbols(path)
            data = head + file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read symbols ({exc.strerror})") from None
    pairs = [(int(m[1], 16), m[3].decode(errors="replace")) for m in _MAP_LINE.finditer(data)]
    if not pairs:
        raise ConfigError(f"{path}: no text symbols (expected a System.map with "
                          "'ADDRESS T NAME' lines, or an ELF kernel with a symbol table)")
    return _from_pairs(pairs, str(path))


def _elf_symbols(path: Path) -> Symbols:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as file:
            table = ELFFile(file).get_section_by_name(".symtab")
            pairs = [] if table is None else [
                (symbol["st_value"], symbol.name) for symbol in table.iter_symbols()
                if symbol["st_info"]["type"] == "STT_FUNC" and symbol["st_value"]]
    except (ELFError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read its ELF symbol table ({exc})") from None
    if not pairs:
        raise ConfigError(f"{path}: the ELF file has no function symbols (stripped?)")
    return _from_pairs(pairs, str(path))


def find_symbols(kernel: Path, version: str | None) -> Path | None:
    """Where this kernel's symbols probably are: the kernel itself if it is an ELF with a
    symbol table, a ``System.map`` or ``vmlinux`` beside it, or Debian's places for the
    version the kernel names (the -dbg package's /usr/lib/debug/boot; /boot's own
    System.map is a placeholder in Debian)."""
    candidates = [kernel, kernel.parent / "System.map", kernel.parent / "vmlinux"]
    if version:
        release = version.split()[0]
        for directory in DEBUG_DIRS:
            candidates += [directory / f"System.map-{release}", directory / f"vmlinux-{release}"]
    for candidate in candidates:
        if _has_symbols(candidate):
            return candidate
    return None


def _has_symbols(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16)
    except OSError:
        return False
    if head.startswith(b"\x7fELF"):
        try:
            from elftools.elf.elffile import ELFFile

            with open(path, "rb") as file:
                return ELFFile(file).get_section_by_name(".symtab") is not None
        except Exception:  # a file that only looks like an ELF has no symbols for us
            return False
    return _MAP_LINE.search(head) is not None
