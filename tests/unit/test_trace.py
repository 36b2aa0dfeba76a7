"""Trace events, line recognition, trace files (JSON lines and Chrome/Perfetto JSON), the
text table, the SVG chart and the diff; the probe device under random traffic."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from leanvm.devices.probe import ARG, FIRE, MAGIC, MAX_ARGS, ProbePort
from leanvm.errors import ConfigError
from leanvm.machine.tracing import BootTrace
from leanvm.trace.events import Event, Tracer
from leanvm.trace.files import read_trace, write_trace
from leanvm.trace.phases import FIRMWARE_LINES, LineMatcher
from leanvm.trace.render import diff, svg, table

ORIGIN = 1_000_000_000


def sample() -> list[Event]:
    return [
        Event(ORIGIN, "vmm", "process start"),
        Event(ORIGIN + 36_000_000, "vmm", "first vCPU entry"),
        Event(ORIGIN + 38_000_000, "firmware", "BIOS post", args={"line": "SeaBIOS (version x)"}),
        Event(ORIGIN + 38_500_000, "debugcon", "SeaBIOS (version x)"),
        Event(ORIGIN + 181_000_000, "fw_cfg", "copy kernel", 1_190_000_000, {"bytes": 5, "dma": True}),
        Event(ORIGIN + 1_371_000_000, "probe", "my probe", args={"id": 7, "args": [1, 2]}),
        Event(ORIGIN + 2_490_000_000, "vmm", "stop"),
    ]


def test_tracer_caps_its_memory() -> None:
    tracer = Tracer(True, limit=3)
    for i in range(5):
        tracer.instant("probe", f"p{i}", ts=10 - i)
    tracer.span("fw_cfg", "copy", 1, 2)
    assert len(tracer.events) == 3 and tracer.dropped == 3 and len(tracer) == 3
    assert [e.ts for e in tracer.sorted_events()] == [8, 9, 10]


def test_lines_mark_each_phase_once() -> None:
    matcher = LineMatcher(FIRMWARE_LINES)
    assert matcher.match("SeaBIOS (version 1.16.2)") == "BIOS post"
    assert matcher.match("SeaBIOS (version 1.16.2)") is None  # the banner comes twice
    assert matcher.match("Booting from ROM...") == "BIOS boot OS"
    assert matcher.match("unrelated") is None


def test_boot_trace_stamps_lines_at_their_first_byte() -> None:
    tracer = Tracer(True)
    boot = BootTrace(tracer, {7: "seven"})
    before = time.monotonic_ns()
    boot.debugcon(b"Seabios")
    started = tracer.events == []  # nothing is recorded until the line ends
    time.sleep(0.01)
    middle = time.monotonic_ns()
    boot.debugcon(b"x\n")
    boot.serial(b"[    0.000000] Linux version 6.1\r\n")
    boot.probe(7, (1,))
    boot.probe(99, ())
    names = [(e.cat, e.name) for e in tracer.events]
    assert started and ("debugcon", "Seabiosx") in names
    assert ("guest", "first serial byte") in names and ("guest", "kernel banner") in names
    assert ("probe", "seven") in names and ("probe", "probe 99") in names
    banner = [e for e in tracer.events if e.name == "kernel banner"][0]
    line = [e for e in tracer.events if e.cat == "console"][0]
    assert banner.ts == line.ts and line.name == "[    0.000000] Linux version 6.1"
    firmware = [e for e in tracer.events if e.name == "Seabiosx"][0]
    assert before <= firmware.ts < middle  # stamped at its first byte, not at its newline


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_trace_files_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"boot{suffix}"
    write_trace(path, sample(), ORIGIN, dropped=2)
    events, origin = read_trace(path)
    assert origin == ORIGIN
    assert [(e.ts, e.cat, e.name, e.dur) for e in events] == \
        [(e.ts, e.cat, e.name, e.dur) for e in sample()]
    assert events[5].args == {"id": 7, "args": [1, 2]}


def test_chrome_trace_event_format(tmp_path: Path) -> None:
    path = tmp_path / "boot.json"
    write_trace(path, sample(), ORIGIN)
    data = json.loads(path.read_text())  # a real JSON parser, as Perfetto's importer is
    assert data["displayTimeUnit"] == "ms"
    events = data["traceEvents"]
    for item in events:
        assert item["ph"] in ("M", "i", "X") and isinstance(item["pid"], int)
        assert isinstance(item["tid"], int) and isinstance(item["name"], str)
        if item["ph"] != "M":
            assert isinstance(item["ts"], (int, float)) and item["ts"] >= 0
        if item["ph"] == "X":
            assert item["dur"] >= 0
        if item["ph"] == "i":
            assert item["s"] in ("t", "p", "g")
    copy = [e for e in events if e["name"] == "copy kernel" and e["ph"] == "X"]
    assert copy and copy[0]["ts"] == 181000.0 and copy[0]["dur"] == 1190000.0
    phases = [e for e in events if e.get("cat") == "phase"]
    assert [p["name"] for p in phases] == ["process start", "first vCPU entry", "BIOS post",
                                           "my probe"]
    assert all(a["ts"] + a["dur"] == pytest.approx(b["ts"]) for a, b in zip(phases, phases[1:]))


def test_table_and_svg_and_diff() -> None:
    text = table(sample(), ORIGIN)
    lines = text.splitlines()
    assert lines[1].split()[-2:] == ["process", "start"]
    assert "  0.036000  0.036000  vmm       first vCPU entry" in text
    assert "SeaBIOS (version x)" not in text  # a detail line: only with everything=True
    assert "SeaBIOS (version x)" in table(sample(), ORIGIN, everything=True)
    assert "copy kernel (bytes=5, dma=True) [1190.000 ms]" in text
    root = ET.fromstring(svg(sample(), ORIGIN))
    assert root.tag.endswith("svg")
    bars = root.findall("{http://www.w3.org/2000/svg}g[@class='row']")
    assert len(bars) == 6  # the debug-console line is not a phase: it has a track below
    later = [e._replace(ts=e.ts + 5_000_000) if e.name == "stop" else e for e in sample()]
    compared = diff(sample(), ORIGIN, later[:-2] + [later[-1]], ORIGIN)
    assert "+5.0  stop" in compared
    assert [l for l in compared.splitlines() if l.endswith("my probe")][0].split()[1] == "-"


def test_bad_trace_files_are_one_line_errors(tmp_path: Path) -> None:
    cases = {"missing.jsonl": None, "empty.jsonl": "", "junk.json": "{not json",
             "other.jsonl": '{"hello": 1}\n', "bad.json": '{"traceEvents": [{"ph": "i"}]}'}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match=name):
            read_trace(path)


def test_probe_port_protocol() -> None:
    fired = []
    port = ProbePort(lambda ident, args: fired.append((ident, args)))
    assert port.read(FIRE, 4) == MAGIC
    port.write(FIRE, 4, 1001)
    for value in range(MAX_ARGS + 2):
        port.write(ARG, 4, value)
    port.write(FIRE, 8, 1 << 40)
    port.write(FIRE, 4, 5)
    assert fired == [(1001, ()), (1 << 40, (0, 1, 2, 3)), (5, ())]
    assert port.dropped_args == 2 and port.fired == 3


@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4, 8]), st.booleans(),
                          st.integers(0, (1 << 64) - 1)), max_size=200))
def test_probe_port_random_traffic(ops: list[tuple[int, int, bool, int]]) -> None:
    fired: list[tuple[int, tuple[int, ...]]] = []
    port = ProbePort(lambda ident, args: fired.append((ident, args)))
    for offset, size, write, value in ops:
        if write:
            port.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= port.read(offset, size) < 1 << (8 * size)
    assert all(len(args) <= MAX_ARGS for _, args in fired)
