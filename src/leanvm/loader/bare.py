"""Bare-guest boot: put a test program in RAM and prepare a 64-bit long-mode CPU for it.

The VMM does what a boot loader would: a GDT, identity-mapped page tables for the first
4 GiB (2 MiB pages), a stack, an argument string and a boot-info block. The resulting
register values are returned as a BootState for the machine to load into the vCPU.
docs/guest-abi.md is the user-facing statement of this convention.

Low memory used (all below the 1 MiB load address):
  0x1000  GDT                  0x2000  boot info (struct leanvm_boot_info)
  0x3000  argument string      0x9000  PML4, 0xA000 PDPT, 0xB000-0xEFFF four page directories
  0x80000 initial stack top (grows down)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from leanvm.errors import ConfigError, ImageError
from leanvm.loader.image import GuestImage
from leanvm.memory.guest import GuestMemory

GDT_ADDRESS = 0x1000
BOOT_INFO_ADDRESS = 0x2000
ARGS_ADDRESS = 0x3000
ARGS_MAX = 0x1000 - 1  # bytes, excluding the terminating NUL
PML4_ADDRESS = 0x9000
PDPT_ADDRESS = 0xA000
PD_ADDRESS = 0xB000  # four page directories, one per GiB
STACK_TOP = 0x80000
LOW_RESERVED_END = 0x80000  # images may not overlap the area above
MIN_RAM = 2 << 20

BOOT_INFO_MAGIC = 0x424D564C  # "LVMB" little-endian
BOOT_INFO_VERSION = 1
# struct leanvm_boot_info { u32 magic; u32 version; u64 ram_size; u64 args_addr;
#                           u64 args_len; u64 image_end; }
BOOT_INFO = struct.Struct("<IIQQQQ")

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
# GDT: null, 64-bit code (L=1, P, DPL0, exec/read), data (P, DPL0, read/write)
GDT_ENTRIES = (0x0000000000000000, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)

PTE_PRESENT, PTE_WRITE, PTE_USER, PTE_LARGE = 0x1, 0x2, 0x4, 0x80


class BootState(NamedTuple):
    """Registers for the first instruction, in long mode at CPL 0."""

    rip: int
    rsp: int
    rdi: int  # boot info address
    rsi: int  # argument string address
    rdx: int  # argument string length
    cr3: int
    gdt_base: int
    gdt_limit: int
    code_selector: int = CODE_SELECTOR
    data_selector: int = DATA_SELECTOR


def load_bare(memory: GuestMemory, image: GuestImage, args: str = "") -> BootState:
    """Copy ``image`` into RAM, build GDT, page tables and boot info; return the entry state."""
    ram = memory.ram_size
    if ram < MIN_RAM:
        raise ConfigError(f"memory size {ram} is too small for a bare guest: need at least 2M")
    encoded = args.encode()
    if len(encoded) > ARGS_MAX or b"\0" in encoded:
        raise ConfigError(f"guest arguments must be at most {ARGS_MAX} bytes without NUL bytes")
    for seg in image.segments:
        if seg.address < LOW_RESERVED_END:
            raise ImageError(f"{image.path}: segment at {seg.address:#x} overlaps leanvm's boot "
                             f"area below {LOW_RESERVED_END:#x}; link the program at 1 MiB")
        if seg.address + seg.memory_size > ram:
            raise ImageError(f"{image.path}: segment [{seg.address:#x}, "
                             f"{seg.address + seg.memory_size:#x}) does not fit in {ram >> 20} MiB "
                             "of guest RAM; raise -m")
    if not any(s.address <= image.entry < s.address + s.memory_size for s in image.segments):
        raise ImageError(f"{image.path}: entry point {image.entry:#x} is outside the image")

    for seg in image.segments:
        memory.write(seg.address, seg.data)
        if seg.memory_size > len(seg.data):  # .bss: RAM is fresh and zero, but be explicit
            memory.write(seg.address + len(seg.data), bytes(seg.memory_size - len(seg.data)))

    write_long_mode_tables(memory)
    memory.write(ARGS_ADDRESS, encoded + b"\0")
    memory.write(BOOT_INFO_ADDRESS, BOOT_INFO.pack(BOOT_INFO_MAGIC, BOOT_INFO_VERSION, ram,
                                                   ARGS_ADDRESS, len(encoded), image.end))
    return BootState(rip=image.entry, rsp=STACK_TOP, rdi=BOOT_INFO_ADDRESS, rsi=ARGS_ADDRESS,
                     rdx=len(encoded), cr3=PML4_ADDRESS, gdt_base=GDT_ADDRESS,
                     gdt_limit=8 * len(GDT_ENTRIES) - 1)


def write_long_mode_tables(memory: GuestMemory) -> None:
    """The GDT and identity-mapping page tables every 64-bit bare guest starts with (and
    the host check's probe guest, machine/host_check.py)."""
    memory.write(GDT_ADDRESS, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    write_identity_page_tables(memory)


def long_mode_state(rip: int, rsp: int) -> BootState:
    """Entry state for code at ``rip`` with the tables write_long_mode_tables wrote."""
    return BootState(rip=rip, rsp=rsp, rdi=0, rsi=0, rdx=0, cr3=PML4_ADDRESS,
                     gdt_base=GDT_ADDRESS, gdt_limit=8 * len(GDT_ENTRIES) - 1)


def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity map [0, 4 GiB) with 2 MiB pages (user-accessible, so CPL 3 tests can run)."""
    flags = PTE_PRESENT | PTE_WRITE | PTE_USER
    memory.write(PML4_ADDRESS, struct.pack("<Q", PDPT_ADDRESS | flags) + bytes(4096 - 8))
    memory.write(PDPT_ADDRESS, struct.pack("<4Q", *(PD_ADDRESS + 4096 * i | flags for i in range(4)))
                 + bytes(4096 - 32))
    entries = [(i << 21) | flags | PTE_LARGE for i in range(4 * 512)]
    memory.write(PD_ADDRESS, struct.pack(f"<{len(entries)}Q", *entries))
