"""Show a boot timeline: a text table in the style of the 2011 boot-time sample, an SVG chart
(the phases as bars, console lines and RIP samples on tracks below them), and a
phase-by-phase comparison of two boots."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
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
           "guest": "#b07aa1", "console": "#9c755f", "debugcon": "#bab0ac"}
SPARE_COLOURS = ("#76b7b2", "#edc948", "#ff9da7", "#8cd17d", "#86bcb6", "#d4a6c8")  # others
FUNCTION_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                    "#e377c2", "#17becf")  # the most-sampled functions, in order
OTHER_FUNCTIONS = "#c7c7c7"
LINE_TRACKS = {"debugcon": "debug console lines", "console": "serial console lines"}
BACKGROUND = "#ffffff"
LEFT, RIGHT, ROW, TOP = 270, 20, 18, 28  # label column, margin, row height, title band (px)
CUT = 40  # characters of a row label; longer ones end in "…" and the full text is the tooltip
CHAR = 6.6  # px per character of 11 px sans-serif, generously
MAX_ROWS = 2000  # a trace from another tool may hold far more; the rest is counted, not drawn
TICK_UNITS = ((1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "µs"), (1, "ns"))

# XML 1.0 allows neither these characters nor escapes of them: a guest's console line with a
# terminal colour code (ESC) would make the file unreadable. C0 controls become their
# Unicode control pictures (ESC shows as U+241B), the rest U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """Text (a guest's, a file's) as XML character data or an attribute value, never markup."""
    text = _NOT_XML.sub(lambda m: chr(0x2400 + ord(m[0])) if m[0] < " " else "\ufffd", text)
    return escape(text, {'"': "&quot;"})


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def ticks(total: int) -> tuple[int, int, str]:
    """(step, unit, unit name) for an axis of ``total`` ns: a 1-2-5 step giving at most six
    intervals, in the largest unit it is a whole number of (ns, µs, ms or s)."""
    want = max(total / 6, 1)
    power = 10 ** max(int(math.floor(math.log10(want))), 0)
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= want)
    unit, name = next((u, n) for u, n in TICK_UNITS if step >= u)
    return step, unit, name


def _duration(ns: int) -> str:
    return f"{ns / 1e9:.3g} s" if ns >= 10**9 else f"{ns / 1e6:.4g} ms"


class _Chart:
    """Places things on the page: x from a time, y row by row, and the SVG text."""

    def __init__(self, origin: int, span: int, width: int) -> None:
        self.origin, self.width = origin, width
        self.scale = (width - LEFT - RIGHT) / span
        self.parts: list[str] = []

    def x(self, ts: int) -> float:
        return LEFT + (ts - self.origin) * self.scale

    def add(self, part: str) -> None:
        self.parts.append(part)

    def label(self, y: float, text: str, **extra: str) -> str:
        attrs = "".join(f' {k}="{_xml(v)}"' for k, v in extra.items())
        return (f'<text x="{LEFT - 8}" y="{y + 13}" text-anchor="end"{attrs}>'
                f'{_xml(_cut(text, CUT))}</text>')


def _colours(categories: list[str]) -> dict[str, str]:
    spare = iter(SPARE_COLOURS * (len(categories) // len(SPARE_COLOURS) + 1))
    return {c: COLOURS[c] if c in COLOURS else next(spare) for c in categories}


def _legend(chart: _Chart, y: float, kind: str, heading: str,
            entries: list[tuple[str, str, str, str]]) -> float:
    """A row of (key, name, note, colour) swatches after a heading, wrapped at the page
    width; returns the y below it. Each entry is a <g class="legend" data-legend=KIND
    data-key=KEY> with "name (note)" as its tooltip; a long name is cut, never the note."""
    x = 10.0
    chart.add(f'<text x="{x}" y="{y + 10}" font-weight="bold">{_xml(heading)}</text>')
    x += CHAR * len(heading) + 12
    for key, name, note, colour in entries:
        label = f"{name} ({note})" if note else name
        shown = f"{_cut(name, 28)} ({note})" if note else _cut(name, 28)
        needed = 16 + CHAR * len(shown) + 14
        if x + needed > chart.width - RIGHT and x > 10:
            x, y = 10.0 + 24, y + 16
        chart.add(f'<g class="legend" data-legend="{kind}" data-key="{_xml(key)}">'
                  f'<title>{_xml(label)}</title>'
                  f'<rect x="{x:.1f}" y="{y + 1}" width="11" height="11" fill="{colour}"/>'
                  f'<text x="{x + 16:.1f}" y="{y + 10}">{_xml(shown)}</text></g>')
        x += needed
    return y + 20


def _bins(chart: _Chart, events: list[Event]) -> list[list[Event]]:
    """Events grouped by the pixel column they fall in (a million samples make at most a
    few hundred marks)."""
    out: dict[int, list[Event]] = {}
    for e in events:
        out.setdefault(int(chart.x(e.ts)), []).append(e)
    return [out[column] for column in sorted(out)]


def _at(chart: _Chart, ts: int) -> str:
    return f"{(ts - chart.origin) / 1e6:.3f} ms"


def _line_track(chart: _Chart, y: float, lines: list[Event], colour: str) -> None:
    for group in _bins(chart, lines):
        text = "\n".join(e.name for e in group)
        when = _at(chart, group[0].ts)
        title = f"{when}: {text}" if len(group) == 1 else f"{when}, {len(group)} lines:\n{text}"
        chart.add(f'<g class="line"><title>{_xml(title)}</title>'
                  f'<rect x="{chart.x(group[0].ts):.1f}" y="{y + 3}" width="1.5" '
                  f'height="{ROW - 6}" fill="{colour}"/></g>')


def _sample_track(chart: _Chart, y: float, samples: list[Event],
                  colours: dict[str, str]) -> None:
    """Runs of pixel columns whose most-sampled function is the same: one mark each, in that
    function's colour; the tooltip counts every function sampled in the run."""
    runs: list[tuple[int, int, str, Counter[str]]] = []  # first ts, last ts, function, counts
    last_column = -2
    for group in _bins(chart, samples):
        counts = Counter(e.name for e in group)
        top = counts.most_common(1)[0][0]
        column = int(chart.x(group[0].ts))
        if runs and runs[-1][2] == top and column == last_column + 1:
            first, _, _, total = runs[-1]
            total.update(counts)
            runs[-1] = (first, group[-1].ts, top, total)
        else:
            runs.append((group[0].ts, group[-1].ts, top, counts))
        last_column = column
    for first, last, top, counts in runs:
        n = sum(counts.values())
        spread = _at(chart, first) + (f" to {_at(chart, last)}" if last != first else "")
        names = ", ".join(f"{name} x{count}" for name, count in counts.most_common())
        title = f"{spread}: {n} sample{'s' if n != 1 else ''}: {names}"
        x = chart.x(first)
        chart.add(f'<g class="sample"><title>{_xml(title)}</title>'
                  f'<rect x="{x:.1f}" y="{y + 2}" width="{max(chart.x(last) - x + 1, 1.5):.1f}" '
                  f'height="{ROW - 4}" fill="{colours.get(top, OTHER_FUNCTIONS)}"/></g>')


