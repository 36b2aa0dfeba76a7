"""Firmware boot: from spawning the VMM to the kernel's first instruction, leanvm against QEMU
with the same firmware, kernel and initrd, side by side.

    SeaBIOS (Debian's bios.bin): leanvm --bios  vs  qemu-system-x86_64 -M pc -bios
    qboot (qemu-system-data):    leanvm --bios  vs  qemu-system-x86_64 -M microvm -bios

Kernels: the test kernel from tests/guests/linux with an 8 MiB initrd, and Debian's stock
kernel (about 14 MiB) with its own initrd when installed. The common measure is the time to
the first serial byte: the first thing both kernels' setup code does is print. leanvm also
reports the entry it caught itself (the memslot trap), which comes a little earlier.
Each VM is stopped at its first serial line. Figures are medians; ratios are leanvm / QEMU.
leanvm's boot timeline (--trace) adds its phases: firmware POST, option ROM, the kernel and
initrd copies (fw_cfg DMA spans) and the kernel entry; QEMU has no such timeline without
firmware patches, so its column is the total only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import have, median, save, spread
from build import build_test_kernel

LEANVM = str(Path(sys.executable).with_name("leanvm"))
FIRMWARE = {"seabios": ("/usr/share/seabios/bios.bin", "pc"),
            "qboot": ("/usr/share/qemu/qboot.rom", "microvm")}


def first_line(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(ms to the first stdout byte, ms to the end of that line), from just before spawn;
    the process is killed once the line is complete (leanvm stops itself with --until)."""
    start = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_ns = time.monotonic_ns()
    while first and not first.endswith(b"\n"):
        byte = proc.stdout.read(1)
        if not byte:
            break
        first += byte
    line_ns = time.monotonic_ns()
    if proc.poll() is None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not first:
        raise RuntimeError(f"{cmd[0]} printed nothing")
    return (first_ns - start) / 1e6, (line_ns - start) / 1e6


def leanvm_once(firmware: str, kernel: str, initrd: str, cmdline: str, stats: Path,
                memory: str) -> dict[str, float]:
    start = time.monotonic_ns()
    trace = stats.with_suffix(".trace.jsonl")
    first, line = first_line([LEANVM, "run", "-q", "-m", memory, "--bios", FIRMWARE[firmware][0],
                              "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                              "--until", "\n", "--timeout", "120", "--stats-json", str(stats),
                              "--trace", str(trace)])
    figures = json.loads(stats.read_text())
    entry = figures["kernel_entry"]
    result = {"first_byte_ms": first, "first_line_ms": line,
              "first_instruction_ms": (figures["first_entry_ns"] - start) / 1e6,
              "kernel_entry_ms": (entry["time_ns"] - start) / 1e6 if entry else float("nan")}
    for row in map(json.loads, trace.read_text().splitlines()[1:]):
        name = row["name"]
        if name in ("BIOS post", "option ROM init", "BIOS boot OS") and row["cat"] == "firmware":
            result[f"{name} at ms"] = (row["ts_ns"] - start) / 1e6
        elif name in ("copy kernel", "copy initrd") and row["cat"] == "fw_cfg":
            key = f"{name} ms"
            result[key] = result.get(key, 0.0) + row["dur_ns"] / 1e6
    return result


def qemu_once(firmware: str, kernel: str, initrd: str, cmdline: str,
              memory: str) -> dict[str, float]:
    bios, machine = FIRMWARE[firmware]
    first, line = first_line(["qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-m", memory,
                              "-nodefaults", "-no-user-config", "-display", "none",
                              "-serial", "stdio", "-bios", bios, "-kernel", kernel,
                              "-initrd", initrd, "-append", cmdline])
    return {"first_byte_ms": first, "first_line_ms": line}


def kernels(tmp: Path) -> list[tuple[str, str, str, str]]:
    initrd = tmp / "initrd-8M"
    initrd.write_bytes(os.urandom(8 << 20))
    found = [("test kernel + 8 MiB initrd", str(build_test_kernel()), str(initrd),
              "console=ttyS0")]
    stock = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if stock:
        version = stock[-1].removeprefix("/boot/vmlinuz-")
        stock_initrd = f"/boot/initrd.img-{version}"
        if not Path(stock_initrd).exists():
            stock_initrd = str(initrd)
        size = (Path(stock[-1]).stat().st_size + Path(stock_initrd).stat().st_size) >> 20
        found.append((f"Debian {version} + initrd ({size} MiB)", stock[-1], stock_initrd,
                      "console=ttyS0 earlyprintk=serial debug"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration")
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    if not have("qemu-system-x86_64"):
        print("qemu-system-x86_64 is missing: make bench installs it", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, kernel, initrd, cmdline in kernels(tmp):
            for firmware in FIRMWARE:
                ours, theirs = [], []
                for _ in range(args.runs):  # interleaved, so drift hits both alike
                    ours.append(leanvm_once(firmware, kernel, initrd, cmdline,
                                            tmp / "stats.json", args.memory))
                    theirs.append(qemu_once(firmware, kernel, initrd, cmdline, args.memory))
                keys = set.intersection(*(set(r) for r in ours))
                row = {"kernel": label, "firmware": firmware,
                       "qemu_machine": FIRMWARE[firmware][1],
                       "leanvm": {k: median([r[k] for r in ours]) for k in sorted(keys)},
                       "qemu": {k: median([r[k] for r in theirs]) for k in theirs[0]},
                       "runs": args.runs}
                ratios = [a["first_byte_ms"] / b["first_byte_ms"] for a, b in zip(ours, theirs)]
                row["ratio_first_byte"] = median(ratios)
                row["spread"] = {"leanvm_first_byte_ms": spread([r["first_byte_ms"] for r in ours]),
                                 "qemu_first_byte_ms": spread([r["first_byte_ms"] for r in theirs]),
                                 "ratio_first_byte": spread(ratios)}
                rows.append(row)

                def span(key: str) -> str:
                    got = row["spread"][key]
                    return f"({got['min']:.1f}-{got['max']:.1f})"
                print(f"{label:40} {firmware:8} leanvm entry {row['leanvm']['kernel_entry_ms']:8.1f} ms, "
                      f"first byte {row['leanvm']['first_byte_ms']:8.1f} {span('leanvm_first_byte_ms')} "
                      f"ms | QEMU -M {row['qemu_machine']:7} first byte "
                      f"{row['qemu']['first_byte_ms']:8.1f} {span('qemu_first_byte_ms')} ms | "
                      f"ratio {row['ratio_first_byte']:.2f} ({min(ratios):.2f}-{max(ratios):.2f}, "
                      f"pairs of the same run)", flush=True)
                phases = {k: v for k, v in row["leanvm"].items() if " at ms" in k or
                          k.startswith("copy")}
                print("    leanvm phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
                      flush=True)
    path = save("firmware_boot", {"memory": args.memory, "rows": rows})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
