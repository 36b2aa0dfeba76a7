"""What a dump holds, as plain data: guest-physical memory runs, vCPU registers, the guest
kernel's VMCOREINFO. The writers (elf.py, kdump.py) read only this."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from leanvm.errors import ConfigError

PAGE = 4096


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment or descriptor-table register: selector, base, limit and the descriptor's
    attribute bits in the layout of its high dword (type at bit 8, S 12, DPL 13, P 15,
    AVL 20, L 21, D/B 22, G 23), as QEMU's CPU-state note carries them."""

    selector: int = 0
    base: int = 0
    limit: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class CpuState:
    """One vCPU at the moment of the dump."""

    index: int
    regs: Mapping[str, int]  # rax .. r15, rip, rflags
    segments: Mapping[str, Segment]  # cs ds es fs gs ss ldt tr gdt idt
    cr: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # cr0 .. cr4 (cr1 reads 0)
    efer: int = 0
    kernel_gs_base: int = 0


class LazyBytes:
    """Bytes read only when asked for, through ``read(start, size)``: a live dump's child
    reads guest memory from the VMM this way. Slicing gives a window (nothing read);
    ``bytes()`` reads it."""

    __slots__ = ("_read", "_start", "_size")

    def __init__(self, read: Callable[[int, int], bytes], start: int, size: int) -> None:
        self._read, self._start, self._size = read, start, size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice) -> "LazyBytes":
        start, stop, step = key.indices(self._size)
        if step != 1:
            raise ValueError("LazyBytes slices have step 1")
        return LazyBytes(self._read, self._start + start, max(0, stop - start))

    def __bytes__(self) -> bytes:
        return self._read(self._start, self._size)


@dataclass(frozen=True, slots=True)
class MemoryRun:
    """``len(data)`` bytes of guest-physical memory at ``paddr`` (page aligned, whole pages)."""

    paddr: int
    data: "memoryview | bytes | LazyBytes"

    @property
    def end(self) -> int:
        return self.paddr + len(self.data)


@dataclass(frozen=True, slots=True)
class VirtualRange:
    """``size`` bytes at guest-virtual ``vaddr`` mapped to guest-physical ``paddr``."""

    vaddr: int
    paddr: int
    size: int


@dataclass(slots=True)
class DumpSource:
    """Everything a writer needs. ``runs`` are sorted and do not overlap; ``ram`` lists the
    guest's RAM as (start, end) guest-physical ranges, populated or not (kdump's first
    bitmap and the page count come from it)."""

    runs: Sequence[MemoryRun]
    cpus: Sequence[CpuState]
    ram: Sequence[tuple[int, int]] = ()
    vmcoreinfo: bytes | None = None  # the guest's "KEY=value\n" text
    virtual: Sequence[VirtualRange] | None = None  # guest-virtual mappings (ELF paging)
    notes: list[str] = field(default_factory=list)  # what the reader will miss, for the user

    @property
    def size(self) -> int:
        return sum(len(run.data) for run in self.runs)

    @property
    def phys_base(self) -> int:
        """Where the kernel was loaded relative to where it was linked, from VMCOREINFO's
        NUMBER(phys_base) (x86-64 Linux), else 0."""
        value = vmcoreinfo_value(self.vmcoreinfo, "NUMBER(phys_base)")
        try:
            return int(value, 0) if value is not None else 0
        except ValueError:
            return 0

    @property
    def release(self) -> str:
        """The guest kernel's release (VMCOREINFO's OSRELEASE), or ''."""
        return vmcoreinfo_value(self.vmcoreinfo, "OSRELEASE") or ""


START_KERNEL_MAP = 0xFFFFFFFF80000000  # x86-64 Linux: where the kernel image is linked
UTS_FIELD = 65  # each string of struct new_utsname
UTS_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")


def utsname(source: DumpSource) -> dict[str, bytes] | None:
    """The guest's own struct new_utsname (init_uts_ns, found through VMCOREINFO's SYMBOL
    and OFFSET and NUMBER(phys_base)), read from the dumped memory; None when VMCOREINFO
    or the memory is missing or what is there is not a utsname (a hostile guest's text is
    data: it only lands in the kdump header's fixed-size fields)."""
    symbol = vmcoreinfo_value(source.vmcoreinfo, "SYMBOL(init_uts_ns)")
    offset = vmcoreinfo_value(source.vmcoreinfo, "OFFSET(uts_namespace.name)") or "0"
    try:
        vaddr = int(symbol, 16) + int(offset, 0) if symbol is not None else None
    except ValueError:
        return None
    if vaddr is None or not START_KERNEL_MAP <= vaddr < 1 << 64:
        return None
    raw = read_physical(source.runs, vaddr - START_KERNEL_MAP + source.phys_base,
                        UTS_FIELD * len(UTS_FIELDS))
    if raw is None:
        return None
    fields = {name: raw[i * UTS_FIELD:(i + 1) * UTS_FIELD] for i, name in enumerate(UTS_FIELDS)}
    if fields["sysname"].split(b"\0", 1)[0] != b"Linux" or any(
            b"\0" not in value for value in fields.values()):
        return None
    return {name: value.split(b"\0", 1)[0] for name, value in fields.items()}


def chunks(data: "memoryview | bytes | LazyBytes", size: int
           ) -> "Iterator[memoryview | bytes]":
    """``data`` in pieces of ``size`` bytes (the last may be shorter), read as they go."""
    view = data if isinstance(data, LazyBytes) else memoryview(data)
    for start in range(0, len(view), size):
        piece = view[start:start + size]
        yield bytes(piece) if isinstance(piece, LazyBytes) else piece


def read_physical(runs: Sequence[MemoryRun], address: int, size: int) -> bytes | None:
    """``size`` bytes at guest-physical ``address`` if one run holds them all, else None."""
    for run in runs:
        if run.paddr <= address and address + size <= run.end:
            return bytes(run.data[address - run.paddr:address - run.paddr + size])
    return None


def vmcoreinfo_value(text: bytes | None, key: str) -> str | None:
    if not text:
        return None
    match = re.search(rb"^" + re.escape(key.encode()) + rb"=([^\n]*)$", text, re.MULTILINE)
    return match.group(1).decode("ascii", "replace") if match else None


def clip(runs: Sequence[MemoryRun], begin: int, length: int) -> list[MemoryRun]:
    """The parts of ``runs`` inside [begin, begin + length) (QEMU's begin/length filter),
    page aligned."""
    if begin < 0 or length <= 0 or begin % PAGE or length % PAGE:
        raise ConfigError(f"dump filter begin={begin:#x} length={length:#x}: expected page-"
                          "aligned values with a positive length")
    end = begin + length
    out = []
    for run in runs:
        low, high = max(run.paddr, begin), min(run.end, end)
        if low < high:
            out.append(MemoryRun(low, run.data[low - run.paddr:high - run.paddr]))
    return out
