"""Show a boot timeline: a text table in the style of the 2011 boot-time sample, an SVG chart
of the phases, and a phase-by-phase comparison of two boots."""

from __future__ import annotations

from xml.sax.saxutils import escape

from leanvm.trace.events import LINE_CATEGORIES, Event


def rows(events: list[Event], everything: bool = False) -> list[Event]:
    return [e for e in events if everything or e.cat not in LINE_CATEGORIES]


def _label(e: Event) -> str:
    text = e.name
    if e.args:
        shown = {k: v for k, v in e.args.items() if k != "line"}
        if shown:
            text += " (" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
    if e.dur:
        text += f" [{e.dur / 1e6:.3f} ms]"
    return text


def table(events: list[Event], origin: int, everything: bool = False) -> str:
    """'   time   delta  category  phase' lines, seconds since the process start."""
    lines = [f"{'time (s)':>10} {'delta':>9}  {'category':9} phase"]
    previous: int | None = None
    for e in rows(events, everything):
        delta = "" if previous is None else f"{(e.ts - previous) / 1e9:9.6f}"
        lines.append(f"{(e.ts - origin) / 1e9:10.6f} {delta:>9}  {e.cat:9} {_label(e)}")
        previous = e.ts
    return "\n".join(lines) + "\n"


COLOURS = {"vmm": "#4e79a7", "firmware": "#f28e2b", "probe": "#59a14f", "fw_cfg": "#e15759",
           "guest": "#b07aa1", "debugcon": "#bab0ac", "console": "#bab0ac"}


def svg(events: list[Event], origin: int, width: int = 960) -> str:
    """A Gantt-like chart: one bar per phase, from it to the next phase (spans: their own
    length), on a time axis in milliseconds since the process start."""
    shown = rows(events)
    if not shown:
        shown = [Event(origin, "vmm", "(no events)")]
    end = max(max(e.ts + e.dur for e in shown), shown[-1].ts + 1)
    total = max(end - origin, 1)
    left, bar, top = 260, 18, 30
    scale = (width - left - 20) / total
    height = top + bar * len(shown) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="10" y="18" font-size="13">boot timeline: {total / 1e6:.1f} ms</text>']
    instants = [e for e in shown if not e.dur]
    following = {id(a): b.ts for a, b in zip(instants, instants[1:])}
    for index, e in enumerate(shown):
        y = top + index * bar
        stop = e.ts + e.dur if e.dur else following.get(id(e), e.ts)
        x = left + (e.ts - origin) * scale
        w = max((stop - e.ts) * scale, 1.5)
        colour = COLOURS.get(e.cat, "#76b7b2")
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">'
                     f'{escape(_label(e)[:40])}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{bar - 6}" '
                     f'fill="{colour}"><title>{escape(e.cat)}: {escape(_label(e))} at '
                     f'{(e.ts - origin) / 1e6:.3f} ms</title></rect>')
    axis_y = top + bar * len(shown) + 10
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" stroke="#333"/>')
    for tick in range(6):
        t = total * tick / 5
        x = left + t * scale
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">'
                     f'{t / 1e6:.0f} ms</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def diff(a: list[Event], origin_a: int, b: list[Event], origin_b: int) -> str:
    """Phase by phase: each row matched by name (and occurrence), time since start in A and
    B, and B - A. Rows only in one boot say so."""
    def keyed(events: list[Event], origin: int) -> dict[tuple[str, int], int]:
        seen: dict[str, int] = {}
        out = {}
        for e in rows(events):
            n = seen.get(e.name, 0)
            seen[e.name] = n + 1
            out[(e.name, n)] = e.ts - origin
        return out

    ka, kb = keyed(a, origin_a), keyed(b, origin_b)
    order = list(ka) + [k for k in kb if k not in ka]
    order.sort(key=lambda k: ka.get(k, kb.get(k, 0)))
    lines = [f"{'A (s)':>9} {'B (s)':>9} {'B-A (ms)':>10}  phase"]
    for key in order:
        ta, tb = ka.get(key), kb.get(key)
        name = key[0] + (f" #{key[1] + 1}" if key[1] else "")
        sa = f"{ta / 1e9:9.3f}" if ta is not None else f"{'-':>9}"
        sb = f"{tb / 1e9:9.3f}" if tb is not None else f"{'-':>9}"
        delta = f"{(tb - ta) / 1e6:+10.1f}" if ta is not None and tb is not None else f"{'':>10}"
        lines.append(f"{sa} {sb} {delta}  {name}")
    return "\n".join(lines) + "\n"
