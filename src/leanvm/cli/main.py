"""leanvm's command line: `leanvm run`, `leanvm version`. Errors end in one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leanvm import __version__
from leanvm.errors import LeanvmError

DESCRIPTION = "leanvm: a lean virtual machine monitor on Linux KVM"


def build_parser() -> argparse.ArgumentParser:
    from leanvm.cli import flash, memmap, run, version

    parser = argparse.ArgumentParser(prog="leanvm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"leanvm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parser(sub)
    memmap.add_parser(sub)
    flash.add_parser(sub)
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