def _grid(chart: _Chart, top: float, axis_y: float, span: int, total: int) -> None:
    """Light vertical lines at every tick, then the axis with labels in whole units."""
    step, unit, unit_name = ticks(total)
    for tick in range(0, span + 1, step):
        x = chart.x(chart.origin + tick)
        chart.add(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y}" stroke="#dddddd"/>'
                  f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" '
                  f'stroke="#333333"/>')
        chart.add(f'<text class="tick" x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">'
                  f'{tick // unit} {unit_name}</text>')
    chart.add(f'<line x1="{LEFT}" y1="{axis_y}" x2="{chart.width - RIGHT}" y2="{axis_y}" '
              f'stroke="#333333"/>')


def _phase_rows(chart: _Chart, top: float, phases: list[Event], colours: dict[str, str]) -> None:
    """A bar per phase, from it to the next phase (a span: its own length), on stripes."""
    for index in range(0, len(phases), 2):
        chart.add(f'<rect x="{LEFT - 4}" y="{top + index * ROW}" height="{ROW}" '
                  f'width="{chart.width - LEFT - RIGHT + 8}" fill="#f4f4f4"/>')
    instants = [e for e in phases if not e.dur]
    following = {id(a): b.ts for a, b in zip(instants, instants[1:])}
    for index, e in enumerate(phases):
        y = top + index * ROW
        stop = e.ts + e.dur if e.dur else following.get(id(e), e.ts)
        width = max((stop - e.ts) * chart.scale, 1.5)
        chart.add(f'<g class="row" data-category="{_xml(e.cat)}"><title>{_xml(e.cat)}: '
                  f'{_xml(_label(e))} at {_at(chart, e.ts)}</title>{chart.label(y, _label(e))}'
                  f'<rect x="{chart.x(e.ts):.1f}" y="{y + 3}" width="{width:.1f}" '
                  f'height="{ROW - 6}" fill="{colours[e.cat]}"/></g>')


def _function_legend(chart: _Chart, y: float, ranked: list[tuple[str, int]]) -> float:
    shown = ranked[:len(FUNCTION_COLOURS)]
    entries = [(name, name, str(count), colour)
               for (name, count), colour in zip(shown, FUNCTION_COLOURS)]
    if len(ranked) > len(shown):
        rest = sum(count for _, count in ranked[len(shown):])
        entries.append(("", f"{len(ranked) - len(shown)} other functions", str(rest),
                        OTHER_FUNCTIONS))
    return _legend(chart, y, "function", "RIP samples by function:", entries)


