"""Direct Linux boot: time to the kernel and to "Run /init", and host memory per VM after
boot, leanvm against QEMU with the same kernel, initrd and command line, side by side.

    leanvm bzImage   leanvm run -kernel bzImage --kernel-boot bzimage (the guest decompresses)
    leanvm PVH       leanvm run -kernel bzImage (decompressed on the host, cached; PVH entry)
    QEMU pc          qemu-system-x86_64 -M pc -kernel bzImage (SeaBIOS + linuxboot_dma)
    QEMU microvm     qemu-system-x86_64 -M microvm -kernel bzImage (qboot)
    QEMU microvm PVH qemu-system-x86_64 -M microvm -kernel vmlinux (the same kernel as an ELF,
                     entered through PVH: QEMU's closest match to leanvm's PVH path)

The kernel is leanvm's minimal kernel (scripts/build-kernel) with the initramfs from
`leanvm initrd build`; on this project's host every kernel instruction is emulated, so a run
takes minutes and "Run /init" is the last point a stock user space reaches (docs/linux.md).
Times run from spawning the VMM to the line arriving on its serial pipe. Memory is read
while the guest sits at "Run /init": the guest RAM mapping and the whole process
(/proc/PID/smaps), private = pages no other process maps; leanvm maps the initrd and kernel
from the page cache, so they are shared, not private. Ratios are leanvm / QEMU (below 1:
leanvm is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, have, median, save

LEANVM = str(Path(sys.executable).with_name("leanvm"))
INIT_LINE = b"Run /init"
BATCH_S = 0.01  # the reader's pause between reads (watch)
KVM_FAILED = b"internal error"  # in a VMM's messages: the guest cannot go on
MiB = 1 << 20


def minimal_kernel() -> Path:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-kernel")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cannot build the minimal kernel: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def build_initrd(out: Path) -> Path:
    subprocess.run([LEANVM, "initrd", "build", str(out)], check=True, capture_output=True)
    return out


def watch(proc: subprocess.Popen, start: int, until: bytes, limit: float,
          milestone: bytes | None = None, on_milestone=None,
          batch: float = BATCH_S) -> dict[str, float]:
    """Read the VMM's serial output (stdout) and messages (stderr) until ``until`` shows, the
    VMM exits, or it reports a KVM internal error (QEMU then pauses the guest); ms from
    ``start`` to the first byte, to ``milestone`` and to ``until``. ``on_milestone(proc)``
    runs at once when the milestone shows (memory readings).

    After each read the reader sleeps ``batch`` seconds, so a VMM writing its console a byte
    at a time (QEMU does) fills the pipe instead of waking the reader per byte: where the
    reader shares a CPU with the VMM (one vCPU in L1, under TCG) waking per byte cost either
    VMM seconds of a 10 s boot. Times are then late by at most ``batch``."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    seen, errors = bytearray(), bytearray()
    first = mark = found = None
    extra: dict[str, float] = {}
    deadline = time.monotonic() + limit
    width = max(len(until), len(milestone or b""))
    failed = False  # KVM internal error reported on stderr
    while found is None and time.monotonic() < deadline and not failed:
        ready, _, _ = select.select([out, err], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        if err in ready:
            text = os.read(err, 65536)
            failed = KVM_FAILED in bytes(errors[-len(KVM_FAILED):]) + text  # split reads too
            errors += text
        if out not in ready:
            continue
        chunk = os.read(out, 65536)
        if not chunk:
            break
        now = time.monotonic_ns()
        first = first or now
        tail = bytes(seen[-width:]) + chunk  # a line split between two reads is found too
        seen += chunk
        if milestone is not None and mark is None and milestone in tail:
            mark = now
            if on_milestone is not None:
                extra = on_milestone(proc)
        if until in tail:
            found = now
        elif batch:
            time.sleep(batch)
    result = {"first_byte_ms": (first - start) / 1e6 if first else float("nan"),
              "milestone_ms": (mark - start) / 1e6 if mark else float("nan"),
              "init_ms": (found - start) / 1e6 if found else float("nan"), **extra}
    result["console_tail"] = seen[-400:].decode(errors="replace")
    result["stderr_tail"] = errors[-300:].decode(errors="replace").strip()
    result["stderr_full"] = errors.decode(errors="replace")  # the caller pops it (QEMU -trace)
    return result


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def leanvm_once(kernel: Path, initrd: Path, cmdline: str, memory: str, mode: str,
                tmp: Path, limit: float, until: bytes | None = None) -> dict[str, float]:
    """One leanvm boot to ``until`` (default "Run /init"): times, and memory at the stop."""
    until = until or INIT_LINE
    stats, trace = tmp / "stats.json", tmp / "trace.jsonl"
    stats.unlink(missing_ok=True)
    cmd = [LEANVM, "run", "-q", "-m", memory, "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", cmdline, "--kernel-boot", mode, "--until", until.decode(),
           "--timeout", str(limit), "--stats-json", str(stats), "--trace", str(trace)]
    start = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    result = watch(proc, start, until, limit + 30)
    result.pop("stderr_full")
    proc.wait(timeout=60)
    if not stats.exists():
        raise RuntimeError(f"leanvm {mode} failed: {proc.stderr.read().decode()[-500:]}")
    figures = json.loads(stats.read_text())
    memory_figures = figures["host_memory"]
    result["kernel_entry_ms"] = (figures["first_entry_ns"] - start) / 1e6  # direct boot
    result["kernel_cmdline"] = figures["kernel_cmdline"]  # QEMU gets the same
    result["guest_private_kib"] = memory_figures["guest_private"] / 1024
    result["guest_resident_kib"] = memory_figures["guest_resident"] / 1024
    result["vmm_private_kib"] = memory_figures["vmm_private"] / 1024
    result["process_private_kib"] = memory_figures["process_private"] / 1024
    for row in map(json.loads, trace.read_text().splitlines()[1:]):
        if row["name"] == "decompress kernel (host)":
            result["host_decompress_ms"] = row["dur_ns"] / 1e6
        elif row["name"] == "decompress kernel (guest)":
            result["guest_decompress_ms"] = row["dur_ns"] / 1e6
        elif row["name"] == "load kernel":
            result["load_kernel_ms"] = row["dur_ns"] / 1e6
    return result


def qemu_memory(memory_bytes: int):
    """A reader of a running QEMU's memory: its guest RAM mapping and the whole process."""
    sys.path.insert(0, str(ROOT / "src"))
    from leanvm.memory.residency import mapping_memory, process_memory

    def read(proc: subprocess.Popen) -> dict[str, float]:
        ram = None
        with open(f"/proc/{proc.pid}/maps") as maps:
            for line in maps:
                parts = line.split()
                low, high = (int(x, 16) for x in parts[0].split("-"))
                anonymous = len(parts) < 6
                if anonymous and memory_bytes <= high - low <= memory_bytes + 8 * MiB:
                    ram = (low, high)
        whole = process_memory(proc.pid)
        figures = {"process_private_kib": whole.private / 1024}
        if ram is not None:
            guest = mapping_memory(proc.pid, [ram])
            figures.update(guest_private_kib=guest.private / 1024,
                           guest_resident_kib=guest.rss / 1024,
                           vmm_private_kib=(whole.private_dirty - guest.private_dirty) / 1024)
        return figures

    return read


def qemu_once(machine: str, kernel: Path, initrd: Path, cmdline: str, memory: str,
              memory_bytes: int, limit: float, milestone: bytes) -> dict[str, float]:
    cmd = ["qemu-system-x86_64", "-M", machine, "-accel", "kvm", "-cpu", QEMU_CPU, "-m", memory,
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    start = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        result = watch(proc, start, INIT_LINE, limit, milestone, qemu_memory(memory_bytes))
        result.pop("stderr_full")
        return result
    finally:
        stop(proc)


def parse_memory(text: str) -> int:
    match = re.fullmatch(r"(\d+)([MG])", text)
    if not match:
        raise SystemExit(f"--memory {text}: expected e.g. 256M or 1G")
    return int(match[1]) << (20 if match[2] == "M" else 30)


CONFIGS = ("leanvm-bzimage", "leanvm-pvh", "qemu-pc", "qemu-microvm", "qemu-microvm-pvh")


# QEMU 7.2's "-cpu host" (and "max") abort on this host: "failed to set MSR 0x10a"
# (IA32_ARCH_CAPABILITIES, which the nested KVM here refuses). The same CPU without that
# MSR runs: the closest to leanvm's host profile that QEMU can boot here.
QEMU_CPU = "host,-arch-capabilities"
MILESTONE = b"x86/fpu: x87 FPU will use"  # reached by every VMM that runs the kernel far
MEMORY_KEYS = ("guest_private_kib", "guest_resident_kib", "vmm_private_kib",
               "process_private_kib")


def leanvm_config(kernel: Path, initrd: Path, cmdline: str, memory: str, mode: str, tmp: Path,
                  limit: float) -> dict[str, object]:
    """A leanvm configuration: one boot to "Run /init" (times; memory at "Run /init"), and
    one stopped at the milestone (memory there, to compare with QEMU's)."""
    row = leanvm_once(kernel, initrd, cmdline, memory, mode, tmp, limit)
    at_init = {k: row.pop(k) for k in MEMORY_KEYS if k in row}
    mile = leanvm_once(kernel, initrd, cmdline, memory, mode, tmp, limit, MILESTONE)
    row["milestone_ms"] = mile["init_ms"]
    row.update({k: mile[k] for k in MEMORY_KEYS if k in mile})
    row["at_init"] = at_init
    return row


def main() -> int:
    global INIT_LINE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per configuration, interleaved (default 3: median, range)")
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--limit", type=float, default=300, help="seconds per boot at most")
    parser.add_argument("--kernel", type=Path, help="bzImage (default: the minimal kernel)")
    parser.add_argument("--only", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--cmdline", default="console=ttyS0 earlyprintk=serial panic=-1")
    parser.add_argument("--until", default=INIT_LINE.decode(),
                        help="the serial text that ends a boot (default: Run /init)")
    parser.add_argument("--initrd", type=Path, help="initramfs (default: leanvm initrd build)")
    args = parser.parse_args()
    INIT_LINE = args.until.encode()
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    if any(c.startswith("qemu") for c in chosen) and not have("qemu-system-x86_64"):
        print("qemu-system-x86_64 is missing: make bench installs it", file=sys.stderr)
        return 1
    memory_bytes = parse_memory(args.memory)
    kernel = args.kernel or minimal_kernel()
    results: dict[str, list[dict]] = {c: [] for c in chosen}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        initrd = args.initrd or build_initrd(tmp / "initramfs.cpio")
        vmlinux = tmp / "vmlinux"
        subprocess.run([LEANVM, "kernel", "extract", str(kernel), str(vmlinux)], check=True,
                       capture_output=True)
        print(f"kernel {kernel} ({kernel.stat().st_size >> 10} KiB), initrd "
              f"{initrd.stat().st_size >> 10} KiB, {args.memory}, cmdline {args.cmdline!r}; "
              f"memory compared at {MILESTONE.decode()!r}", flush=True)
        # QEMU gets the command line leanvm booted with, parameters its CPU profile added
        # included (on hosts that emulate kernel code: noxsave, clearcpuid=...)
        cmdline = args.cmdline
        for run in range(args.runs):  # interleaved, so drift hits every configuration alike
            for config in chosen:
                if config.startswith("leanvm"):
                    row = leanvm_config(kernel, initrd, args.cmdline, args.memory,
                                        config.removeprefix("leanvm-"), tmp, args.limit)
                else:
                    machine = "pc" if config == "qemu-pc" else "microvm"
                    image = vmlinux if config.endswith("pvh") else kernel
                    row = qemu_once(machine, image, initrd, cmdline, args.memory,
                                    memory_bytes, args.limit, MILESTONE)
                booted = row.pop("kernel_cmdline", None)
                if booted and booted != cmdline:
                    cmdline = str(booted)
                    print(f"    command line leanvm booted (QEMU gets it too): {cmdline}",
                          flush=True)
                results[config].append(row)
                shown = {k: round(v, 1) for k, v in row.items() if isinstance(v, float)}
                print(f"run {run + 1} {config:17} {shown}", flush=True)
                if row["init_ms"] != row["init_ms"]:  # NaN: never got there
                    print(f"    did not reach {INIT_LINE.decode()!r}; console ends: "
                          f"{row['console_tail'][-160:]!r}; stderr: "
                          f"{row['stderr_tail'][-160:]!r}", flush=True)
    summary = {}
    for config, rows in results.items():
        keys = sorted(k for k in rows[0] if isinstance(rows[0][k], float))
        summary[config] = {k: median([r[k] for r in rows if k in r]) for k in keys}
        if "at_init" in rows[0]:
            summary[config]["at_init"] = {k: median([r["at_init"][k] for r in rows])
                                          for k in rows[0]["at_init"]}
    nan = float("nan")
    print()
    print(f"median (range) over {args.runs} interleaved runs, seconds from spawning the VMM:")
    for config, rows in results.items():
        cells = []
        for key, label in (("first_byte_ms", "first byte"), ("milestone_ms", "milestone"),
                           ("init_ms", "Run /init")):
            values = [r[key] / 1e3 for r in rows if key in r and r[key] == r[key]]
            cells.append(f"{label} {median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
                         if values else f"{label} -")
        print(f"  {config:17} " + "; ".join(cells))
    print()
    print(f"{'configuration':17} {'first byte':>10} {'milestone':>10} {'Run /init':>10} |"
          f" at milestone: {'guest MiB':>9} {'VMM MiB':>8} | at Run /init: {'guest MiB':>9}"
          f" {'VMM MiB':>8}")
    for config, row in summary.items():
        at_init = row.get("at_init", {})
        print(f"{config:17} {row['first_byte_ms'] / 1e3:9.2f}s {row['milestone_ms'] / 1e3:9.2f}s "
              f"{row['init_ms'] / 1e3:9.2f}s | {'':13} "
              f"{row.get('guest_private_kib', nan) / 1024:9.1f} "
              f"{row.get('vmm_private_kib', nan) / 1024:8.1f} | {'':13} "
              f"{at_init.get('guest_private_kib', nan) / 1024:9.1f} "
              f"{at_init.get('vmm_private_kib', nan) / 1024:8.1f}")
    ratios = {}
    for ours in ("leanvm-bzimage", "leanvm-pvh"):
        for theirs in ("qemu-pc", "qemu-microvm", "qemu-microvm-pvh"):
            if ours in summary and theirs in summary:
                a, b = summary[ours], summary[theirs]
                ratios[f"{ours}/{theirs}"] = {
                    k: a[k] / b[k] for k in ("first_byte_ms", "milestone_ms", "init_ms",
                                             "guest_private_kib", "vmm_private_kib")
                    if k in a and k in b and b[k] and b[k] == b[k] and a[k] == a[k]}
    for name, values in ratios.items():
        print(f"ratio {name:36} " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    if "leanvm-bzimage" in summary and "leanvm-pvh" in summary:
        bz, pvh = summary["leanvm-bzimage"], summary["leanvm-pvh"]
        print(f"leanvm PVH against leanvm bzImage (the same kernel decompressed on the host, "
              f"cached, instead of by the guest's own decompressor): in-guest decompression "
              f"{bz.get('guest_decompress_ms', float('nan')) / 1e3:.1f} s (bzImage timeline), "
              f"on the host {pvh.get('host_decompress_ms', float('nan')):.1f} ms; PVH is "
              f"{(bz['milestone_ms'] - pvh['milestone_ms']) / 1e3:.1f} s sooner at the "
              f"milestone, {(bz['init_ms'] - pvh['init_ms']) / 1e3:.1f} s at Run /init. "
              "Ratios of leanvm PVH to QEMU's bzImage boots include that saving: they compare "
              "boot paths, not VMM speed; leanvm bzImage against QEMU compares like with like.")
    path = save("linux_boot", {"memory": args.memory, "cmdline": cmdline,
                               "milestone": MILESTONE.decode(), "kernel": str(kernel),
                               "runs": args.runs, "summary": summary, "ratios": ratios,
                               "raw": results})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
