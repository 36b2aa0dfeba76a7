"""Helpers shared by the benchmarks: building guests and C peers, recording results."""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))
RESULTS = ROOT / "bench" / "results"

from build import build_guest  # noqa: E402,F401


def build_c(name: str) -> Path:
    """Compile bench/c/NAME.c with gcc -O2 (cached by modification time)."""
    source = ROOT / "bench" / "c" / f"{name}.c"
    out = ROOT / "build" / "bench" / name
    if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(source)], check=True)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(), "kernel": platform.release(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def have(command: str) -> bool:
    return shutil.which(command) is not None
