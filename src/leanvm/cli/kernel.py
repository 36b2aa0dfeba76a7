"""`leanvm kernel extract BZIMAGE OUT`: the ELF vmlinux inside a bzImage, decompressed on the
host (what `leanvm run -kernel` boots through PVH), and `leanvm kernel info BZIMAGE`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.loader.decompress import Payload


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("kernel", help="inspect a Linux kernel or extract its vmlinux",
                            description="Extract the ELF vmlinux inside a bzImage, decompressed "
                                        "on the host (what `leanvm run -kernel` boots through "
                                        "PVH), or print a kernel's setup header, payload "
                                        "format and PVH entry.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    extract = verbs.add_parser("extract", help="decompress a bzImage's payload to an ELF file",
                               description="Decompress a bzImage's kernel payload on the "
                                           "host, check it against the size and checksums "
                                           "its container declares, and write the ELF vmlinux "
                                           "to OUT (whole or not at all).")
    extract.add_argument("bzimage", type=Path)
    extract.add_argument("out", type=Path)
    extract.set_defaults(handler=handle_extract)
    info = verbs.add_parser("info", help="the setup header, payload format and PVH entry",
                            description="Show a kernel's boot protocol, setup header fields, "
                                        "payload format and sizes (bzImage), or its PVH "
                                        "entry (ELF).")
    info.add_argument("kernel", type=Path)
    info.set_defaults(handler=handle_info)


def _read(path: Path) -> bytes:
    from leanvm.loader.files import map_readonly

    return bytes(map_readonly(path, "kernel"))  # one-line errors naming the file


def _payload_figures(found: "Payload") -> str:
    """The payload's figures, named the same way by `info` and `extract`."""
    return (f"{found.kind} payload: {len(found.body)} bytes compressed, {found.declared} "
            "bytes uncompressed (declared)")


def handle_extract(args: argparse.Namespace) -> int:
    import time

    from leanvm.loader.decompress import extract_vmlinux, read_payload

    from leanvm.fileio import check_output_path, write_atomic

    data = _read(args.bzimage)
    check_output_path(args.out, "vmlinux")  # before the work, which may take seconds
    found = read_payload(data, str(args.bzimage))
    started = time.monotonic()
    elf = extract_vmlinux(data, str(args.bzimage))  # every check; nothing written on failure
    took = time.monotonic() - started
    write_atomic(args.out, elf, "vmlinux")
    print(f"{args.bzimage}: {_payload_figures(found)}")
    print(f"{args.out}: {len(elf)} bytes of ELF vmlinux written (decompressed in "
          f"{took * 1000:.0f} ms)")
    return 0


def handle_info(args: argparse.Namespace) -> int:
    from leanvm.errors import ImageError
    from leanvm.loader.bzimage import is_bzimage, parse_setup_header
    from leanvm.loader.decompress import read_payload
    from leanvm.loader.pvh import pvh_entry

    data = _read(args.kernel)
    out = sys.stdout
    if data.startswith(b"\x7fELF"):
        out.write(f"ELF kernel; PVH entry {pvh_entry(data, str(args.kernel)):#x}\n")
        return 0
    if not is_bzimage(data):
        raise ImageError(f"{args.kernel}: neither a bzImage nor an ELF kernel")
    header = parse_setup_header(data, str(args.kernel))
    out.write(f"bzImage, boot protocol {header.protocol >> 8}.{header.protocol & 0xFF:02d}: "
              f"{header.version or '(no version string)'}\n")
    out.write(f"  setup {header.setup_size} bytes, 64-bit entry "
              f"{'yes' if header.xloadflags & 1 else 'no'}, relocatable "
              f"{'yes' if header.relocatable else 'no'}, init_size {header.init_size}, "
              f"cmdline up to {header.cmdline_size} bytes\n")
    try:
        found = read_payload(data, str(args.kernel))
        out.write(f"  {_payload_figures(found)}\n")
    except ImageError as exc:
        out.write(f"  payload: {exc}\n")
    return 0
