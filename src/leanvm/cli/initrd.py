"""`leanvm initrd build OUT`: an uncompressed initramfs (busybox, probes, an /init that powers
off), and `leanvm initrd list FILE`: what an initramfs holds."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("initrd", help="build or list an initramfs (newc cpio)",
                            description="Build an uncompressed initramfs (busybox, probes, an "
                                        "/init that powers off) or list what an initramfs "
                                        "holds.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build", help="write an initramfs: static busybox and an /init that powers off",
        description="Write an uncompressed newc initramfs: Debian's static busybox with its "
                    "applet links, a probe helper, /dev/console, and an /init that mounts "
                    "proc, sys and dev, fires probes 3001-3003 on port 0x404, prints "
                    "'leanvm-init: user space is up' and powers off.")
    build.add_argument("out", type=Path, help="where to write the image")
    build.add_argument("--add", action="append", default=[], metavar="HOST_PATH:GUEST_PATH",
                       help="copy a host file, symlink or directory tree into the image "
                            "(repeatable; a later entry replaces an earlier one)")
    build.add_argument("--init", type=Path, metavar="FILE",
                       help="use FILE as /init (a script or a static program)")
    build.add_argument("--busybox", type=Path, metavar="PATH",
                       help="a static busybox (default: /bin/busybox from busybox-static)")
    build.add_argument("--no-busybox", action="store_true",
                       help="only /init, /dev/console, /dev/null and mount points "
                            "(with --init, for a self-contained init)")
    build.set_defaults(handler=handle_build)
    listing = verbs.add_parser(
        "list", help="list the entries of an initramfs (uncompressed or compressed members)",
        description="List every entry the kernel would unpack from an initramfs: its "
                    "uncompressed cpio members and compressed ones (gzip, bzip2, lzma, xz, "
                    "lz4, lzo, zstd), decompressed and checked on the way.")
    listing.add_argument("file", type=Path)
    listing.add_argument("--segments", action="store_true",
                         help="print a '#' line where each member starts")
    listing.set_defaults(handler=handle_list)


def handle_build(args: argparse.Namespace) -> int:
    from leanvm.errors import ConfigError, ImageError
    from leanvm.loader import initramfs

    if args.no_busybox and args.busybox is not None:
        raise ConfigError("--no-busybox and --busybox contradict each other")
    if args.no_busybox and args.init is None:
        raise ConfigError("--no-busybox needs --init FILE (the default /init is a busybox script)")
    additions = [_split_add(spec) for spec in args.add]
    init = None
    if args.init is not None:
        try:
            init = args.init.read_bytes()
        except OSError as exc:
            raise ImageError(f"{args.init}: cannot read the init ({exc.strerror})") from None
    if args.no_busybox:
        assert init is not None
        image = initramfs.base_image(init)
    else:
        image = initramfs.busybox_image(args.busybox or initramfs.BUSYBOX, init)
    for host, guest in additions:
        image.add_host(host, guest)
    size = image.write(args.out)
    print(f"{args.out}: {len(image)} entries, {size} bytes (uncompressed newc)")
    return 0


def _split_add(spec: str) -> tuple[Path, str]:
    from leanvm.errors import ConfigError

    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise ConfigError(f"bad --add {spec!r}: expected HOST_PATH:GUEST_PATH")
    return Path(host), guest


def handle_list(args: argparse.Namespace) -> int:
    """Every entry the kernel would create from the image, in order: the members of a
    multi-segment initramfs (an early uncompressed cpio, then compressed ones) one after
    another, each decompressed and checked (loader/initrd.py)."""
    import sys

    from leanvm.loader.files import map_readonly
    from leanvm.loader.initrd import entries

    data = map_readonly(args.file, "initramfs")  # one-line errors naming the file
    out = sys.stdout
    shown = None
    for member, record in entries(memoryview(data), str(args.file)):
        if args.segments and member is not shown:
            shown = member
            out.write(f"# {member.kind} member at byte {member.offset:#x}, "
                      f"{len(member.data)} bytes of cpio\n")
        body = member.data[record.start:record.end]
        kind = stat.S_IFMT(record.mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            size = f"{record.rdev[0]},{record.rdev[1]}"
        else:
            size = str(record.end - record.start)
        name = record.name.decode("utf-8", "replace")
        line = f"{stat.filemode(record.mode)} {record.uid:>4} {record.gid:>4} {size:>9} /{name}"
        if kind == stat.S_IFLNK:
            line += f" -> {bytes(body).decode('utf-8', 'replace')}"
        out.write(line + "\n")
    return 0
