"""Trace files: JSON lines (leanvm's own) and Chrome/Perfetto trace-event JSON.

JSON lines: a header object {"leanvm_trace": 1, "origin_ns": ..., "dropped": ...}, then one
object per event {"ts_ns", "cat", "name", "dur_ns", "args"} with CLOCK_MONOTONIC times.

Trace-event JSON (any FILE ending in .json): {"traceEvents": [...], "displayTimeUnit": "ms",
"otherData": {...}} with microsecond times relative to the process start. Instants are
"ph": "i" on the events track; spans (fw_cfg copies) are "ph": "X"; and every phase row also
appears as an "X" slice lasting until the next phase, on a "boot phases" track, so
ui.perfetto.dev and chrome://tracing draw the boot as consecutive blocks. Reading accepts
both formats, whatever the file is named: JSON lines, and trace-event JSON as an object or as
a bare array of events (both are the Trace Event Format; a file written by leanvm
round-trips its origin through "otherData"). Traces from other tools are read too: their
instants, complete events and begin/end pairs are shown, other kinds counted as skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from leanvm.errors import ConfigError
from leanvm.trace.events import LINE_CATEGORIES, Event

PID = 1
TID_EVENTS, TID_PHASES, TID_LINES, TID_SAMPLES = 1, 2, 3, 4


def write_trace(path: Path, events: list[Event], origin: int, dropped: int = 0) -> None:
    """Write-then-rename, so a reader never sees half a trace."""
    text = (_chrome(events, origin, dropped) if path.suffix == ".json"
            else _jsonl(events, origin, dropped))
    from leanvm.fileio import write_atomic

    write_atomic(path, text.encode(), "trace")


def _jsonl(events: list[Event], origin: int, dropped: int) -> str:
    lines = [json.dumps({"leanvm_trace": 1, "origin_ns": origin, "dropped": dropped})]
    for e in events:
        lines.append(json.dumps({"ts_ns": e.ts, "cat": e.cat, "name": e.name, "dur_ns": e.dur,
                                 "args": e.args or {}}))
    return "\n".join(lines) + "\n"


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _chrome(events: list[Event], origin: int, dropped: int) -> str:
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "leanvm"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_EVENTS, "args": {"name": "events"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_PHASES,
         "args": {"name": "boot phases"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_LINES,
         "args": {"name": "console lines"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_SAMPLES,
         "args": {"name": "RIP samples"}},
    ]
    for e in events:
        tid = (TID_SAMPLES if e.cat == "sample" else TID_LINES if e.cat in LINE_CATEGORIES
               else TID_EVENTS)
        item: dict[str, Any] = {"name": e.name, "cat": e.cat, "ts": _us(e.ts - origin),
                                "pid": PID, "tid": tid, "args": e.args or {}}
        if e.dur:
            item.update(ph="X", dur=_us(e.dur))
        else:
            item.update(ph="i", s="t")
        out.append(item)
    rows = [e for e in events if e.cat not in LINE_CATEGORIES and not e.dur]
    for this, following in zip(rows, rows[1:]):
        out.append({"name": this.name, "cat": "phase", "ph": "X", "ts": _us(this.ts - origin),
                    "dur": _us(following.ts - this.ts), "pid": PID, "tid": TID_PHASES,
                    "args": {}})
    other = {"leanvm_trace": 1, "origin_ns": origin, "dropped": dropped}
    return json.dumps({"traceEvents": out, "displayTimeUnit": "ms", "otherData": other},
                      indent=None) + "\n"


class Loaded(NamedTuple):
    """What a trace file holds, as leanvm shows it."""

    events: list[Event]  # sorted by time
    origin: int  # ns; times are shown relative to it
    skipped: dict[str, int]  # events leanvm does not show, by kind (Trace Event Format "ph")


def read_trace(path: Path) -> tuple[list[Event], int]:
    """(events sorted by time, origin) from any format ``load_trace`` reads."""
    loaded = load_trace(path)
    return loaded.events, loaded.origin


def load_trace(path: Path) -> Loaded:
    """Read leanvm's JSON lines, or Trace Event Format JSON in either of its forms: an object
    {"traceEvents": [...]} or a bare array of events (its closing bracket may be missing, as
    the format allows for a trace whose writer died). Events of kinds leanvm does not draw
    (counters, flows, async, samples, ...) are counted in ``skipped``; instants ("i", "I"),
    complete events ("X") and begin/end pairs ("B"/"E", made spans) are kept. Anything that
    is not a trace, or an event with a missing or mistyped field, is a ConfigError naming
    the file and what was expected there."""
    text = _read_text(path)
    if not text.strip():
        raise ConfigError(f"{path}: empty file, expected a trace")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{path}: not a trace (JSON nested too deeply)") from None
    except ValueError as exc:
        if _starts_with_object(text):
            return _read_jsonl(text, path)
        data = _unterminated_array(text)
        if data is None:
            raise ConfigError(f"{path}: not JSON ({_json_error(exc)}); expected a leanvm "
                              f"trace or Trace Event Format JSON") from None
    if isinstance(data, list):
        return _read_events(data, {}, path, "event")
    if isinstance(data, dict) and "traceEvents" in data:
        items, other = data["traceEvents"], data.get("otherData", {})
        if not isinstance(items, list):
            raise ConfigError(f'{path}: "traceEvents" is {_kind(items)}, expected an array '
                              f"of events")
        if not isinstance(other, dict):
            raise ConfigError(f'{path}: "otherData" is {_kind(other)}, expected an object')
        return _read_events(items, other, path, "traceEvents")
    if isinstance(data, dict) and "leanvm_trace" in data:
        return _read_jsonl(text, path)  # a header and no events
    raise ConfigError(f"{path}: JSON {_kind(data)} without \"traceEvents\"; expected an "
                      f"object with \"traceEvents\", an array of events or leanvm's JSON lines")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file, expected a trace") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a trace file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc.strerror or 'read failed'})") \
            from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a trace (byte {exc.start} is not UTF-8 text; a binary "
                          f"file?)") from None


def _starts_with_object(text: str) -> bool:
    """JSON lines: the first non-blank line is a JSON object on its own."""
    first = next(line for line in text.splitlines() if line.strip())
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _unterminated_array(text: str) -> list[Any] | None:
    body = text.rstrip()
    if not body.startswith("[") or body.endswith("]"):
        return None
    try:
        data = json.loads(body.rstrip(",") + "]")
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, list) else None


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return "not valid JSON"


def _kind(value: object) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _field(item: dict[str, Any], key: str, want: type | tuple[type, ...], what: str,
           where: str, path: Path, default: Any = None) -> Any:
    """item[key] checked against ``want`` (booleans are not numbers, numbers are finite)."""
    if key not in item or (item[key] is None and default is not None):
        if default is None:
            raise ConfigError(f'{path}: {where} has no "{key}" ({what})')
        return default
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f'{path}: {where}: "{key}" is {_kind(value)}, expected {what}')
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f'{path}: {where}: "{key}" is {value}, expected {what}')
    return value


def _args(item: dict[str, Any], key: str, where: str, path: Path) -> dict[str, Any] | None:
    value = item.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f'{path}: {where}: "{key}" is {_kind(value)}, expected an object')
    return value or None


def _read_jsonl(text: str, path: Path) -> Loaded:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    items = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except RecursionError:
            raise ConfigError(f"{path}: line {number}: JSON nested too deeply") from None
        except ValueError as exc:
            column = f"column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
                else "not valid JSON"
            raise ConfigError(f"{path}: line {number}: not JSON ({column}); expected one JSON "
                              f"object per line") from None
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: line {number} is {_kind(item)}, expected a JSON object")
        items.append((number, item))
    number, header = items[0]
    if "leanvm_trace" not in header:
        raise ConfigError(f'{path}: line {number}: no "leanvm_trace" header; expected leanvm\'s '
                          f"JSON lines or Trace Event Format JSON")
    if header["leanvm_trace"] != 1:
        raise ConfigError(f"{path}: leanvm_trace version {json.dumps(header['leanvm_trace'])[:20]}"
                          f", this leanvm reads version 1")
    origin = _field(header, "origin_ns", int, "an integer (ns)", f"line {number}", path)
    events = []
    for number, item in items[1:]:
        where = f"line {number}"
        dur = _field(item, "dur_ns", int, "an integer (ns)", where, path, 0)
        if dur < 0:
            raise ConfigError(f'{path}: {where}: "dur_ns" is negative, expected a duration')
        events.append(Event(_field(item, "ts_ns", int, "an integer (ns)", where, path),
                            _field(item, "cat", str, "a string", where, path),
                            _field(item, "name", str, "a string", where, path),
                            dur, _args(item, "args", where, path)))
    return Loaded(sorted(events, key=lambda e: e.ts), origin, {})


NUMBER = (int, float)
KEPT = ("i", "I", "X", "B", "E")  # Trace Event Format phases leanvm shows


def _us_to_ns(value: int | float, key: str, where: str, path: Path) -> int:
    if abs(value) > 1e18:  # microseconds: 30 000 years
        raise ConfigError(f'{path}: {where}: "{key}" is out of range, expected microseconds')
    return round(value * 1000)


def _is_leanvm(items: list[Any], other: dict[str, Any]) -> bool:
    """Written by leanvm: its otherData, or (the bare-array form) its process name."""
    if "leanvm_trace" in other:
        return True
    return any(isinstance(item, dict) and item.get("ph") == "M"
               and item.get("name") == "process_name"
               and isinstance(item.get("args"), dict) and item["args"].get("name") == "leanvm"
               for item in items)


def _read_events(items: list[Any], other: dict[str, Any], path: Path, label: str) -> Loaded:
    ours = _is_leanvm(items, other)
    origin: int | None = None
    if "origin_ns" in other:
        origin = _field(other, "origin_ns", int, "an integer (ns)", "otherData", path)
    events: list[Event] = []
    skipped: dict[str, int] = {}
    begun: dict[tuple[str, str], list[tuple[int, str, str, dict[str, Any] | None]]] = {}
    for index, item in enumerate(items):
        where = f"{label}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: {where} is {_kind(item)}, expected an event object")
        ph = _field(item, "ph", str, 'a string (the event type, e.g. "X")', where, path)
        if ph == "M":
            continue  # metadata: process and thread names
        if ph not in KEPT:
            skipped[ph] = skipped.get(ph, 0) + 1
            continue
        if ours and item.get("tid") == TID_PHASES and item.get("cat") == "phase":
            continue  # leanvm's phase blocks repeat the phases for trace viewers
        ts = _us_to_ns(_field(item, "ts", NUMBER, "a number (microseconds)", where, path),
                       "ts", where, path)
        cat = _field(item, "cat", str, "a string", where, path, "")
        args = _args(item, "args", where, path)
        track = (str(item.get("pid")), str(item.get("tid")))
        if ph == "E":
            if not begun.get(track):
                skipped["E"] = skipped.get("E", 0) + 1  # an end without a begin
                continue
            start, name, cat, start_args = begun[track].pop()
            merged = {**(start_args or {}), **(args or {})} or None
            events.append(Event(start, cat, name, max(ts - start, 0), merged))
            continue
        name = _field(item, "name", str, "a string", where, path)
        if ph == "B":
            begun.setdefault(track, []).append((ts, name, cat, args))
            continue
        dur = 0
        if ph == "X":
            dur = _us_to_ns(_field(item, "dur", NUMBER, "a number (microseconds)", where, path,
                                   0), "dur", where, path)
            if dur < 0:
                raise ConfigError(f'{path}: {where}: "dur" is negative, expected a duration')
        events.append(Event(ts, cat, name, dur, args))
    unfinished = sum(len(stack) for stack in begun.values())
    if unfinished:
        skipped["B"] = unfinished  # begun and never ended
    if origin is None:  # times relative to the first event
        origin = min((e.ts for e in events), default=0)
    else:
        events = [e._replace(ts=origin + e.ts) for e in events]
    return Loaded(sorted(events, key=lambda e: e.ts), origin, skipped)
