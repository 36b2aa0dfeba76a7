"""`leanvm run` builds exactly the memory map that `leanvm memmap` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GiB, MiB = 1 << 30, 1 << 20


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("memory,ram,switches", [
    ("128M", 128 * MiB, []),
    ("4G,maxmem=8G,slots=2", 4 * GiB, []),
    ("3584M", 3584 * MiB, ["--set", "compact=off", "--set", "pcie-ecam=off"]),
])
def test_run_uses_the_printed_plan(tmp_path: Path, memory: str, ram: int, switches: list[str]) -> None:
    printed = leanvm("memmap", "--machine", "leanvm", "-m", memory, "--json", *switches)
    assert printed.returncode == 0, printed.stderr
    plan = json.loads(printed.stdout)
    stats = tmp_path / "stats.json"
    done = leanvm("run", "-q", "-m", memory, "--stats-json", str(stats), *switches)
    assert done.returncode == 0, done.stderr
    used = json.loads(stats.read_text())
    assert used["memmap"] == plan
    expected = [{"name": r["name"], "base": r["base"], "size": r["size"]} for r in plan["regions"]
                if r["name"].startswith("ram") and r["state"] == "enabled"]
    assert used["ram_regions"] == expected
    assert sum(r["size"] for r in expected) == ram
    assert f"{ram >> 20} MiB of RAM" in done.stdout  # and the guest sees that much
