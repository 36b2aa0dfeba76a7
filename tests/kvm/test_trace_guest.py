"""The boot timeline from a real guest: probes with arguments (port and MMIO), debug-console
and serial lines, in the order the guest produced them, through the API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

PLATFORM = 0xD0FF_F000  # the probe's MMIO twin on the leanvm machine (docs/tracing.md)
EXPECTED = [
    ("vmm", "process start"), ("vmm", "configuration parsed"), ("vmm", "memory ready"),
    ("vmm", "images loaded"), ("vmm", "first vCPU entry"), ("debugcon", "probes: start"),
    ("probe", "BIOS post"), ("probe", "my phase"), ("guest", "first serial byte"),
    ("console", "probes: serial line"), ("probe", "probe 9"), ("debugcon", "probes: done"),
    ("probe", "overflow"), ("vmm", "shutdown request"), ("vmm", "stop"),
]


def test_timeline_has_the_guests_events_in_order(guest) -> None:
    with Machine(memory="16M", guest=guest("probes"), args=f"{PLATFORM:#x}", trace=True,
                 probe_names=((7, "my phase"), (8, "overflow"))) as vm:
        result = vm.run(timeout=30)
        events = vm.trace_events
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, result.detail
    assert [(e.cat, e.name) for e in events] == EXPECTED
    stamps = [e.ts for e in events]
    assert stamps == sorted(stamps) and stamps[0] == vm.process_start_ns
    by_name = {e.name: e for e in events}
    assert by_name["my phase"].args == {"id": 7, "args": [1, 2, 0xDEADBEEF]}
    assert by_name["probe 9"].args == {"id": 9, "args": [0xABC]}
    assert by_name["overflow"].args == {"id": 8, "args": [0, 1, 2, 3]}
    assert by_name["BIOS post"].args == {"id": 1001}
    assert by_name["shutdown request"].args == {"reason": "guest-exit"}


def test_without_tracing_nothing_is_recorded(guest) -> None:
    with Machine(memory="16M", guest=guest("probes"), args=f"{PLATFORM:#x}") as vm:
        result = vm.run(timeout=30)
        assert vm.trace_events == [] and vm.platform.probe.fired == 4
    assert result.status == 0


def test_cli_timeline_trace_files_show_svg_and_diff(guest, tmp_path: Path) -> None:
    table = tmp_path / "probes.txt"
    table.write_text("# my probes\n7 my phase\n0x8 overflow\n")
    traces = []
    for name in ("a.json", "b.jsonl"):
        done = subprocess.run([sys.executable, "-m", "leanvm", "run", "-q", "--guest",
                               str(guest("probes")), "--args", f"{PLATFORM:#x}", "--timeline",
                               "--probes", str(table), "--trace", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = [line for line in done.stderr.splitlines()[1:]]
        assert [r.split(None, 3)[-1].split(" (")[0] for r in rows[5:10]] == \
            ["BIOS post", "my phase", "first serial byte", "probe 9", "overflow"]
        traces.append(tmp_path / name)
    perfetto = json.loads(traces[0].read_text())
    assert {"process start", "my phase", "stop"} <= {e["name"] for e in perfetto["traceEvents"]}
    svg = tmp_path / "a.svg"
    shown = subprocess.run([sys.executable, "-m", "leanvm", "trace", "show", str(traces[1]),
                            "--svg", str(svg), "--all"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "probes: serial line" in shown.stdout
    assert ET.parse(svg).getroot().tag.endswith("svg")
    compared = subprocess.run([sys.executable, "-m", "leanvm", "trace", "diff", str(traces[0]),
                               str(traces[1])], capture_output=True, text=True, timeout=60)
    assert compared.returncode == 0 and "my phase" in compared.stdout, compared.stderr
    bad = subprocess.run([sys.executable, "-m", "leanvm", "trace", "show", str(table)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "probes.txt" in bad.stderr
    table.write_text("seven my phase\n")
    bad = subprocess.run([sys.executable, "-m", "leanvm", "run", "--probes", str(table)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "probes.txt:1: expected 'ID NAME'" in bad.stderr
