"""Reading trace files: leanvm's JSON lines, Trace Event Format JSON as an object or a bare
array (the format allows both), traces from other tools, and one-line errors for anything
that is not a trace."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from leanvm.cli.main import main
from leanvm.errors import ConfigError
from leanvm.trace.events import Event
from leanvm.trace.files import load_trace, read_trace, write_trace

ORIGIN = 5_000_000_000


def boot() -> list[Event]:
    return [
        Event(ORIGIN, "vmm", "process start"),
        Event(ORIGIN + 2_000_000, "vmm", "first vCPU entry"),
        Event(ORIGIN + 2_500_000, "console", "Hello"),
        Event(ORIGIN + 3_000_000, "fw_cfg", "copy kernel", 1_500_000, {"bytes": 9, "dma": True}),
        Event(ORIGIN + 6_000_000, "sample", "page 0x100000", args={"rip": "0x100004"}),
        Event(ORIGIN + 9_000_000, "vmm", "stop"),
    ]


def relative(events: list[Event], origin: int) -> list[tuple[int, str, str, int]]:
    return [(e.ts - origin, e.cat, e.name, e.dur) for e in events]


def test_the_bare_array_form_of_a_leanvm_trace_reads_like_the_object_form(tmp_path: Path) -> None:
    whole = tmp_path / "boot.json"
    write_trace(whole, boot(), ORIGIN)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(json.loads(whole.read_text())["traceEvents"]))
    events, origin = read_trace(bare)
    assert relative(events, origin) == relative(boot(), ORIGIN)  # no phase blocks doubled
    assert [e.args for e in events] == [e.args for e in read_trace(whole)[0]]
    text = bare.read_text()
    cut = tmp_path / "cut.json"  # the closing bracket is optional in the array form
    cut.write_text(text[:-1] + ",\n")
    assert relative(*read_trace(cut)) == relative(boot(), ORIGIN)


def test_json_lines_keep_their_origin(tmp_path: Path) -> None:
    path = tmp_path / "boot.trace"
    write_trace(path, boot(), ORIGIN, dropped=3)
    loaded = load_trace(path)
    assert loaded.origin == ORIGIN and loaded.events == boot() and loaded.skipped == {}
    header_only = tmp_path / "nothing.jsonl"
    header_only.write_text('{"leanvm_trace": 1, "origin_ns": 7, "dropped": 0}\n')
    assert load_trace(header_only) == ([], 7, {})


def test_a_trace_from_another_tool_is_shown_or_skipped(tmp_path: Path) -> None:
    """Chrome-style events leanvm never writes: begin/end pairs become spans, unknown kinds
    are counted as skipped, a missing category is empty, tid 2 is not leanvm's phase track."""
    items: list[dict[str, Any]] = [
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "main"}},
        {"ph": "B", "name": "load", "cat": "io", "ts": 1000, "pid": 7, "tid": 2},
        {"ph": "B", "name": "inner", "cat": "io", "ts": 1500, "pid": 7, "tid": 2},
        {"ph": "E", "ts": 1700, "pid": 7, "tid": 2, "args": {"ok": True}},
        {"ph": "E", "ts": 2000, "pid": 7, "tid": 2},
        {"ph": "E", "ts": 2100, "pid": 7, "tid": 3},  # an end with no begin
        {"ph": "B", "name": "never ended", "ts": 2200, "pid": 7, "tid": 3},
        {"ph": "X", "name": "phase-like", "cat": "phase", "ts": 3000, "dur": 10, "pid": 7,
         "tid": 2},
        {"ph": "I", "name": "mark", "ts": 3500.5, "pid": 7, "tid": 1, "s": "g"},
        {"ph": "C", "name": "heap", "ts": 3600, "pid": 7, "args": {"bytes": 10}},
        {"ph": "C", "name": "heap", "ts": 3700, "pid": 7, "args": {"bytes": 20}},
        {"ph": "s", "name": "flow", "id": 1, "ts": 3800, "pid": 7, "tid": 1},
        {"ph": "X", "name": "no category", "ts": 4000, "pid": 7, "tid": 1},
    ]
    path = tmp_path / "chrome.json"
    path.write_text(json.dumps({"traceEvents": items, "displayTimeUnit": "ns"}))
    loaded = load_trace(path)
    assert loaded.origin == 1_000_000  # no origin in the file: the first event's time
    assert relative(loaded.events, loaded.origin) == [
        (0, "io", "load", 1_000_000), (500_000, "io", "inner", 200_000),
        (2_000_000, "phase", "phase-like", 10_000), (2_500_500, "", "mark", 0),
        (3_000_000, "", "no category", 0)]
    assert loaded.events[1].args == {"ok": True}
    assert loaded.skipped == {"C": 2, "s": 1, "E": 1, "B": 1}


