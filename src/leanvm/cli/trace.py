"""`leanvm trace show FILE [--svg OUT] [--all]` and `leanvm trace diff A B`: saved boot
timelines (written by `leanvm run --trace FILE`) as text, an SVG chart, or a comparison."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.trace.files import Loaded


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


def _load(path: Path) -> "Loaded":
    """The trace in ``path``; a note on stderr names the events it holds that leanvm does not
    show (a trace from another tool: counters, flows, ...)."""
    import json

    from leanvm.trace.files import load_trace

    loaded = load_trace(path)
    if loaded.skipped:
        count = sum(loaded.skipped.values())
        kinds = ", ".join(f"{json.dumps(kind)[:12]} x{n}" for kind, n in loaded.skipped.items())
        print(f"leanvm: note: {path}: skipped {count} event{'s' if count != 1 else ''} "
              f"leanvm does not show (by \"ph\": {kinds})", file=sys.stderr)
    return loaded


def handle_show(args: argparse.Namespace) -> int:
    from leanvm.errors import ConfigError
    from leanvm.trace.render import svg, table

    events, origin, _ = _load(args.file)
    sys.stdout.write(table(events, origin, everything=args.all))
    if args.svg:
        try:
            args.svg.write_text(svg(events, origin))
        except OSError as exc:
            raise ConfigError(f"{args.svg}: cannot write the SVG ({exc.strerror})") from None
    return 0


def handle_diff(args: argparse.Namespace) -> int:
    from leanvm.trace.render import diff

    a, origin_a, _ = _load(args.a)
    b, origin_b, _ = _load(args.b)
    sys.stdout.write(diff(a, origin_a, b, origin_b))
    return 0
