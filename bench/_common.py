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


def run_in_l1(script: str, name: str, args: list[str]) -> int:
    """Run ``script`` with ``args`` in L1 (scripts/nested-kvm, a real KVM: docs/nested.md),
    then copy its results file bench/results/NAME.json back (L1's own files vanish with it).
    The minimal kernel is built here first, for the same reason."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build-kernel")], check=True,
                   capture_output=True)
    out = ROOT / "build" / "nested" / "bench"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "nested-kvm"), "--timeout",
                           "5400", "--out", str(out), "--", sys.executable, script, *args],
                          cwd=ROOT)
    figures = out / f"{name}.json"
    if figures.exists():
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(figures.read_text())
    return done.returncode


def user_space_missing(why: str) -> bool:
    """True (after saying so on stderr) where this host's KVM cannot run guest user space."""
    sys.path.insert(0, str(ROOT / "src"))
    from leanvm.machine.host_check import check_host

    finding = check_host()
    if finding.error or finding.needs_fallback:
        print(f"this host's KVM cannot run guest user space{why}: run this in L1 (--in-l1, "
              "docs/nested.md)", file=sys.stderr)
        return True
    return False


def hand_back(path: Path, name: str) -> None:
    """In L1, copy a results file to $NESTED_OUT, which the host reads after L1 ends."""
    out = os.environ.get("NESTED_OUT")
    if out:
        Path(out, f"{name}.json").write_text(path.read_text())


def save_and_hand_back(name: str, data: dict) -> Path:
    """save(), say where, and hand the file back from L1 (hand_back)."""
    path = save(name, data)
    print(f"saved {path}")
    hand_back(path, name)
    return path
