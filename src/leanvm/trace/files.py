"""Trace files: JSON lines (leanvm's own) and Chrome/Perfetto trace-event JSON.

JSON lines: a header object {"leanvm_trace": 1, "origin_ns": ..., "dropped": ...}, then one
object per event {"ts_ns", "cat", "name", "dur_ns", "args"} with CLOCK_MONOTONIC times.

Trace-event JSON (any FILE ending in .json): {"traceEvents": [...], "displayTimeUnit": "ms",
"otherData": {...}} with microsecond times relative to the process start. Instants are
"ph": "i" on the events track; spans (fw_cfg copies) are "ph": "X"; and every phase row also
appears as an "X" slice lasting until the next phase, on a "boot phases" track, so
ui.perfetto.dev and chrome://tracing draw the boot as consecutive blocks. Reading accepts
both formats (a trace-event file written by leanvm round-trips through "otherData").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from leanvm.errors import ConfigError
from leanvm.trace.events import LINE_CATEGORIES, Event

PID = 1
TID_EVENTS, TID_PHASES, TID_LINES, TID_SAMPLES = 1, 2, 3, 4


def write_trace(path: Path, events: list[Event], origin: int, dropped: int = 0) -> None:
    """Write-then-rename, so a reader never sees half a trace."""
    text = (_chrome(events, origin, dropped) if path.suffix == ".json"
            else _jsonl(events, origin, dropped))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the trace ({exc.strerror})") from None


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


def read_trace(path: Path) -> tuple[list[Event], int]:
    """(events sorted by time, origin) from either format; ConfigError names what is wrong."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc})") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("{\"traceEvents\"") or path.suffix == ".json":
            return _read_chrome(json.loads(text), path)
        return _read_jsonl(text, path)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a leanvm trace ({type(exc).__name__}: {exc})") from None


def _read_jsonl(text: str, path: Path) -> tuple[list[Event], int]:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{path}: empty trace file")
    header = json.loads(lines[0])
    if header.get("leanvm_trace") != 1:
        raise ConfigError(f"{path}: not a leanvm trace (no leanvm_trace header line)")
    events = []
    for line in lines[1:]:
        item = json.loads(line)
        events.append(Event(int(item["ts_ns"]), str(item["cat"]), str(item["name"]),
                            int(item.get("dur_ns", 0)), item.get("args") or None))
    return sorted(events, key=lambda e: e.ts), int(header["origin_ns"])


def _read_chrome(data: dict[str, Any], path: Path) -> tuple[list[Event], int]:
    origin = int(data.get("otherData", {}).get("origin_ns", 0))
    events = []
    for item in data["traceEvents"]:
        if item.get("ph") not in ("i", "I", "X") or item.get("tid") == TID_PHASES:
            continue
        ts = origin + int(round(float(item["ts"]) * 1000))
        dur = int(round(float(item.get("dur", 0)) * 1000))
        events.append(Event(ts, str(item.get("cat", "")), str(item["name"]), dur,
                            item.get("args") or None))
    return sorted(events, key=lambda e: e.ts), origin
