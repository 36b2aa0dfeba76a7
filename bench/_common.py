"""Helpers shared by the benchmarks: building guests and C peers, recording results."""

from __future__ import annotations

import json
import os
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
from build import build_firmware  # noqa: E402,F401

# `leanvm` from this checkout (its src/ first on the path), whichever venv runs the benchmark
LEANVM_CMD = [sys.executable, "-m", "leanvm"]
QEMU_X86 = "qemu-system-x86_64"


def leanvm_env() -> dict[str, str]:
    """The environment for LEANVM_CMD: this checkout's src/ ahead of anything installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def qemu_pc_command(*args: str) -> list[str]:
    """qemu-system-x86_64 -M pc on KVM with nothing but what the tiny firmware uses: COM1 on
    stdout and isa-debug-exit at leanvm's exit port 0xf4 (exit status (value << 1) | 1)."""
    return [QEMU_X86, "-M", "pc", "-accel", "kvm", "-m", "16M", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *args]


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of several runs, as every benchmark reports them."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


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
