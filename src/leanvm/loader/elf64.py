"""Just enough of ELF64 to boot a kernel: the file header, program headers, section headers
and notes, read straight from the (mapped) file with every offset checked against its size.

pyelftools reads ELF files completely, but importing it costs about 35 ms here, a third of
leanvm's start-up; a PVH boot needs only these tables. Field layouts are the System V ABI's
(Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr, Elf64_Nhdr); tests check this reader against
pyelftools on real kernels.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from leanvm.errors import ImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1  # e_ident[EI_CLASS], e_ident[EI_DATA]
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
# Elf64_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags, ehsize,
# phentsize, phnum, shentsize, shnum, shstrndx
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
SHDR = struct.Struct("<IIQQQQIIQQ")  # name, type, flags, addr, offset, size, link, info, ...
NHDR = struct.Struct("<III")  # namesz, descsz, type
MAX_HEADERS = 4096  # more program or section headers than any kernel has


class Segment(NamedTuple):
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


class Note(NamedTuple):
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


class Elf64:
    """An x86-64 little-endian ELF64 file held in ``data`` (bytes, memoryview or mmap)."""

    def __init__(self, data: "bytes | memoryview", path: str) -> None:
        self.data = memoryview(data) if not isinstance(data, memoryview) else data
        self.path = path
        if bytes(self.data[:4]) != ELF_MAGIC:
            raise ImageError(f"{path}: not an ELF file (no \\x7fELF magic)")
        if len(self.data) < EHDR.size:
            raise ImageError(f"{path}: {len(self.data)} bytes is too short for an ELF header")
        (ident, self.type, self.machine, _, self.entry, self.phoff, self.shoff, _, _,
         self.phentsize, self.phnum, self.shentsize, self.shnum, _) = EHDR.unpack_from(self.data)
        if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
            raise ImageError(f"{path}: not a 64-bit little-endian ELF file")
        if self.machine != EM_X86_64:
            raise ImageError(f"{path}: ELF for machine {self.machine}; expected an x86-64 "
                             f"kernel (machine {EM_X86_64})")
        self._check_table("program", self.phoff, self.phentsize, self.phnum, PHDR.size)
        self._check_table("section", self.shoff, self.shentsize, self.shnum, SHDR.size)

    def _check_table(self, what: str, offset: int, entsize: int, count: int, size: int) -> None:
        if not count:
            return
        if count > MAX_HEADERS or entsize < size or offset + entsize * count > len(self.data):
            raise ImageError(f"{self.path}: {what} header table ({count} entries of {entsize} "
                             f"bytes at {offset:#x}) does not fit the file")

    def segments(self) -> Iterator[Segment]:
        for index in range(self.phnum):
            fields = PHDR.unpack_from(self.data, self.phoff + index * self.phentsize)
            yield Segment(*fields[:7])

    def _span(self, offset: int, size: int, what: str) -> memoryview:
        if offset + size > len(self.data):
            raise ImageError(f"{self.path}: {what} [{offset:#x}, {offset + size:#x}) runs past "
                             "the file's end")
        return self.data[offset:offset + size]

    def notes(self) -> Iterator[Note]:
        """Notes of the PT_NOTE segments, or of the SHT_NOTE sections if there are none."""
        spans = [(s.offset, s.filesz) for s in self.segments() if s.type == PT_NOTE]
        if not spans:
            for index in range(self.shnum):
                fields = SHDR.unpack_from(self.data, self.shoff + index * self.shentsize)
                if fields[1] == SHT_NOTE:
                    spans.append((fields[4], fields[5]))
        for offset, size in spans:
            yield from self._parse_notes(self._span(offset, size, "note area"))

    def _parse_notes(self, area: memoryview) -> Iterator[Note]:
        at = 0
        while at + NHDR.size <= len(area):
            namesz, descsz, kind = NHDR.unpack_from(area, at)
            name_at = at + NHDR.size
            desc_at = name_at + (-(-namesz // 4) * 4)
            end = desc_at + (-(-descsz // 4) * 4)
            if desc_at + descsz > len(area):
                raise ImageError(f"{self.path}: a note runs past its note area")
            name = bytes(area[name_at:name_at + namesz]).rstrip(b"\0")
            yield Note(name, kind, bytes(area[desc_at:desc_at + descsz]))
            at = end
