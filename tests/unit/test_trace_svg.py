"""The SVG timeline, read back with xml.etree: an opaque page, a legend of the categories
drawn, round axis ticks, tooltips for every cut label, RIP sample tracks, and text from a
guest or a file kept as data."""

from __future__ import annotations

import random
import re
from collections import Counter
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from leanvm.cli.main import main
from leanvm.trace import render
from leanvm.trace.events import Event
from leanvm.trace.files import write_trace
from leanvm.trace.render import CUT, FUNCTION_COLOURS, LEFT, RIGHT, rows, svg, ticks

NS = "{http://www.w3.org/2000/svg}"
ORIGIN = 1_000_000_000
TICK = re.compile(r"^(\d+) (ns|µs|ms|s)$")
UNITS = {"ns": 1, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def boot() -> list[Event]:
    return [
        Event(ORIGIN, "vmm", "process start"),
        Event(ORIGIN + 36_000_000, "vmm", "first vCPU entry"),
        Event(ORIGIN + 38_000_000, "firmware", "BIOS post", args={"line": "SeaBIOS (version x)"}),
        Event(ORIGIN + 38_500_000, "debugcon", "SeaBIOS (version x)"),
        Event(ORIGIN + 40_000_000, "fw_cfg-item", "read etc/e820", 1000, {"bytes": 20}),
        Event(ORIGIN + 181_000_000, "fw_cfg", "copy kernel", 90_000_000, {"bytes": 5}),
        Event(ORIGIN + 300_000_000, "console", "Linux version 6.1"),
        Event(ORIGIN + 300_000_000, "guest", "kernel banner", args={"line": "Linux version 6.1"}),
        Event(ORIGIN + 371_000_000, "probe", "my probe", args={"id": 7}),
        Event(ORIGIN + 402_000_000, "vmm", "stop"),
    ]


def parse(events: list[Event], origin: int = ORIGIN) -> ET.Element:
    text = svg(events, origin)
    text.encode("utf-8")  # writable as the UTF-8 it declares
    return ET.fromstring(text)


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return root.findall(f".//{NS}g[@class='{cls}']")


def title(group: ET.Element) -> str:
    found = group.find(f"{NS}title")
    assert found is not None
    return found.text or ""


def words(element: ET.Element) -> str:
    return "".join(element.itertext())


def test_the_page_is_opaque() -> None:
    root = parse(boot())
    background = root[0]
    assert background.tag == f"{NS}rect" and background.get("class") == "background"
    assert (background.get("x"), background.get("y")) == ("0", "0")
    assert (background.get("width"), background.get("height")) == \
        (root.get("width"), root.get("height"))
    assert re.fullmatch(r"#[0-9a-f]{6}", background.get("fill", ""))
    assert background.get("opacity") is None and background.get("fill-opacity") is None


def test_the_legend_names_the_categories_drawn_in_their_colours() -> None:
    events = boot() + [Event(ORIGIN + 390_000_000, "other-tool", "foreign")]
    root = parse(events)
    legend = {g.get("data-key"): g.find(f"{NS}rect").get("fill")  # type: ignore[union-attr]
              for g in groups(root, "legend") if g.get("data-legend") == "category"}
    drawn = {e.cat for e in rows(events)} | {"console", "debugcon"}  # the two line tracks
    assert set(legend) == drawn and "fw_cfg-item" not in legend
    assert len(set(legend.values())) == len(legend)  # one colour each
    for row in groups(root, "row"):
        assert row.find(f"{NS}rect").get("fill") == legend[row.get("data-category")]  # type: ignore[union-attr]
    assert not [g for g in groups(root, "legend") if g.get("data-legend") == "function"]


@given(st.integers(1, 10**13))
def test_tick_steps_are_1_2_5_in_whole_units(total: int) -> None:
    step, unit, name = ticks(total)
    mantissa = step
    while mantissa % 10 == 0:
        mantissa //= 10
    assert mantissa in (1, 2, 5) and step % unit == 0 and UNITS[name] == unit
    assert unit * 1000 > step or name == "s"  # the largest unit that is whole
    assert total / step <= 6 and (total < 6 or total / step >= 2.4)


@pytest.mark.parametrize("total", [7, 350_000, 343_700_000, 5_900_000_000, 2_700_000_000_000])
def test_axis_labels_are_round_numbers(total: int) -> None:
    root = parse([Event(ORIGIN, "vmm", "start"), Event(ORIGIN + total, "vmm", "stop")])
    labels = [words(t) for t in root.iter(f"{NS}text") if t.get("class") == "tick"]
    values = []
    for label in labels:
        match = TICK.match(label)
        assert match, label
        values.append(int(match[1]) * UNITS[match[2]])
    assert values[0] == 0 and len(values) >= 3 and values[-1] >= total
    steps = {b - a for a, b in zip(values, values[1:])}
    assert len(steps) == 1
    step = steps.pop()
    assert str(step).rstrip("0") in ("1", "2", "5")
    xs = [float(t.get("x", 0)) for t in root.iter(f"{NS}text") if t.get("class") == "tick"]
    assert xs[0] == pytest.approx(LEFT) and xs[-1] == pytest.approx(960 - RIGHT)


def test_every_cut_text_has_its_full_text_as_a_tooltip() -> None:
    long_name = "a probe with a name far longer than the label column: " + "x" * 60 + " end"
    long_function = "a_kernel_function_with_a_very_long_name_indeed"
    events = boot() + [Event(ORIGIN + 380_000_000, "probe", long_name, args={"id": 9}),
                       Event(ORIGIN + 390_000_000, "a category name longer than thirty-two "
                                                   "characters", "x"),
                       Event(ORIGIN + 395_000_000, "sample", long_function)]
    root = parse(events)
    parents = {child: parent for parent in root.iter() for child in parent}
    cut = [t for t in root.iter(f"{NS}text") if "…" in words(t)]
    assert len(cut) >= 3  # the probe row, the category and the function in the legends
    for text in cut:
        group = parents[text]
        assert group.tag == f"{NS}g", words(text)
        before, after = words(text).split("…")
        assert before in title(group) and after in title(group)
    tooltips = [title(g) for g in root.iter(f"{NS}g") if g.find(f"{NS}title") is not None]
    assert any(long_name in t for t in tooltips) and any(long_function in t for t in tooltips)
    assert not [t for t in root.iter(f"{NS}text") if long_name in words(t)]
    assert all(len(words(t)) <= CUT for t in root.iter(f"{NS}text")
               if t.get("text-anchor") == "end")


def sample_counts(track_marks: list[ET.Element]) -> int:
    return sum(int(re.search(r": (\d+) samples?: ", title(g))[1])  # type: ignore[index]
               for g in track_marks)


def test_rip_samples_make_a_track_per_vcpu_coloured_by_function() -> None:
    rng = random.Random(7)
    functions = [f"function_{n}" for n in range(12)]
    samples = [Event(ORIGIN + 40_000_000 + n * 17_000, "sample",
                     rng.choices(functions, weights=range(12, 0, -1))[0],
                     args={"rip": "0x1000", "vcpu": n % 2}) for n in range(20_000)]
    root = parse(sorted(boot() + samples, key=lambda e: e.ts))
    tracks = [title(g) for g in groups(root, "track")]
    assert tracks == ["debug console lines", "serial console lines", "RIP samples, vCPU 0",
                      "RIP samples, vCPU 1"]
    marks = groups(root, "sample")
    assert marks and len(marks) <= 2 * (960 - LEFT - RIGHT)  # binned by pixel, not one each
    assert sample_counts(marks) == len(samples)
    legend = [g for g in groups(root, "legend") if g.get("data-legend") == "function"]
    ranked = [name for name, _ in Counter(e.name for e in samples).most_common()]
    assert [g.get("data-key") for g in legend] == ranked[:len(FUNCTION_COLOURS)] + [""]
    colours = {g.find(f"{NS}rect").get("fill") for g in legend}  # type: ignore[union-attr]
    assert {m.find(f"{NS}rect").get("fill") for m in marks} <= colours  # type: ignore[union-attr]
    for mark in marks:
        top = re.search(r"samples?: ([^ ]+) x", title(mark))[1]  # type: ignore[index]
        expected = dict(zip(ranked, FUNCTION_COLOURS)).get(top, render.OTHER_FUNCTIONS)
        assert mark.find(f"{NS}rect").get("fill") == expected  # type: ignore[union-attr]


def test_samples_without_a_vcpu_make_one_track_and_none_make_none() -> None:
    samples = [Event(ORIGIN + 50_000_000 + n * 1_000_000, "sample", "page 0x100000",
                     args={"rip": f"{0x100000 + n:#x}"}) for n in range(5)]
    root = parse(sorted(boot() + samples, key=lambda e: e.ts))
    assert [title(g) for g in groups(root, "track")][-1] == "RIP samples"
    assert sample_counts(groups(root, "sample")) == 5
    root = parse(boot())
    assert not groups(root, "sample") and "RIP samples" not in \
        [title(g) for g in groups(root, "track")]


HOSTILE = '<script>alert(1)</script> ]]> & "quoted" \x1b[31mred\x00 \ud800'


def test_guest_and_file_text_stays_data() -> None:
    events = boot() + [
        Event(ORIGIN + 310_000_000, "console", HOSTILE),
        Event(ORIGIN + 320_000_000, "probe", "</text><script>evil()</script>"),
        Event(ORIGIN + 330_000_000, "<cat & \"co\">", "]]>"),
        Event(ORIGIN + 340_000_000, "sample", "<fn>&"),
    ]
    text = svg(sorted(events, key=lambda e: e.ts), ORIGIN)
    assert "<script" not in text
    root = ET.fromstring(text)
    assert not [el for el in root.iter() if el.tag.endswith("script")]
    shown = "<script>alert(1)</script> ]]> & \"quoted\" \u241b[31mred\u2400 \ufffd"
    assert any(title(g).endswith(shown) for g in groups(root, "line"))
    assert "</text><script>evil()</script>" in [words(t) for t in root.iter(f"{NS}text")]
    assert '<cat & "co">' in [g.get("data-key") for g in groups(root, "legend")]
    assert "]]>" in [words(t) for t in root.iter(f"{NS}text")]
    assert "<fn>& (1)" in [words(t) for t in root.iter(f"{NS}text")]


def test_lines_in_one_pixel_all_show_in_its_tooltip() -> None:
    lines = [Event(ORIGIN + 300_000_000 + n, "console", f"line {n}") for n in range(50)]
    root = parse(sorted(boot() + lines, key=lambda e: e.ts))
    crowded = [title(g) for g in groups(root, "line") if "lines:" in title(g)]
    assert len(crowded) == 1 and all(f"line {n}\n" in crowded[0] + "\n" for n in range(50))


def test_rows_past_the_limit_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "MAX_ROWS", 3)
    root = parse(boot())
    assert len(groups(root, "row")) == 3
    assert f"and {len(rows(boot())) - 3} more rows, not drawn" in \
        [words(t) for t in root.iter(f"{NS}text")]


def test_empty_trace_still_draws_a_page() -> None:
    root = parse([])
    assert root[0].get("class") == "background" and len(groups(root, "row")) == 1


def test_cli_writes_the_svg_as_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "boot.json"
    write_trace(trace, boot() + [Event(ORIGIN + 395_000_000, "console", "µ-kernel ]]> <b>")],
                ORIGIN)
    out = tmp_path / "boot.svg"
    assert main(["trace", "show", str(trace), "--svg", str(out)]) == 0
    root = ET.fromstring(out.read_bytes())
    assert any(title(g).endswith("µ-kernel ]]> <b>") for g in groups(root, "line"))
    capsys.readouterr()
    assert main(["trace", "show", str(trace), "--svg", str(tmp_path / "no" / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.svg: cannot write the SVG" in err
