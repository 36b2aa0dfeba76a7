"""A bzImage handed to firmware through fw_cfg, laid out the way QEMU's x86 loader does it.

Firmware (QEMU's linuxboot_dma option ROM under SeaBIOS, or qboot) reads the fw_cfg items
SETUP_*, KERNEL_*, CMDLINE_* and INITRD_*, copies each to the address given with it and
enters the setup code at SETUP_ADDR + 0x200 in real mode. Addresses follow QEMU
(hw/i386/x86.c, x86_load_linux) for each protocol generation:

    protocol >= 2.02, loaded high:  setup 0x10000, command line 0x20000, kernel 1 MiB
    2.00-2.01, loaded high:         setup 0x90000, command line 0x9a000, kernel 1 MiB
    not loaded high:                setup 0x90000, command line 0x9a000, kernel 0x10000

The initrd goes at the top of memory below 4 GiB, under the kernel's initrd_addr_max, page
aligned, leaving the last FIRMWARE_RESERVE bytes of low RAM to firmware tables (QEMU keeps
the same 160 KiB free for ACPI data). The setup block is patched as QEMU patches it:
type_of_loader 0xB0, CAN_USE_HEAP and heap_end_ptr, cmd_line_ptr, ramdisk_image/size.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader.bzimage import (CAN_USE_HEAP, HEADER_END, XLF_CAN_BE_LOADED_ABOVE_4G, SetupHeader,
                                   parse_setup_header)

LOADER_TYPE = 0xB0  # "QEMU" in the boot protocol's loader id table; firmware expects it
FIRMWARE_RESERVE = 0x20000 + 0x8000
PAGE = 4096
OLD_CMDLINE_MAGIC = 0xA33F


class FirmwareKernel(NamedTuple):
    header: SetupHeader
    setup_addr: int
    setup: bytes  # the patched setup block
    kernel_addr: int
    kernel: memoryview  # the protected-mode part of the file
    cmdline_addr: int
    cmdline: bytes  # NUL-terminated
    initrd_addr: int  # 0 without an initrd
    initrd: "memoryview | bytes"

    @property
    def entry(self) -> int:
        """Where firmware enters the kernel: its setup code, in real mode."""
        return self.setup_addr + 0x200


def plan_firmware_kernel(kernel: "bytes | memoryview", kernel_path: str,
                         initrd: "bytes | memoryview", initrd_path: str, cmdline: str,
                         low_ram_end: int) -> FirmwareKernel:
    """Check a bzImage, command line and initrd against each other and against RAM."""
    view = memoryview(kernel)
    header = parse_setup_header(bytes(view[:HEADER_END]), kernel_path, len(view))
    protocol = header.protocol
    if protocol >= 0x202 and header.loads_high:
        setup_addr, cmdline_addr, kernel_addr = 0x10000, 0x20000, 0x100000
    else:
        setup_addr, cmdline_addr = 0x90000, 0x9A000
        kernel_addr = 0x100000 if header.loads_high else 0x10000
    kernel_part = view[header.setup_size:]
    if kernel_addr + len(kernel_part) > low_ram_end:
        raise ImageError(f"{kernel_path}: the kernel ({len(kernel_part)} bytes at "
                         f"{kernel_addr:#x}) does not fit in {low_ram_end >> 20} MiB of RAM")

    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ImageError(f"{kernel_path}: the kernel command line contains a NUL byte")
    if len(encoded) > header.cmdline_size:
        raise ImageError(f"{kernel_path}: the kernel command line is {len(encoded)} bytes; this "
                         f"kernel accepts at most {header.cmdline_size}")

    if protocol >= 0x20C and header.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
        initrd_max = 0xFFFFFFFF
    else:
        initrd_max = header.initrd_addr_max
    initrd_max = min(initrd_max, low_ram_end - FIRMWARE_RESERVE - 1)
    initrd_addr = 0
    if len(initrd):
        initrd_addr = (initrd_max + 1 - len(initrd)) & ~(PAGE - 1)
        kernel_end = kernel_addr + max(len(kernel_part), header.init_size)
        if initrd_max + 1 < len(initrd) or initrd_addr < kernel_end:
            raise ImageError(f"{initrd_path}: initrd of {len(initrd)} bytes does not fit in RAM "
                             f"between the kernel (ends {kernel_end:#x}) and {initrd_max + 1:#x}; "
                             "give the VM more memory")

    setup = bytearray(view[:header.setup_size])
    if protocol >= 0x202:
        struct.pack_into("<I", setup, 0x228, cmdline_addr)
    else:
        struct.pack_into("<HH", setup, 0x20, OLD_CMDLINE_MAGIC, cmdline_addr - setup_addr)
    setup[0x210] = LOADER_TYPE
    if protocol >= 0x201:
        setup[0x211] |= CAN_USE_HEAP
        struct.pack_into("<H", setup, 0x224, cmdline_addr - setup_addr - 0x200)
    struct.pack_into("<II", setup, 0x218, initrd_addr, len(initrd))
    return FirmwareKernel(header, setup_addr, bytes(setup), kernel_addr, kernel_part,
                          cmdline_addr, encoded + b"\0", initrd_addr,
                          memoryview(initrd) if len(initrd) else b"")
