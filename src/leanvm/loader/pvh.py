"""ELF kernels through the PVH entry (Xen's HVM direct boot ABI, which Linux supports with
CONFIG_PVH): the ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18, owner "Xen") gives a 32-bit
entry point, entered in flat protected mode with paging off and EBX = struct hvm_start_info.

hvm_start_info (version 1): u32 magic 0x336ec578, u32 version, u32 flags, u32 nr_modules,
u64 modlist_paddr, u64 cmdline_paddr, u64 rsdp_paddr, u64 memmap_paddr, u32 memmap_entries,
u32 reserved. Module entries {u64 paddr; u64 size; u64 cmdline_paddr; u64 reserved}: the
initrd is module 0. Memory map entries {u64 addr; u64 size; u32 type; u32 reserved}.

Low memory: GDT at 0x500 (null, 32-bit code 0x08, data 0x10), start_info at 0x6000, the
module list at 0x6040, the memory map from 0x6100, the command line at 0x20000.
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader.elf64 import PT_LOAD, Elf64
from leanvm.loader.files import place, place_range
from leanvm.memory.guest import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578
START_INFO = struct.Struct("<IIIIQQQQII")
MODULE = struct.Struct("<QQQQ")
MEMMAP = struct.Struct("<QQII")
GDT_ADDRESS = 0x500
GDT_ENTRIES = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
START_INFO_ADDRESS, MODLIST_ADDRESS, MEMMAP_ADDRESS = 0x6000, 0x6040, 0x6100
MEMMAP_MAX = 128
CMDLINE_ADDRESS, CMDLINE_MAX = 0x20000, 0x10000 - 1
LOW_END = 0x100000  # kernel segments may not reach below 1 MiB
PAGE = 4096


class ProtectedModeState(NamedTuple):
    """Registers for a 32-bit entry: flat segments, paging off."""

    eip: int
    ebx: int
    gdt_base: int
    gdt_limit: int
    code_selector: int = 0x08
    data_selector: int = 0x10


class PvhKernel(NamedTuple):
    entry: int
    kernel_end: int
    initrd_address: int
    initrd_size: int
    boot: ProtectedModeState
    initrd_mapped: bool = False  # mapped copy-on-write from the file, not copied
    kernel_mapped: int = 0  # bytes of kernel segments mapped from the file
    kernel_copied: int = 0  # bytes copied (pages the file's alignment did not allow mapping)


def _elf(data: "bytes | memoryview | mmap.mmap", path: str) -> Elf64:
    return Elf64(data, path)  # ImageError naming the file and the fault


def pvh_entry(data: "bytes | memoryview | mmap.mmap", path: str) -> int:
    """The 32-bit PVH entry point from the kernel's notes; ImageError if there is none."""
    for note in _elf(data, path).notes():
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) < 4:
                raise ImageError(f"{path}: PVH entry note of {len(note.desc)} bytes is too short")
            return struct.unpack_from("<Q" if len(note.desc) >= 8 else "<I", note.desc)[0]
    raise ImageError(f"{path}: ELF kernel without a PVH entry note (Xen, type 18): build it "
                     "with CONFIG_PVH=y, or boot its bzImage")


def load_pvh(memory: GuestMemory, data: "bytes | memoryview | mmap.mmap", path: str,
             initrd: "bytes | memoryview | mmap.mmap", initrd_path: str, cmdline: str,
             e820: list[tuple[int, int, int]], low_ram_end: int, *,
             kernel_file: str | None = None, initrd_file: str | None = None,
             rsdp: int = 0) -> PvhKernel:
    """Load the ELF's segments and the boot information. With ``kernel_file`` (the file
    ``data`` was read from) and ``initrd_file``, whole pages are mapped copy-on-write from
    those files instead of copied. Guest RAM must still be all zeros (a new VM): .bss is
    left as it is."""
    entry = pvh_entry(data, path)
    elf = _elf(data, path)
    kernel_end = mapped = copied = 0
    view = memoryview(data) if not isinstance(data, memoryview) else data
    for segment in elf.segments():
        if segment.type != PT_LOAD or not segment.memsz:
            continue
        start, size = segment.paddr, segment.memsz
        if start < LOW_END or start + size > low_ram_end:
            raise ImageError(f"{path}: segment [{start:#x}, {start + size:#x}) is outside "
                             f"[1 MiB, {low_ram_end:#x}): give the VM more memory")
        offset, filesz = segment.offset, min(segment.filesz, size)
        if offset + filesz > len(view):
            raise ImageError(f"{path}: segment data [{offset:#x}, {offset + filesz:#x}) runs "
                             "past the file's end")
        done = place_range(memory, start, view, offset, filesz, kernel_file)
        mapped, copied = mapped + done, copied + filesz - done
        kernel_end = max(kernel_end, start + size)
    if not kernel_end:
        raise ImageError(f"{path}: no loadable segments")
    if not kernel_end > entry >= LOW_END:
        raise ImageError(f"{path}: PVH entry {entry:#x} is outside the loaded kernel")

    encoded = cmdline.encode()
    if len(encoded) > CMDLINE_MAX or b"\0" in encoded:
        raise ImageError(f"kernel command line must be at most {CMDLINE_MAX} bytes without NUL")
    memory.write(CMDLINE_ADDRESS, encoded + b"\0")
    initrd_address = 0
    initrd_mapped = False
    modules = 0
    if len(initrd):
        initrd_address = (low_ram_end - len(initrd)) & ~(PAGE - 1)
        if len(initrd) > low_ram_end or initrd_address < kernel_end:
            raise ImageError(f"{initrd_path}: initrd of {len(initrd)} bytes does not fit in RAM "
                             f"above the kernel (ends {kernel_end:#x}); give the VM more memory")
        initrd_mapped = place(memory, initrd_address, initrd, initrd_file)
        memory.write(MODLIST_ADDRESS, MODULE.pack(initrd_address, len(initrd), 0, 0))
        modules = 1
    if len(e820) > MEMMAP_MAX:
        raise ImageError(f"memory map has {len(e820)} entries; at most {MEMMAP_MAX}")
    memory.write(MEMMAP_ADDRESS, b"".join(MEMMAP.pack(a, s, t, 0) for a, s, t in e820))
    memory.write(START_INFO_ADDRESS, START_INFO.pack(
        START_INFO_MAGIC, 1, 0, modules, MODLIST_ADDRESS if modules else 0, CMDLINE_ADDRESS,
        rsdp, MEMMAP_ADDRESS, len(e820), 0))  # rsdp_paddr: the ACPI RSDP (0: none)
    memory.write(GDT_ADDRESS, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    boot = ProtectedModeState(entry, START_INFO_ADDRESS, GDT_ADDRESS, 8 * len(GDT_ENTRIES) - 1)
    return PvhKernel(entry, kernel_end, initrd_address, len(initrd), boot, initrd_mapped,
                     mapped, copied)

