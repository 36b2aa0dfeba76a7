"""Guest memory dumps: leanvm against QEMU 7.2's dump-guest-memory on the same guest state.

The guest: Debian's SeaBIOS with nothing to boot, at "No bootable device", with 1 GiB and
4 GiB of RAM. QEMU (`-M pc -accel kvm`) is driven over QMP (qemu.qmp) and dumps with
`dump-guest-memory` (it stops the guest for the whole dump: its pause is the dump's time);
leanvm stops there by itself and dumps with `Machine.dump()`. Both write an ELF core and a
kdump-zlib file. For each: file size, wall time, and the host pages the dumping process
gained (VmRSS after minus before). The live pause is measured apart, on a bare guest that
spins while it is dumped (tests/guests/programs/dumpme.c), 1 GiB and 4 GiB, with 0, 256 MiB
and more of it populated: by write-protection (the default where the host allows it: the
pause does not grow with memory), and by fork (which copies page tables, so it does), with
4 KiB pages and with --huge-pages RAM. Runs are interleaved; figures are medians with their
range; ratios are leanvm/QEMU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, build_guest, have, save_and_hand_back, spread

sys.path.insert(0, str(ROOT / "src"))

SEABIOS = Path("/usr/share/seabios/bios.bin")
NO_BOOT = b"No bootable device"
FORMATS = ("elf", "kdump-zlib")
MiB = 1 << 20
FILL = bytes(range(1, 256)) * (64 * MiB // 255) + bytes(64 * MiB % 255)  # 64 MiB, not zero


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_for_file(path: Path, text: bytes, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_bytes():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU ended ({proc.returncode}) before {text!r}")
        time.sleep(0.02)
    raise RuntimeError(f"QEMU showed no {text!r} in {timeout:g} s")


def qemu_once(memory: str, tmp: Path) -> dict[str, dict[str, float]]:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, debug = tmp / "qmp.sock", tmp / "debugcon.log"
    for stale in (sock, debug):
        stale.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "pc", "-accel", "kvm", "-m", memory, "-nodefaults",
         "-no-user-config", "-display", "none", "-bios", str(SEABIOS),
         "-chardev", f"file,id=dbg,path={debug}", "-device",
         "isa-debugcon,iobase=0x402,chardev=dbg", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_file(debug, NO_BOOT, 60, proc)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect()
        figures = {}
        for name in FORMATS:
            out = tmp / f"qemu.{name}"
            before = rss_bytes(proc.pid)
            start = time.monotonic()
            reply = qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}",
                            format=name)
            seconds = time.monotonic() - start
            if "error" in reply:
                raise RuntimeError(f"QEMU: {reply['error']}")
            figures[name] = {"size": out.stat().st_size, "seconds": seconds,
                             "pause_ms": seconds * 1e3,  # the guest is stopped throughout
                             "rss_gained": rss_bytes(proc.pid) - before}
            out.unlink()
        qmp.close()
        return figures
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def leanvm_once(memory: str, tmp: Path) -> dict[str, dict[str, float]]:
    from leanvm.machine.machine import Machine

    figures = {}
    with Machine(memory=memory, bios=SEABIOS) as vm:
        result = vm.run(timeout=120)
        if NO_BOOT not in result.detail.encode():
            raise RuntimeError(f"leanvm's SeaBIOS guest stopped otherwise: {result.detail}")
        for name in FORMATS:
            out = tmp / f"leanvm.{name}"
            before, guest_before = rss_bytes(), guest_resident(vm)
            start = time.monotonic()
            done = vm.dump(out, name)
            seconds = time.monotonic() - start
            figures[name] = {"size": out.stat().st_size, "seconds": seconds,
                             "pause_ms": done.pause_ms, "rss_gained": rss_bytes() - before,
                             "guest_pages_gained": (guest_resident(vm) - guest_before) // 4096,
                             "memory": done.memory}
            out.unlink()
        figures["held"] = {"bytes": vm_held(vm)}
    return figures


def guest_resident(vm: object) -> int:
    """Bytes of guest memory resident in this process (pagemap), every region."""
    from leanvm.memory.residency import measure

    regions = [(r.name, r.mapping.address, r.size) for r in vm.memory.regions]  # type: ignore[attr-defined]
    return sum(row.resident for row in measure(regions))


def vm_held(vm: object) -> int:
    """Bytes of guest RAM the host holds (what a dump may contain)."""
    from leanvm.machine.dump import memory_runs

    runs, _ = memory_runs(vm.memory)  # type: ignore[attr-defined]
    return sum(len(run.data) for run in runs)


def live_pause(memory: str, populated: int, guest: Path, tmp: Path,
               huge: bool = False, method: str = "auto") -> dict[str, float]:
    from leanvm.machine.config import MachineConfig
    from leanvm.machine.dump import DumpRequest, dump_live
    from leanvm.machine.machine import Machine

    with Machine(MachineConfig(memory=memory, guest=guest, args="spin", huge_pages=huge)) as vm:
        for offset in range(0, populated, 64 * MiB):  # above the guest's own pages
            vm.memory.write(256 * MiB + offset, FILL)
        vm.wait_for_console("dump me", timeout=60)
        out = tmp / "live.kdump"
        before, guest_before = rss_bytes(), guest_resident(vm)
        done = dump_live(vm, DumpRequest(out, "kdump-zlib"), method=method).wait()
        if method != "auto" and done.method != method:
            raise RuntimeError(f"asked for a {method} live dump, got {done.method}")
        gained = rss_bytes() - before
        guest_gained = guest_resident(vm) - guest_before
        running = vm.state.value == "running"
        vm.stop()
        vm.wait(30)
        out.unlink()
    if not running:
        raise RuntimeError("the guest did not run on after its live dump")
    return {"pause_ms": done.pause_ms, "seconds": done.seconds, "size": done.size,
            "rss_gained": gained, "guest_bytes_gained": guest_gained}


def summarise(runs: list[dict[str, dict[str, float]]], fmt: str) -> dict[str, dict]:
    keys = runs[0][fmt]
    return {key: spread([r[fmt][key] for r in runs]) for key in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", nargs="+", default=["1G", "4G"])
    args = parser.parse_args()
    missing = [what for what, ok in (("qemu-system-x86_64", have("qemu-system-x86_64")),
                                     (str(SEABIOS), SEABIOS.exists())) if not ok]
    if missing or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print(f"bench/dump.py needs {', '.join(missing) or '/dev/kvm'}: make bench installs "
              "the packages", file=sys.stderr)
        return 1
    rows, pauses = [], []
    guest = build_guest("dumpme", "elf")
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp_name:
        tmp = Path(tmp_name)
        for memory in args.memory:
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(leanvm_once(memory, tmp))
                theirs.append(qemu_once(memory, tmp))
            held = spread([r["held"]["bytes"] for r in ours])
            for fmt in FORMATS:
                row = {"memory": memory, "format": fmt, "held": held,
                       "leanvm": summarise(ours, fmt), "qemu": summarise(theirs, fmt),
                       "ratio_seconds": spread([a[fmt]["seconds"] / b[fmt]["seconds"]
                                                for a, b in zip(ours, theirs)]),
                       "ratio_size": spread([a[fmt]["size"] / b[fmt]["size"]
                                             for a, b in zip(ours, theirs)])}
                rows.append(row)
            big = 1024 * MiB if memory != "1G" else 512 * MiB
            most = 2560 * MiB if memory == "4G" else big  # below the PCI hole at 3 GiB
            cases = [(0, False, "auto"), (256 * MiB, False, "auto"), (big, False, "auto")]
            cases += [(most, False, "auto")] if most != big else []
            cases += [(big, False, "fork"), (big, True, "fork")]  # what the pause was by fork
            for populated, huge, method in cases:
                runs = [live_pause(memory, populated, guest, tmp, huge, method)
                        for _ in range(args.runs)]
                pauses.append({"memory": memory, "populated": populated, "huge_pages": huge,
                               "method": method,
                               **{k: spread([r[k] for r in runs]) for k in runs[0]}})
    report(rows, pauses)
    save_and_hand_back("dump", {"rows": rows, "live": pauses, "runs": args.runs})
    return 0


def _mr(figure: dict, scale: float = 1.0, digits: int = 2) -> str:
    return (f"{figure['median'] * scale:.{digits}f} "
            f"({figure['min'] * scale:.{digits}f}-{figure['max'] * scale:.{digits}f})")


def report(rows: list[dict], pauses: list[dict]) -> None:
    print("guest at SeaBIOS's 'No bootable device'; median (min-max)")
    print(f"{'RAM':>4} {'format':<11} {'held MiB':>9} {'leanvm MiB':>16} {'QEMU MiB':>22} "
          f"{'leanvm s':>20} {'QEMU s':>20} {'time ratio':>18} {'RSS +KiB l/Q':>14}")
    for row in rows:
        ours, theirs = row["leanvm"], row["qemu"]
        print(f"{row['memory']:>4} {row['format']:<11} {row['held']['median'] / MiB:9.2f} "
              f"{_mr(ours['size'], 1 / MiB):>16} {_mr(theirs['size'], 1 / MiB, 1):>22} "
              f"{_mr(ours['seconds'], 1, 3):>20} {_mr(theirs['seconds'], 1, 3):>20} "
              f"{_mr(row['ratio_seconds'], 1, 4):>18} "
              f"{ours['rss_gained']['median'] / 1024:.0f}/{theirs['rss_gained']['median'] / 1024:.0f}")
    print("live dumps of a running guest (kdump-zlib): the guest's pause, ms")
    for row in pauses:
        pages = "2M pages" if row.get("huge_pages") else "4K pages"
        how = "fork" if row.get("method") == "fork" else "protect"
        print(f"{row['memory']:>4} {pages} {how:<7} with {row['populated'] // MiB:4d} MiB "
              "populated: pause "
              f"{_mr(row['pause_ms'])} ms, dump {_mr(row['seconds'], 1, 3)} s, "
              f"VMM RSS +{row['rss_gained']['median'] / 1024:.0f} KiB")


if __name__ == "__main__":
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is missing: make bench installs it", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