def _samples_by_vcpu(events: list[Event]) -> "dict[int | None, list[Event]]":
    samples: dict[int | None, list[Event]] = {}
    for e in events:
        if e.cat == "sample":
            vcpu = (e.args or {}).get("vcpu")
            known = isinstance(vcpu, int) and not isinstance(vcpu, bool)
            samples.setdefault(vcpu if known else None, []).append(e)
    return samples


def _tracks(chart: "_Chart", lines: dict[str, list[Event]], colours: dict[str, str],
            samples: "dict[int | None, list[Event]]", functions: dict[str, str]
            ) -> list[tuple[str, Callable[[float], None]]]:
    """(name, draw at y) per console track, then per vCPU's RIP samples."""
    tracks: list[tuple[str, Callable[[float], None]]] = [
        (LINE_TRACKS[cat], partial(_line_track, chart, lines=group, colour=colours[cat]))
        for cat, group in lines.items()]
    for vcpu in sorted(samples, key=lambda v: -1 if v is None else v):  # a track per vCPU
        tracks.append(("RIP samples" if vcpu is None else f"RIP samples, vCPU {vcpu}",
                       partial(_sample_track, chart, samples=samples[vcpu], colours=functions)))
    return tracks


def svg(events: list[Event], origin: int, width: int = 960) -> str:
    """A Gantt-like chart on a white page: one bar per phase, from it to the next phase
    (spans: their own length); below them a track of ticks per console (each line's text is
    its tooltip) and per vCPU a track of RIP samples coloured by function; legends for the
    category and function colours; an axis of 1-2-5 steps in whole ns, µs, ms or s. Text
    that comes from a guest or a file is escaped, and any label cut short has the full text
    as a tooltip (<title>). Samples make one track per vCPU their args name ("vcpu"), and
    one track for those that name none."""
    phases = rows(events)
    lines = {cat: [e for e in events if e.cat == cat] for cat in LINE_TRACKS}
    lines = {cat: found for cat, found in lines.items() if found}
    samples = _samples_by_vcpu(events)
    drawn = phases + [e for group in [*lines.values(), *samples.values()] for e in group]
    if not drawn:
        phases = drawn = [Event(origin, "vmm", "(no events)")]
    start = min(origin, min(e.ts for e in drawn))
    total = max(max(e.ts + e.dur for e in drawn) - start, 1)
    step = ticks(total)[0]
    span = -(-total // step) * step  # the axis ends on a tick
    chart = _Chart(start, span, width)
    hidden = max(len(phases) - MAX_ROWS, 0)
    phases = phases[:MAX_ROWS]

    categories = list(dict.fromkeys([e.cat for e in phases] + list(lines)))
    colours = _colours(categories)
    y = _legend(chart, TOP + 4, "category", "categories:",
                [(c, c or "(no category)", "", colours[c]) for c in categories])
    ranked = Counter(e.name for group in samples.values() for e in group).most_common()
    functions = dict(zip((name for name, _ in ranked), FUNCTION_COLOURS))
    if ranked:
        y = _function_legend(chart, y, ranked)
    tracks = _tracks(chart, lines, colours, samples, functions)

    top = y + 4
    y = top + ROW * len(phases)
    axis_y = y + ROW * ((1 if hidden else 0) + len(tracks)) + (8 if tracks else 0) + 6
    _grid(chart, top, axis_y, span, total)
    _phase_rows(chart, top, phases, colours)
    if hidden:
        chart.add(f'<text x="{LEFT - 8}" y="{y + 13}" text-anchor="end" font-style="italic">'
                  f'and {hidden} more rows, not drawn</text>')
        y += ROW
    if tracks:
        chart.add(f'<line x1="10" y1="{y + 4}" x2="{width - RIGHT}" y2="{y + 4}" '
                  f'stroke="#999999"/>')
        y += 8
    for name, draw in tracks:
        chart.add(f'<g class="track"><title>{_xml(name)}</title>'
                  f'{chart.label(y, name, **{"font-style": "italic"})}</g>')
        draw(y)
        y += ROW
    return _document(chart, width, int(axis_y + 30), total)


def _document(chart: "_Chart", width: int, height: int, total: int) -> str:
    head = ['<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" '
            f'fill="#222222">',
            f'<rect class="background" x="0" y="0" width="{width}" height="{height}" '
            f'fill="{BACKGROUND}"/>',
            f'<text x="10" y="18" font-size="13" font-weight="bold">boot timeline: '
            f'{_duration(total)}</text>']
    return "\n".join(head + chart.parts + ["</svg>"]) + "\n"


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
