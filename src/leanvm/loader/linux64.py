"""Direct Linux boot through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

leanvm does what a boot loader does, then enters the kernel's 64-bit entry point (the
protected-mode code's start + 0x200) in long mode with paging on, interrupts off, a GDT with
flat __BOOT_CS (0x10) and __BOOT_DS (0x18), and RSI pointing at struct boot_params.

Low memory (below 1 MiB, where the protected-mode kernel loads):
  0x0500  GDT (null, null, code 0x10, data 0x18)
  0x7000  boot_params ("zero page"): the kernel's setup header copied in, e820 table
  0x8ff0  initial stack top
  0x9000  page tables: identity map of the first 4 GiB (as for bare guests)
  0x20000 command line
The initrd goes at the top of RAM below 4 GiB and below the kernel's initrd_addr_max,
page aligned (QEMU and Firecracker do the same).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader.bare import BootState, write_identity_page_tables, PML4_ADDRESS
from leanvm.loader.bzimage import (CAN_USE_HEAP, HEADER_END, XLF_KERNEL_64, SetupHeader,
                                   parse_setup_header)
from leanvm.loader.files import place, place_range
from leanvm.memory.guest import GuestMemory

GDT_ADDRESS = 0x500
ZERO_PAGE = 0x7000
STACK_TOP = 0x8FF0
CMDLINE_ADDRESS = 0x20000
KERNEL_ADDRESS = 0x100000
LOADER_TYPE = 0xFF  # "undefined" in the boot protocol's loader id table
BOOT_CS, BOOT_DS = 0x10, 0x18
GDT_ENTRIES = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
E820_ENTRIES, E820_TABLE, E820_MAX = 0x1E8, 0x2D0, 128
ACPI_RSDP_ADDR = 0x070  # boot_params.acpi_rsdp_addr (u64, boot protocol 2.14)
HEADER_START = 0x1F1
PAGE = 4096
E820 = struct.Struct("<QQI")


class DirectKernel(NamedTuple):
    header: SetupHeader
    kernel_address: int
    entry: int  # the 64-bit entry point
    initrd_address: int  # 0 without an initrd
    initrd_size: int
    boot: BootState
    initrd_mapped: bool = False  # mapped copy-on-write from the file, not copied
    kernel_mapped: int = 0  # bytes of the kernel mapped from the file
    kernel_copied: int = 0  # bytes copied (the setup sectors usually leave it unaligned)


def zero_page(view: memoryview, initrd_address: int, initrd_size: int,
              e820: list[tuple[int, int, int]], rsdp: int) -> bytes:
    """boot_params: the kernel's own setup header, then what the boot loader fills in."""
    page = bytearray(PAGE)
    header_end = 0x202 + view[0x201]  # the setup header's length is in the jump at 0x200
    page[HEADER_START:header_end] = view[HEADER_START:header_end]
    page[0x210] = LOADER_TYPE
    page[0x211] |= CAN_USE_HEAP
    struct.pack_into("<H", page, 0x224, 0xFE00)  # heap_end_ptr, as for a 0x10000 setup
    struct.pack_into("<I", page, 0x228, CMDLINE_ADDRESS)
    struct.pack_into("<II", page, 0x218, initrd_address, initrd_size)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, rsdp)  # 0: the kernel scans for one
    if len(e820) > E820_MAX:
        raise ImageError(f"memory map has {len(e820)} entries; boot_params holds {E820_MAX}")
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        E820.pack_into(page, E820_TABLE + index * E820.size, *entry)
    return bytes(page)


def load_linux64(memory: GuestMemory, kernel: "bytes | memoryview", kernel_path: str,
                 initrd: "bytes | memoryview", initrd_path: str, cmdline: str,
                 e820: list[tuple[int, int, int]], low_ram_end: int, *,
                 kernel_file: str | None = None,
                 initrd_file: str | None = None, rsdp: int = 0) -> DirectKernel:
    """Load a bzImage for its 64-bit entry; ``e820`` is (address, size, type) sorted. With
    ``kernel_file``/``initrd_file`` (the files the bytes come from), whole pages are mapped
    copy-on-write from them where alignment allows, instead of copied."""
    view = memoryview(kernel)
    header = parse_setup_header(bytes(view[:HEADER_END]), kernel_path, len(view))
    if header.protocol < 0x20C or not header.xloadflags & XLF_KERNEL_64:
        raise ImageError(f"{kernel_path}: no 64-bit entry point (boot protocol "
                         f"{header.protocol >> 8}.{header.protocol & 0xFF:02d}, xloadflags "
                         f"{header.xloadflags:#x}); leanvm boots it only through firmware")
    body = view[header.setup_size:]
    need = max(len(body), header.init_size)
    if KERNEL_ADDRESS + need > low_ram_end:
        raise ImageError(f"{kernel_path}: the kernel needs {need} bytes from {KERNEL_ADDRESS:#x} "
                         f"but RAM below 4 GiB ends at {low_ram_end:#x}; give the VM more memory")
    encoded = cmdline.encode()
    if b"\0" in encoded or len(encoded) > header.cmdline_size:
        raise ImageError(f"{kernel_path}: the kernel command line is {len(encoded)} bytes or "
                         f"has a NUL byte; this kernel accepts at most {header.cmdline_size}")

    initrd_address = 0
    initrd_mapped = False
    if len(initrd):
        top = min(header.initrd_addr_max, low_ram_end - 1) + 1
        initrd_address = (top - len(initrd)) & ~(PAGE - 1)
        if top < len(initrd) or initrd_address < KERNEL_ADDRESS + need:
            raise ImageError(f"{initrd_path}: initrd of {len(initrd)} bytes does not fit in RAM "
                             f"above the kernel (which needs up to {KERNEL_ADDRESS + need:#x}); "
                             "give the VM more memory")
        initrd_mapped = place(memory, initrd_address, initrd, initrd_file)
    kernel_mapped = place_range(memory, KERNEL_ADDRESS, view, header.setup_size, len(body),
                                kernel_file)
    memory.write(CMDLINE_ADDRESS, encoded + b"\0")
    memory.write(ZERO_PAGE, zero_page(view, initrd_address, len(initrd), e820, rsdp))
    memory.write(GDT_ADDRESS, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    write_identity_page_tables(memory)
    entry = KERNEL_ADDRESS + 0x200
    boot = BootState(rip=entry, rsp=STACK_TOP, rdi=0, rsi=ZERO_PAGE, rdx=0, cr3=PML4_ADDRESS,
                     gdt_base=GDT_ADDRESS, gdt_limit=8 * len(GDT_ENTRIES) - 1,
                     code_selector=BOOT_CS, data_selector=BOOT_DS)
    return DirectKernel(header, KERNEL_ADDRESS, entry, initrd_address, len(initrd), boot,
                        initrd_mapped, kernel_mapped, len(body) - kernel_mapped)


def linux_e820(ram: list[tuple[int, int]], reserved: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The e820 map Linux gets: RAM with the legacy hole [0x9fc00, 1 MiB) left out (EBDA,
    VGA, BIOS area), and the reserved ranges. Inputs are (base, size)."""
    entries: list[tuple[int, int, int]] = []
    for base, size in sorted(ram):
        end = base + size
        if base < 0x9FC00:
            entries.append((base, min(end, 0x9FC00) - base, 1))
        if end > 0x100000:
            start = max(base, 0x100000)
            entries.append((start, end - start, 1))
    entries += [(base, size, 2) for base, size in reserved]
    return sorted(entries)
