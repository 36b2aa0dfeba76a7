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
    if "triple-faulted" in done.stderr:
        return  # hardware KVM: covered by test_guests
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    line = [ln for ln in done.stderr.splitlines() if "guest stopped" in ln]
    assert line and "instruction bytes cc" in line[0]


def test_serial_to_a_file(guest, tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    done = leanvm("run", "--guest", str(guest("hello")), "-serial", f"file:{out}", "-q")
    assert done.returncode == 0 and done.stdout == ""
    assert "hello from a bare guest" in out.read_text()
