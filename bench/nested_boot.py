"""Linux to user space and to power-off on a real KVM, leanvm against QEMU, side by side.

Runs where guest user space runs: in the L1 Linux of scripts/nested-kvm (QEMU TCG with
SVM, docs/nested.md), which `make bench` starts for it; `bench/nested_boot.py --in-l1`
runs it there from the host in one go. Same kernel (leanvm's minimal kernel), initramfs
(`leanvm initrd build`: busybox, an /init that prints a line and powers off) and command
line for every configuration, interleaved runs:

    leanvm PVH       leanvm run -kernel bzImage (decompressed on the host, PVH entry)
    leanvm bzImage   leanvm run -kernel bzImage --kernel-boot bzimage (the guest decompresses)
    QEMU pc          qemu-system-x86_64 -M pc -accel kvm -cpu host -kernel bzImage (SeaBIOS)
    QEMU microvm     qemu-system-x86_64 -M microvm -accel kvm -cpu host -kernel bzImage (qboot)

Times run from spawning the VMM to the line on its serial pipe: the init's first line
("leanvm-init: user space is up") and the kernel's "reboot: Power down". Exits by kind come
from one more run of each (leanvm's --stats-json; QEMU's `-trace kvm_run_exit`, which
slows it, so that run is not timed). Exits are slow in L1 (TCG emulates the world switch):
ratios from the same run hold better than times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import ROOT, median, run_in_l1, save_and_hand_back, user_space_missing
from linux_boot import LEANVM, build_initrd, minimal_kernel, stop, watch

USER_LINE = b"leanvm-init: user space is up"
POWER_DOWN = b"reboot: Power down"
CMDLINE = "console=ttyS0 rodata=off"
CONFIGS = ("leanvm-pvh", "leanvm-bzimage", "qemu-pc", "qemu-microvm")
KVM_EXIT_REASONS = {2: "pio", 5: "hlt", 6: "mmio", 8: "shutdown", 10: "intr",
                    17: "internal-error", 24: "system-event"}  # linux/kvm.h KVM_EXIT_*


def spread(values: list[float], fmt: str) -> str:
    """Median (min-max)."""
    return f"{median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def command(config: str, kernel: Path, initrd: Path, memory: str, stats: Path | None,
            trace: bool = False) -> list[str]:
    if config.startswith("leanvm"):
        cmd = [LEANVM, "run", "-q", "-m", memory, "-kernel", str(kernel), "-initrd",
               str(initrd), "-append", CMDLINE, "--kernel-boot",
               config.removeprefix("leanvm-"), "--timeout", "600"]
        return cmd + (["--stats-json", str(stats)] if stats else [])
    machine = config.removeprefix("qemu-")
    cmd = ["qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", "host", "-m", memory,
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE]
    return cmd + (["-trace", "kvm_run_exit"] if trace else [])


def timed(config: str, kernel: Path, initrd: Path, memory: str, limit: float) -> dict:
    start = time.monotonic_ns()
    proc = subprocess.Popen(command(config, kernel, initrd, memory, None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        row = watch(proc, start, POWER_DOWN, limit, USER_LINE)
    finally:
        stop(proc)
    return {"user_ms": row["milestone_ms"], "poweroff_ms": row["init_ms"],
            "first_byte_ms": row["first_byte_ms"], "console_tail": row["console_tail"]}


def exits(config: str, kernel: Path, initrd: Path, memory: str, tmp: Path,
          limit: float) -> dict[str, int]:
    """Exits by kind in one boot to power-off."""
    stats = tmp / f"{config}.json"
    proc = subprocess.Popen(command(config, kernel, initrd, memory, stats, trace=True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        row = watch(proc, time.monotonic_ns(), POWER_DOWN, limit)
        if config.startswith("leanvm"):
            proc.wait(timeout=60)
            return json.loads(stats.read_text())["exit_kinds"]
    finally:
        stop(proc)
    assert proc.stderr is not None
    counts: Counter[str] = Counter()
    text = row.pop("stderr_full", "") + proc.stderr.read().decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("kvm_run_exit") and "reason" in line:
            reason = int(line.rsplit("reason", 1)[1].strip().rstrip(","))
            counts[KVM_EXIT_REASONS.get(reason, str(reason))] += 1
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--limit", type=float, default=600, help="seconds per boot at most")
    parser.add_argument("--in-l1", action="store_true",
                        help="start the L1 (scripts/nested-kvm) and run there")
    args = parser.parse_args()
    if args.in_l1:
        return run_in_l1(__file__, "nested_boot",
                         ["--runs", str(args.runs), "--memory", args.memory])
    if user_space_missing(""):
        return 1
    return run(args)


def run(args: argparse.Namespace) -> int:
    kernel = minimal_kernel()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        initrd = build_initrd(tmp / "initramfs.cpio")
        rows: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for round_ in range(args.runs):
            for config in CONFIGS:
                row = timed(config, kernel, initrd, args.memory, args.limit)
                rows[config].append(row)
                print(f"run {round_ + 1} {config:15} user space {row['user_ms'] / 1e3:6.2f} s, "
                      f"power-off {row['poweroff_ms'] / 1e3:6.2f} s", flush=True)
        kinds = {c: exits(c, kernel, initrd, args.memory, tmp, args.limit) for c in CONFIGS}
    print(f"\nin L1 (QEMU TCG, SVM), {args.runs} interleaved runs, s from spawn: median (range)")
    summary = {}
    for config in CONFIGS:
        user = [r["user_ms"] / 1e3 for r in rows[config] if r["user_ms"] == r["user_ms"]]
        off = [r["poweroff_ms"] / 1e3 for r in rows[config] if r["poweroff_ms"] == r["poweroff_ms"]]
        summary[config] = {"user_s": median(user) if user else None,
                           "poweroff_s": median(off) if off else None,
                           "exits": sum(kinds[config].values()), "exit_kinds": kinds[config]}
        print(f"  {config:15} user space {spread(user, '.2f') if user else '-':22} "
              f"power-off {spread(off, '.2f') if off else '-':22} "
              f"exits {summary[config]['exits']} {kinds[config]}")
    for ours in ("leanvm-pvh", "leanvm-bzimage"):
        for theirs in ("qemu-pc", "qemu-microvm"):
            a, b = summary[ours]["poweroff_s"], summary[theirs]["poweroff_s"]
            if a and b:
                print(f"  {ours} / {theirs} to power-off: {a / b:.2f}x")
    save_and_hand_back("nested_boot", {"runs": args.runs, "memory": args.memory,
                                       "cmdline": CMDLINE, "summary": summary, "raw": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
