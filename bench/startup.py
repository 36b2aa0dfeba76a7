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

from _common import have, median, save

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

    def med(runs: list[dict[str, float]], key: str) -> float:
        return median([run[key] for run in runs])

    figures = {"leanvm": {k: round(med(leanvm_runs, k), 1) for k in leanvm_runs[0]}}
    print(f"start-up, median of {args.rounds} alternating runs (ms from spawn)")
    print(f"{'':22} {'1st instruction':>15} {'1st serial byte':>15} {'exit':>8}")
    lv = figures["leanvm"]
    print(f"{'leanvm run (demo)':22} {lv['first_instruction_ms']:15.1f} {lv['first_byte_ms']:15.1f} "
          f"{lv['exit_ms']:8.1f}")
    if qemu_runs:
        figures["qemu_microvm"] = {k: round(med(qemu_runs, k), 1) for k in qemu_runs[0]}
        qm = figures["qemu_microvm"]
        print(f"{'qemu -M microvm (tiny)':22} {'-':>15} {qm['first_byte_ms']:15.1f} {qm['exit_ms']:8.1f}")
        ratio = lv["first_byte_ms"] / qm["first_byte_ms"]
        figures["ratio_first_byte"] = round(ratio, 2)
        print(f"leanvm / QEMU microvm, spawn to first serial byte: {ratio:.2f}x")
    else:
        print("QEMU not installed or /dev/kvm unusable: leanvm figures only "
              "(make bench installs qemu-system-x86)")
    target = lv["first_instruction_ms"] < 100
    print(f"leanvm first instruction {lv['first_instruction_ms']:.1f} ms (target < 100 ms): "
          f"{'met' if target else 'NOT met'}")
    save("startup", {"rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