def test_cli_shows_an_array_trace_and_notes_what_it_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"ph": "i", "name": "hello", "cat": "app", "ts": 0, "s": "t"},
                                {"ph": "i", "name": "bye", "cat": "app", "ts": 1500},
                                {"ph": "C", "name": "n", "ts": 1, "args": {"v": 1}}]))
    assert main(["trace", "show", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "0.001500  0.001500  app       bye" in out
    assert err.count("\n") == 1 and "array.json" in err and 'skipped 1 event' in err
    assert main(["trace", "diff", str(path), str(path)]) == 0
    assert "+0.0  bye" in capsys.readouterr().out


EVENT = '{"ph": "i", "name": "x", "ts": 1, "pid": 1, "tid": 1}'
BAD_CONTENT = {  # file name -> content, what the message must say
    "empty.json": ("", "empty"),
    "blank.jsonl": ("\n  \n", "empty"),
    "binary.json": (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8"),
    "junk.json": ("{not json", "not JSON (line 1 column 2"),
    "notes.txt": ("# my probes\n7 my phase\n", "not JSON"),
    "number.json": ("42", "a number without \"traceEvents\""),
    "null.json": ("null", "null without"),
    "object.json": ('{"hello": 1}', 'without "traceEvents"'),
    "events-object.json": ('{"traceEvents": {}}', '"traceEvents" is an object, expected an array'),
    "other-data.json": ('{"traceEvents": [], "otherData": []}', '"otherData" is an array'),
    "origin.json": ('{"traceEvents": [], "otherData": {"origin_ns": "0"}}',
                    'otherData: "origin_ns" is a string, expected an integer'),
    "item.json": ('[1]', "event[0] is a number, expected an event object"),
    "no-ph.json": ('{"traceEvents": [{"name": "x", "ts": 1}]}', 'traceEvents[0] has no "ph"'),
    "no-ts.json": ('{"traceEvents": [{"ph": "i"}]}', 'has no "ts" (a number (microseconds))'),
    "str-ts.json": (f'[{EVENT}, {{"ph": "X", "name": "y", "ts": "5"}}]',
                    'event[1]: "ts" is a string, expected a number'),
    "bool-ts.json": ('[{"ph": "i", "name": "y", "ts": true}]', '"ts" is a boolean'),
    "nan-ts.json": ('[{"ph": "i", "name": "y", "ts": NaN}]', '"ts" is nan, expected a number'),
    "huge-ts.json": ('[{"ph": "i", "name": "y", "ts": 1e300}]', '"ts" is out of range'),
    "no-name.json": ('[{"ph": "X", "ts": 1, "dur": 2}]', 'event[0] has no "name"'),
    "int-name.json": ('[{"ph": "X", "name": 3, "ts": 1}]', '"name" is a number, expected a string'),
    "list-args.json": ('[{"ph": "i", "name": "x", "ts": 1, "args": [1]}]', '"args" is an array'),
    "cat.json": ('[{"ph": "i", "name": "x", "ts": 1, "cat": {}}]', '"cat" is an object'),
    "neg-dur.json": ('[{"ph": "X", "name": "x", "ts": 1, "dur": -1}]', '"dur" is negative'),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "headless.jsonl": ('{"ts_ns": 1}\n{"ts_ns": 2}\n', 'line 1: no "leanvm_trace" header'),
    "version.jsonl": ('{"leanvm_trace": 2, "origin_ns": 0}\n{}\n', "version 2, this leanvm reads"),
    "origin.jsonl": ('{"leanvm_trace": 1}\n{}\n', 'line 1 has no "origin_ns"'),
    "line.jsonl": ('{"leanvm_trace": 1, "origin_ns": 0}\n\n{"ts_ns": 1,\n',
                   "line 3: not JSON (column"),
    "array-line.jsonl": ('{"leanvm_trace": 1, "origin_ns": 0}\n[1]\n', "line 2 is an array"),
    "no-cat.jsonl": ('{"leanvm_trace": 1, "origin_ns": 0}\n{"ts_ns": 1, "name": "x"}\n',
                     'line 2 has no "cat"'),
    "float-ts.jsonl": ('{"leanvm_trace": 1, "origin_ns": 0}\n{"ts_ns": 1.5, "cat": "a", '
                       '"name": "x"}\n', '"ts_ns" is a number, expected an integer (ns)'),
    "neg-dur.jsonl": ('{"leanvm_trace": 1, "origin_ns": 0}\n{"ts_ns": 1, "cat": "a", '
                      '"name": "x", "dur_ns": -5}\n', '"dur_ns" is negative'),
}
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b|Traceback")


def one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_trace(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert not EXCEPTION_NAME.search(message), message
    return message


@pytest.mark.parametrize("name", sorted(BAD_CONTENT))
def test_bad_content_is_a_one_line_error_naming_the_file(tmp_path: Path, name: str) -> None:
    content, expected = BAD_CONTENT[name]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert expected in one_line_error(path)


def test_files_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no such file, expected a trace" in one_line_error(tmp_path / "missing.json")
    assert "is a directory, expected a trace file" in one_line_error(tmp_path)
    locked = tmp_path / "locked.json"
    locked.write_text("[]")

    def refuse(self: Path) -> bytes:  # as for chmod 000 when not root (root reads anyway)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert "cannot read the trace (Permission denied)" in one_line_error(locked)


def test_the_cli_reports_a_bad_trace_in_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"ph": "X", "name": "x", "ts": "soon"}]')
    assert main(["trace", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["ph", "ts", "name", "cat", "dur", "args",
                                                       "tid", "pid", "traceEvents", "otherData",
                                                       "origin_ns", "leanvm_trace", "ts_ns"]),
                                      inner, max_size=6), max_leaves=20)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(JSON, st.lists(JSON, min_size=1, max_size=4)), st.booleans())
def test_any_json_reads_or_is_a_config_error(tmp_path: Path, value: Any, lines: bool) -> None:
    path = tmp_path / "fuzz.json"
    if lines and isinstance(value, list):
        path.write_text("\n".join(json.dumps(item) for item in value) + "\n")
    else:
        path.write_text(json.dumps(value))
    try:
        loaded = load_trace(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and not EXCEPTION_NAME.search(str(exc))
    else:
        assert all(isinstance(e.ts, int) and isinstance(e.name, str) and e.dur >= 0
                   for e in loaded.events)
