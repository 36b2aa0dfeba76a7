"""`leanvm trace show FILE [--svg OUT] [--all]` and `leanvm trace diff A B`: saved boot
timelines (written by `leanvm run --trace FILE`) as text, an SVG chart, or a comparison."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("trace", help="show or compare saved boot timelines",
                            description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="print a trace as a timeline table (or draw it)")
    show.add_argument("file", type=Path)
    show.add_argument("--svg", type=Path, metavar="OUT", help="also draw the phases as SVG")
    show.add_argument("--all", action="store_true",
                      help="include every console line and fw_cfg read")
    show.set_defaults(handler=handle_show)
    diff = verbs.add_parser("diff", help="compare two boots phase by phase")
    diff.add_argument("a", type=Path)
    diff.add_argument("b", type=Path)
    diff.set_defaults(handler=handle_diff)


def handle_show(args: argparse.Namespace) -> int:
    from leanvm.errors import ConfigError
    from leanvm.trace.files import read_trace
    from leanvm.trace.render import svg, table

    events, origin = read_trace(args.file)
    sys.stdout.write(table(events, origin, everything=args.all))
    if args.svg:
        try:
            args.svg.write_text(svg(events, origin))
        except OSError as exc:
            raise ConfigError(f"{args.svg}: cannot write the SVG ({exc.strerror})") from None
    return 0


def handle_diff(args: argparse.Namespace) -> int:
    from leanvm.trace.files import read_trace
    from leanvm.trace.render import diff

    a, origin_a = read_trace(args.a)
    b, origin_b = read_trace(args.b)
    sys.stdout.write(diff(a, origin_a, b, origin_b))
    return 0
