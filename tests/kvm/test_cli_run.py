"""`leanvm run` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_run_with_no_arguments_boots_the_demo_and_summarises(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    done = leanvm("run", "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    assert "Hello from a leanvm guest!" in done.stdout
    assert "128 MiB of RAM" in done.stdout
    assert "guest stopped: reset" in done.stderr
    assert "first guest instruction" in done.stderr and "ms after process start" in done.stderr
    assert "ram-low" in done.stderr and "resident" in done.stderr
    figures = json.loads(stats.read_text())
    assert figures["reason"] == "reset" and figures["exit_code"] == 0
    assert figures["process_start_ns"] < figures["first_entry_ns"] < figures["stopped_ns"]


def test_memory_flag_and_guest_arguments() -> None:
    done = leanvm("run", "-m", "64M", "--args", "hi there", "-q")
    assert done.returncode == 0
    assert "64 MiB of RAM" in done.stdout and "arguments: hi there" in done.stdout
    assert done.stderr == ""


def test_guest_exit_status_becomes_the_exit_code(guest) -> None:
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--guest", str(guest("echo")),
                           "-q", "--timeout", "60"], input="abcde\n", capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 5  # the echo guest exits with the number of bytes it read
    assert "ABCDE" in done.stdout


def test_timeout_exit_code(guest) -> None:
    done = leanvm("run", "--guest", str(guest("spin")), "--timeout", "0.3")
    assert done.returncode == 124
    assert "time limit of 0.3 s reached" in done.stderr


def test_internal_error_is_one_clear_line(guest) -> None:
    done = leanvm("run", "--guest", str(guest("int3")), "--emulation-fallback", "off")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    line = [ln for ln in done.stderr.splitlines() if "guest stopped" in ln]
    assert len(line) == 1
    # A host whose KVM emulates kernel code cannot run INT3 at CPL 0 and names its bytes; a
    # full KVM runs it, and without an IDT the #BP becomes a triple fault.
    assert ("internal-error" in line[0] and "instruction bytes cc" in line[0]) or (
        "shutdown: the guest triple-faulted" in line[0]), line[0]


def test_serial_to_a_file(guest, tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    done = leanvm("run", "--guest", str(guest("hello")), "-serial", f"file:{out}", "-q")
    assert done.returncode == 0 and done.stdout == ""
    assert "hello from a bare guest" in out.read_text()


def stat_fields(data: object, prefix: str = "") -> set[str]:
    """'a', 'a.b', 'list[].c' for every field of a stats object (not inside memmap, whose
    properties are the machine's own, nor inside name->count tables)."""
    fields = set()
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            fields.add(name)
            if key not in ("properties", "counts", "exceptions", "exit_kinds"):
                fields |= stat_fields(value, name + ".")
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        fields |= stat_fields(data[0], prefix[:-1] + "[].")
    return fields


def test_docs_stats_md_names_every_field_and_the_api_gives_the_same(guest, tmp_path: Path
                                                                    ) -> None:
    import re

    from leanvm.machine.machine import Machine

    stats = tmp_path / "stats.json"
    done = leanvm("run", "--guest", str(guest("hello")), "--sample-rip", "20", "-q",
                  "--stats-json", str(stats), "-name", "doc-check")
    assert done.returncode == 0, done.stderr
    figures = json.loads(stats.read_text())
    assert figures["schema"] == 1 and figures["name"] == "doc-check"
    doc = (Path(__file__).resolve().parents[2] / "docs" / "stats.md").read_text()
    documented = set(re.findall(r"`([a-z_][a-z_.\[\]]*)`", doc))
    missing = stat_fields(figures) - documented
    assert not missing, f"fields not in docs/stats.md: {sorted(missing)}"
    with Machine(memory="128M", guest=guest("hello"), sample_hz=20, name="doc-check") as vm:
        api = vm.run(timeout=30).stats()
    assert stat_fields(api) == stat_fields(figures)
