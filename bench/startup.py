"""Start-up: from spawning the process to the first guest instruction and to the guest's
first serial byte, for `leanvm run` (the bundled demo guest) and for
`qemu-system-x86_64 -M microvm` on an equivalent tiny guest (a 64 KiB BIOS whose reset
vector writes one byte to COM1 and leaves through isa-debug-exit), side by side.
Target for leanvm: under 100 ms to the first guest instruction on this host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import have, median, save, spread

LEANVM = str(Path(sys.executable).with_name("leanvm"))


def tiny_bios(path: Path) -> None:
    """mov dx,0x3f8; mov al,'Q'; out dx,al; mov dx,0xf4; mov al,0; out dx,al; hlt; jmp $-1"""
    code = bytes([0xBA, 0xF8, 0x03, 0xB0, ord("Q"), 0xEE, 0xBA, 0xF4, 0x00, 0xB0, 0x00, 0xEE,
                  0xF4, 0xEB, 0xFD])
    image = bytearray(b"\xff" * 65536)
    image[0xFFF0:0xFFF0 + len(code)] = code
    path.write_bytes(bytes(image))


def spawn_and_time(cmd: list[str]) -> tuple[float, float, int]:
    """(ms to the first stdout byte, ms to process exit, exit code), from just before spawn."""
    start = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_ns = time.monotonic_ns()
    proc.stdout.read()
    code = proc.wait()
    end_ns = time.monotonic_ns()
    if not first:
        raise RuntimeError(f"{cmd[0]} printed nothing (exit {code})")
    return (first_ns - start) / 1e6, (end_ns - start) / 1e6, code


def leanvm_once(stats: Path) -> dict[str, float]:
    start = time.monotonic_ns()
    first_byte, total, code = spawn_and_time([LEANVM, "run", "-q", "--stats-json", str(stats)])
    figures = json.loads(stats.read_text())
    assert code == 0, code
    return {"first_instruction_ms": (figures["first_entry_ns"] - start) / 1e6,
            "first_byte_ms": first_byte, "exit_ms": total}


def qemu_once(bios: Path) -> dict[str, float]:
    cmd = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", "128M", "-nodefaults",
           "-no-user-config", "-display", "none", "-serial", "stdio", "-bios", str(bios),
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    first_byte, total, code = spawn_and_time(cmd)
    assert code == 1, code  # isa-debug-exit: (0 << 1) | 1
    return {"first_byte_ms": first_byte, "exit_ms": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="leanvm-bench-"))
    bios, stats = work / "tiny.bin", work / "stats.json"
    tiny_bios(bios)
    peers = have("qemu-system-x86_64") and os.access("/dev/kvm", os.W_OK)
    leanvm_runs, qemu_runs = [], []
    leanvm_once(stats)  # warm the page cache for both before measuring
    if peers:
        qemu_once(bios)
    for _ in range(args.rounds):
        leanvm_runs.append(leanvm_once(stats))
        if peers:
            qemu_runs.append(qemu_once(bios))

    def cell(runs: list[dict[str, float]], key: str) -> str:
        values = [run[key] for run in runs]
        return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    figures: dict = {"leanvm": {k: spread([r[k] for r in leanvm_runs]) for k in leanvm_runs[0]}}
    print(f"start-up, {args.rounds} alternating runs, ms from spawn: median (min-max)")
    print(f"{'':24} {'1st instruction':>20} {'1st serial byte':>20} {'exit':>20}")
    print(f"{'leanvm run (demo)':24} {cell(leanvm_runs, 'first_instruction_ms'):>20} "
          f"{cell(leanvm_runs, 'first_byte_ms'):>20} {cell(leanvm_runs, 'exit_ms'):>20}")
    lv = {k: v["median"] for k, v in figures["leanvm"].items()}
    if qemu_runs:
        figures["qemu_microvm"] = {k: spread([r[k] for r in qemu_runs]) for k in qemu_runs[0]}
        print(f"{'qemu -M microvm (tiny)':24} {'-':>20} {cell(qemu_runs, 'first_byte_ms'):>20} "
              f"{cell(qemu_runs, 'exit_ms'):>20}")
        ratios = [a["first_byte_ms"] / b["first_byte_ms"] for a, b in zip(leanvm_runs, qemu_runs)]
        figures["ratio_first_byte"] = spread(ratios)
        print(f"leanvm / QEMU microvm, spawn to first serial byte: {median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x, pairs of the same round)")
    else:
        print("QEMU not installed or /dev/kvm unusable: leanvm figures only "
              "(make bench installs qemu-system-x86)")
    target = lv["first_instruction_ms"] < 100
    print(f"leanvm first instruction {lv['first_instruction_ms']:.1f} ms median (target < 100 ms): "
          f"{'met' if target else 'NOT met'}")
    save("startup", {"rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
