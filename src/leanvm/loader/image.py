"""Bare guest programs: a flat binary (loaded at 1 MiB) or an x86-64 ELF executable."""

from __future__ import annotations

from typing import NamedTuple
from pathlib import Path

from leanvm.errors import ImageError

FLAT_LOAD_ADDRESS = 0x100000  # 1 MiB, where flat binaries are loaded and entered
ELF_MAGIC = b"\x7fELF"


class Segment(NamedTuple):
    """``data`` at guest-physical ``address``, then zeros up to ``memory_size`` bytes."""

    address: int
    data: bytes
    memory_size: int


class GuestImage(NamedTuple):
    path: str
    kind: str  # "flat" or "elf"
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.address + s.memory_size for s in self.segments)


def load_image(path: str | Path) -> GuestImage:
    """Read a guest program; ELF if it starts with the ELF magic, else a flat binary."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file (expected a flat binary or ELF guest program)") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise ImageError(f"{path}: empty file (expected a flat binary or ELF guest program)")
    if data.startswith(ELF_MAGIC):
        return _load_elf(str(path), data)
    return GuestImage(str(path), "flat", FLAT_LOAD_ADDRESS,
                      (Segment(FLAT_LOAD_ADDRESS, data, len(data)),))


def _load_elf(path: str, data: bytes) -> GuestImage:
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ImageError(f"{path}: ELF for {elf['e_machine']} ({elf.elfclass}-bit); "
                             "expected an x86-64 ELF executable")
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            if seg["p_filesz"] > seg["p_memsz"]:
                raise ImageError(f"{path}: PT_LOAD at {seg['p_paddr']:#x} has p_filesz > p_memsz")
            body = seg.data()
            if len(body) != seg["p_filesz"]:
                raise ImageError(f"{path}: PT_LOAD at {seg['p_paddr']:#x} is truncated")
            segments.append(Segment(seg["p_paddr"], body, seg["p_memsz"]))
        entry = elf["e_entry"]
    except ELFError as exc:
        raise ImageError(f"{path}: malformed ELF ({exc})") from None
    if not segments:
        raise ImageError(f"{path}: ELF has no loadable segments")
    return GuestImage(path, "elf", entry, tuple(segments))
