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
    parser = sub.add_parser(
        "trace", help="show or compare saved boot timelines",
        description="Show a saved boot timeline (written by `leanvm run --trace FILE`) as a "
                    "table or an SVG chart, or compare two boots phase by phase. Files may be "
                    "leanvm's JSON lines or Trace Event Format JSON, from leanvm or another "
                    "tool.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser(
        "show", help="print a trace as a timeline table (or draw it)",
        description="Print a trace as a table: seconds since the process start, the delta "
                    "from the row before, the category and the phase. With --svg, also draw "
                    "it: phases as bars, console lines and RIP samples as tracks of their own.")
    show.add_argument("file", type=Path, help="a trace file (JSON lines or trace-event JSON)")
    show.add_argument("--svg", type=Path, metavar="OUT",
                      help="also draw the timeline as an SVG file")
    show.add_argument("--all", action="store_true",
                      help="include every console line, fw_cfg read and RIP sample in the table")
    show.set_defaults(handler=handle_show)
    diff = verbs.add_parser(
        "diff", help="compare two boots phase by phase",
        description="Line up two boots phase by phase (phases matched by name, in order) and "
                    "print when each happened in A and B, and B - A in milliseconds.")
    diff.add_argument("a", type=Path, help="the first trace file")
    diff.add_argument("b", type=Path, help="the trace file to compare with it")
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
    from leanvm.trace.render import svg, table

    events, origin, _ = _load(args.file)
    sys.stdout.write(table(events, origin, everything=args.all))
    if args.svg:
        from leanvm.fileio import write_atomic

        write_atomic(args.svg, svg(events, origin).encode("utf-8"), "SVG")
    return 0


def handle_diff(args: argparse.Namespace) -> int:
    from leanvm.trace.render import diff

    a, origin_a, _ = _load(args.a)
    b, origin_b, _ = _load(args.b)
    sys.stdout.write(diff(a, origin_a, b, origin_b))
    return 0
