"""Host memory per VM for two flash banks holding Debian's padded AAVMF images (64 MiB each,
code read-only, a private copy of the vars store per VM), leanvm against QEMU
(qemu-system-aarch64 -M virt, TCG, -S) in the same run.

For each VMM: start 1 VM, then 10, each idle (-S: built, vCPUs not started); report the PSS
added by each extra VM, for the whole process and for the flash mappings alone.
Target for leanvm: at most 256 KiB of flash cost per extra VM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import have, save

LEANVM = str(Path(sys.executable).with_name("leanvm"))
CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
KiB, MiB = 1 << 10, 1 << 20


def smaps(pid: int) -> list[tuple[int, int, str, int]]:
    """(start, end, path, pss bytes) per mapping."""
    out = []
    current = None
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, _, end = fields[0].partition("-")
                current = [int(start, 16), int(end, 16), fields[5] if len(fields) > 5 else "", 0]
                out.append(current)
            elif fields[0] == "Pss:" and current is not None:
                current[3] = int(fields[1]) * KiB
    return [tuple(m) for m in out]  # type: ignore[misc]


def pss_total(pid: int) -> int:
    return sum(m[3] for m in smaps(pid))


def flash_pss_leanvm(pid: int, files: set[str]) -> int:
    return sum(m[3] for m in smaps(pid) if m[2] in files or "leanvm-erased" in m[2])


def flash_pss_qemu(pid: int) -> int:
    """QEMU keeps each pflash bank in an anonymous RAM block of the bank's size."""
    return sum(m[3] for m in smaps(pid)
               if not m[2] and 64 * MiB <= m[1] - m[0] <= 66 * MiB)


def wait_settled(pid: int, timeout: float = 60) -> None:
    last, stable, deadline = -1, 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = pss_total(pid)
        stable = stable + 1 if now == last else 0
        if stable >= 3:
            return
        last = now
        time.sleep(0.2)


def start_leanvm(vars_copy: Path) -> subprocess.Popen:
    proc = subprocess.Popen([LEANVM, "run", "-S", "--flash", f"code={CODE},geometry=virt",
                             "--flash", f"vars={vars_copy},geometry=virt,mode=persistent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "waiting" not in line:
        raise RuntimeError(f"leanvm did not start: {line}{proc.stderr.read()}")
    return proc


def start_qemu(vars_copy: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-accel",
                             "tcg", "-S", "-display", "none", "-nodefaults", "-m", "128M",
                             "-drive", f"if=pflash,format=raw,file={CODE},readonly=on",
                             "-drive", f"if=pflash,format=raw,file={vars_copy}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def measure(name: str, start, count: int, work: Path) -> dict[str, float]:
    procs: list[subprocess.Popen] = []
    try:
        totals = {}
        for target in (1, count):
            while len(procs) < target:
                vars_copy = work / f"{name}-vars-{len(procs)}.fd"
                shutil.copyfile(VARS, vars_copy)
                procs.append(start(vars_copy))
            for proc in procs:
                wait_settled(proc.pid)
            files = {str(CODE)} | {str(work / f"{name}-vars-{i}.fd") for i in range(len(procs))}
            whole = sum(pss_total(p.pid) for p in procs)
            flash = sum((flash_pss_leanvm(p.pid, files) if name == "leanvm"
                         else flash_pss_qemu(p.pid)) for p in procs)
            totals[target] = (whole, flash)
        extra = count - 1
        return {
            "first_vm_process_kib": totals[1][0] / KiB,
            "first_vm_flash_kib": totals[1][1] / KiB,
            "per_extra_vm_process_kib": (totals[count][0] - totals[1][0]) / extra / KiB,
            "per_extra_vm_flash_kib": (totals[count][1] - totals[1][1]) / extra / KiB,
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10)
    args = parser.parse_args()
    if not CODE.exists() or not VARS.exists():
        sys.exit("needs Debian's qemu-efi-aarch64 (make bench installs it)")
    work = Path(tempfile.mkdtemp(prefix="leanvm-flash-"))
    try:
        results = {"leanvm": measure("leanvm", start_leanvm, args.vms, work)}
        if have("qemu-system-aarch64"):
            results["qemu"] = measure("qemu", start_qemu, args.vms, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"flash memory: two 64 MiB AAVMF banks per VM, 1 then {args.vms} idle VMs (PSS, KiB)")
    print(f"{'':8} {'1st VM flash':>13} {'1st VM total':>13} {'+VM flash':>10} {'+VM total':>10}")
    for name, r in results.items():
        print(f"{name:8} {r['first_vm_flash_kib']:13.0f} {r['first_vm_process_kib']:13.0f} "
              f"{r['per_extra_vm_flash_kib']:10.0f} {r['per_extra_vm_process_kib']:10.0f}")
    lv = results["leanvm"]["per_extra_vm_flash_kib"]
    print(f"leanvm flash cost per extra VM: {lv:.0f} KiB (target <= 256 KiB): "
          f"{'met' if lv <= 256 else 'NOT met'}")
    if "qemu" in results:
        q = results["qemu"]["per_extra_vm_flash_kib"]
        ratio_flash = q / max(lv, 1)
        ratio_total = results["qemu"]["per_extra_vm_process_kib"] / results["leanvm"]["per_extra_vm_process_kib"]
        print(f"QEMU / leanvm per extra VM: flash {q:.0f} KiB vs {lv:.0f} KiB "
              f"({'%.0fx' % ratio_flash if lv >= 1 else 'leanvm ~0'}), whole process {ratio_total:.1f}x")
        results["ratio_whole_process"] = round(ratio_total, 2)  # type: ignore[assignment]
    save("flash_memory", {"vms": args.vms, "results": results})


if __name__ == "__main__":
    main()
