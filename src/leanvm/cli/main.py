"""leanvm's command line: `leanvm run`, `leanvm version`. Errors end in one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leanvm import __version__
from leanvm.errors import LeanvmError

DESCRIPTION = "leanvm: a lean virtual machine monitor on Linux KVM"


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter sized with os.get_terminal_size: argparse builds one for every
    add_argument, and its own sizing imports shutil (with bz2, lzma, zlib), 4 ms of start-up."""

    def __init__(self, prog: str) -> None:
        import os

        try:
            width = os.get_terminal_size().columns
        except OSError:
            width = 80
        super().__init__(prog, width=max(width - 2, 40))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    from leanvm.cli import flash, initrd, kernel, memmap, run, trace, version

    parser = _Parser(prog="leanvm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"leanvm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run.add_parser(sub)
    memmap.add_parser(sub)
    flash.add_parser(sub)
    trace.add_parser(sub)
    kernel.add_parser(sub)
    initrd.add_parser(sub)
    version.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except LeanvmError as exc:
        print(f"leanvm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
