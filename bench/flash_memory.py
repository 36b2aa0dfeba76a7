"""Host memory per extra VM whose firmware runs from flash and writes its variable store,
leanvm against QEMU 7.2 in the same run.

Case 1, x86 (the working case): the tiny firmware `flashwork` (tests/guests/firmware) is bank
0 (64 KiB code, read-only, one file every VM shares) and each VM gets its own copy of a
64 KiB vars store as bank 1, as a user would. Each VM reads every page of its code bank,
programs words in one vars sector and block-erases another through the CFI commands, returns
the bank to read-array mode, prints "flashwork done" and stays up (cli; hlt), and is
measured then. leanvm: `leanvm run --flash code=F --flash vars=G`; QEMU:
`qemu-system-x86_64 -M pc -accel kvm -drive if=pflash,...,readonly=on -drive if=pflash,...`.

Case 2, memory layout (arm): Debian's AAVMF images padded to 64 MiB in two virt-geometry
banks. These VMs are IDLE, held with -S (built, vCPUs never started): leanvm runs x86
guests only, so it cannot run AAVMF; the case shows what the layout of large padded banks
costs before the guest touches anything. QEMU is qemu-system-aarch64 -M virt, TCG, -S.

For each VMM and case, start 1 VM, then K (--vms, default 6), and count every host page:
  private     Private_Clean + Private_Dirty of every mapping of every VM process
  flash       the flash mappings (leanvm: its mappings of the image files; QEMU: the RAM
              blocks holding the banks and, on pc, its isa-bios copy of bank 0, found by
              their contents): their private pages and shared PSS, plus the page cache below
  shared PSS  Pss - private: each process's share of the pages it maps with others
  page cache  pages of the image files (the code image, each VM's vars copy) in the host
              page cache (mincore over an mmap of each file; the files are dropped from the
              cache before the first VM starts), less those already counted as mapped
total = private + shared PSS + page cache; per extra VM = (total(K) - total(1)) / (K - 1),
and the same difference for each part, so the parts add up to the total. A file page only
the first VM maps is private to it and becomes shared once K run (QEMU's executable), so
the private part of that difference can be less than what each VM holds privately: that is
shown too ("private of each VM with K up").
Memory the kernel keeps for KVM (page tables, vCPU state) is counted for neither VMM.
Rounds (--rounds, default 3) alternate leanvm and QEMU; figures are median (min-max).
Target for leanvm: at most 256 KiB of flash cost per extra VM.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from _common import (LEANVM_CMD, QEMU_X86, ROOT, build_firmware, have, leanvm_env,
                     qemu_pc_command, save, spread)

import build as guests  # tests/guests/build.py, on the path through _common

AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
QEMU_ARM = "qemu-system-aarch64"
KiB, MiB = 1 << 10, 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
ISA_BIOS_MAX = 128 * KiB  # QEMU's pc copies the last 128 KiB of bank 0 (at most) below 1 MiB


class Mapping(NamedTuple):
    start: int
    end: int
    path: str
    rss: int
    pss: int
    private: int  # Private_Clean + Private_Dirty
    anonymous: int

    @property
    def size(self) -> int:
        return self.end - self.start


def smaps(pid: int) -> list[Mapping]:
    out: list[Mapping] = []
    head: tuple[int, int, str] | None = None
    values: dict[str, int] = {}

    def close() -> None:
        if head is not None:
            out.append(Mapping(*head, values.get("Rss", 0), values.get("Pss", 0),
                               values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
                               values.get("Anonymous", 0)))

    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            fields = line.split()
            if fields and not fields[0].endswith(":"):
                close()
                start, _, end = fields[0].partition("-")
                head = (int(start, 16), int(end, 16), " ".join(fields[5:]))
                values = {}
            elif len(fields) >= 2 and fields[0].endswith(":") and fields[1].isdigit():
                values[fields[0][:-1]] = int(fields[1]) * KiB
    close()
    return out


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * KiB
    return 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PROT_READ, MAP_SHARED, MAP_FAILED = 1, 1, ctypes.c_void_p(-1).value


def cached_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the host page cache (mincore; mapping the file
    does not read it)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        if address == MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vector = ctypes.create_string_buffer(-(-size // PAGE))
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(byte & 1 for byte in vector.raw)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Write ``path`` out and drop it from the page cache, so that what is cached later is
    what the VMs caused."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.access(path, os.W_OK):
            os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_memory(pid: int, start: int, length: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as handle:
        handle.seek(start)
        return handle.read(length)


@dataclass
class Vm:
    proc: subprocess.Popen
    vars_copy: Path
    log: Path
    ready: bool = False


@dataclass
class Case:
    """One VMM in one case: how to start a VM, when it is ready, which mappings are flash."""

    vmm: str
    code: Path
    make_vars: Callable[[Path], None]
    start: Callable[[Path, Path], subprocess.Popen]  # (vars copy, log file)
    wait_ready: Callable[[Vm], None]
    flash_of: Callable[[Vm, list[Mapping], Path], dict[int, str]]  # start -> label


# --- starting VMs ----------------------------------------------------------------------

def _popen(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, env=env)


def wait_for_output(vm: Vm, text: bytes, timeout: float = 120) -> None:
    """Read the VM's stdout until ``text`` appears; an exit or a timeout is an error."""
    stream = vm.proc.stdout
    assert stream is not None
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"VM {vm.proc.args[0]} did not print {text!r} in {timeout:.0f} s: "
                             f"{seen[-200:]!r}")
        ready, _, _ = select.select([stream], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                err = vm.log.read_text(errors="replace").strip().splitlines()
                raise SystemExit(f"VM {vm.proc.args[0]} exited ({vm.proc.wait()}) before "
                                 f"{text!r}: {(err or [seen.decode(errors='replace')])[-1]}")
            seen += chunk


def wait_for_log(vm: Vm, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in vm.log.read_text(errors="replace"):
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"VM {vm.proc.args[0]} did not start: "
                             f"{vm.log.read_text(errors='replace').strip()[-300:]}")
        time.sleep(0.05)


def wait_idle_settled(vm: Vm) -> None:
    """A VM held with -S: ready once its memory stops changing."""
    wait_settled(vm.proc.pid)


def wait_settled(pid: int, timeout: float = 60) -> None:
    last, stable, deadline = -1, 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = rss(pid)
        stable = stable + 1 if now == last else 0
        if stable >= 3:
            return
        last = now
        time.sleep(0.2)


def flashwork_cases(code: Path) -> list[Case]:
    done = guests.FLASHWORK_DONE.encode()

    def make_vars(path: Path) -> None:
        path.write_bytes(guests.flashwork_vars())

    def leanvm(vars_copy: Path, log: Path) -> subprocess.Popen:
        return _popen([*LEANVM_CMD, "run", "-q", "-m", "16M", "--flash", f"code={code}",
                       "--flash", f"vars={vars_copy},mode=persistent"], log, leanvm_env())

    def qemu(vars_copy: Path, log: Path) -> subprocess.Popen:
        return _popen(qemu_pc_command(
            "-drive", f"if=pflash,format=raw,file={code},readonly=on",
            "-drive", f"if=pflash,format=raw,file={vars_copy}"), log)

    code_bytes = code.read_bytes()
    vars_after = guests.flashwork_vars_after(guests.flashwork_vars())
    contents = {"flash code": code_bytes, "flash vars": vars_after,
                "flash isa-bios copy": code_bytes[-ISA_BIOS_MAX:]}

    def qemu_flash(vm: Vm, maps: list[Mapping], vars_copy: Path) -> dict[int, str]:
        """QEMU's pc keeps each bank, and the isa-bios copy of bank 0, in an anonymous RAM
        block of that size: recognised by what it holds."""
        found: dict[int, str] = {}
        sizes = {len(c) for c in contents.values()}
        for m in maps:
            if m.path or m.size not in sizes:
                continue
            data = read_memory(vm.proc.pid, m.start, m.size)
            for label, expected in contents.items():
                if data == expected and label not in found.values():
                    found[m.start] = label
                    break
        missing = {"flash code", "flash vars"} - set(found.values())
        if missing:  # the flash figure would silently miss them
            raise SystemExit(f"QEMU (pid {vm.proc.pid}): no RAM block holds the "
                             f"{' or '.join(sorted(missing))} contents; cannot count its flash")
        return found

    return [Case("leanvm", code, make_vars, leanvm,
                 lambda vm: wait_for_output(vm, done), leanvm_flash(code)),
            Case("QEMU -M pc", code, make_vars, qemu,
                 lambda vm: wait_for_output(vm, done), qemu_flash)]


def leanvm_flash(code: Path) -> Callable[[Vm, list[Mapping], Path], dict[int, str]]:
    """leanvm maps each bank from its image file (and erased flash past an image from one
    shared file of 0xff bytes): its flash mappings are named by those files."""
    def find(vm: Vm, maps: list[Mapping], vars_copy: Path) -> dict[int, str]:
        found = {}
        for m in maps:
            if m.path == str(code):
                found[m.start] = "flash code"
            elif m.path == str(vars_copy):
                found[m.start] = "flash vars"
            elif "leanvm-erased" in m.path:
                found[m.start] = "flash erased (shared 0xff file)"
        return found
    return find


def aavmf_cases() -> list[Case]:
    def make_vars(path: Path) -> None:
        shutil.copyfile(AAVMF_VARS, path)

    def leanvm(vars_copy: Path, log: Path) -> subprocess.Popen:
        return _popen([*LEANVM_CMD, "run", "-S", "--flash", f"code={AAVMF_CODE},geometry=virt",
                       "--flash", f"vars={vars_copy},geometry=virt,mode=persistent"], log,
                      leanvm_env())

    def leanvm_ready(vm: Vm) -> None:
        wait_for_log(vm, "waiting")
        wait_idle_settled(vm)

    def qemu(vars_copy: Path, log: Path) -> subprocess.Popen:
        return _popen([QEMU_ARM, "-M", "virt", "-cpu", "cortex-a57", "-accel", "tcg", "-S",
                       "-display", "none", "-nodefaults", "-m", "128M",
                       "-drive", f"if=pflash,format=raw,file={AAVMF_CODE},readonly=on",
                       "-drive", f"if=pflash,format=raw,file={vars_copy}"], log)

    def qemu_flash(vm: Vm, maps: list[Mapping], vars_copy: Path) -> dict[int, str]:
        """QEMU's virt keeps each 64 MiB bank in an anonymous RAM block of about that size."""
        return {m.start: "flash bank" for m in maps
                if not m.path and 64 * MiB <= m.size <= 66 * MiB}

    return [Case("leanvm", AAVMF_CODE, make_vars, leanvm, leanvm_ready, leanvm_flash(AAVMF_CODE)),
            Case("QEMU -M virt", AAVMF_CODE, make_vars, qemu, wait_idle_settled, qemu_flash)]


# --- measuring ---------------------------------------------------------------------------

GUEST_RAM = 16 * MiB  # -m 16M in case 1: an anonymous mapping of this size is guest RAM


def label_of(m: Mapping, flash: dict[int, str]) -> str:
    if m.start in flash:
        return flash[m.start]
    if not m.path:
        return "guest RAM" if m.size == GUEST_RAM else "[anonymous]"
    return m.path if m.path.startswith("[") else Path(m.path.split(" ")[0]).name


def snapshot(case: Case, vms: list[Vm]) -> dict:
    """Host pages of all ``vms`` now: private, shared PSS, unmapped page cache of the image
    files, and (private + shared PSS) by mapping label."""
    private = shared = flash_private = flash_shared = 0
    by_label: Counter[str] = Counter()
    mapped_file: dict[str, int] = {}  # image file -> most of its page-cache pages one VM maps
    for vm in vms:
        maps = smaps(vm.proc.pid)
        flash = case.flash_of(vm, maps, vm.vars_copy)
        per_file: Counter[str] = Counter()
        for m in maps:
            private += m.private
            shared += m.pss - m.private
            label = label_of(m, flash)
            by_label[label] += m.pss
            if m.start in flash:
                flash_private += m.private
                flash_shared += m.pss - m.private
            if m.path:
                per_file[m.path] += (m.rss - m.anonymous) // PAGE
        for path, pages in per_file.items():
            mapped_file[path] = max(mapped_file.get(path, 0), pages)
    files = [case.code, *(vm.vars_copy for vm in vms)]
    cached = {str(f): cached_pages(f) for f in files}
    unmapped = sum(max(0, pages - mapped_file.get(path, 0)) for path, pages in cached.items())
    page_cache = unmapped * PAGE
    return {"private": private, "private_each": private / len(vms),
            "flash_private_each": flash_private / len(vms),
            "shared_pss": shared, "flash_private": flash_private,
            "flash_shared_pss": flash_shared, "page_cache": page_cache,
            "page_cache_all": sum(cached.values()) * PAGE,
            "total": private + shared + page_cache,
            "flash": flash_private + flash_shared + page_cache,
            "by_label": dict(by_label)}


def measure(case: Case, count: int, work: Path, tag: str) -> dict:
    vms: list[Vm] = []
    snaps = {}
    try:
        if os.access(case.code, os.R_OK):
            drop_cache(case.code)
        before = cached_pages(case.code) * PAGE
        for target in (1, count):
            while len(vms) < target:
                vars_copy = work / f"{tag}-vars-{len(vms)}.fd"
                case.make_vars(vars_copy)
                drop_cache(vars_copy)
                log = work / f"{tag}-{len(vms)}.log"
                vms.append(Vm(case.start(vars_copy, log), vars_copy, log))
            for vm in vms:
                if not vm.ready:
                    case.wait_ready(vm)
                    vm.ready = True
            for vm in vms:
                wait_settled(vm.proc.pid)
            snaps[target] = snapshot(case, vms)
    finally:
        for vm in vms:
            if vm.proc.poll() is None:
                vm.proc.send_signal(signal.SIGTERM)
        for vm in vms:
            try:
                vm.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                vm.proc.kill()
                vm.proc.wait()
            if vm.proc.stdout is not None:
                vm.proc.stdout.close()
    one, many, extra = snaps[1], snaps[count], count - 1
    per_extra = {key: (many[key] - one[key]) / extra for key in one
                 if key not in ("by_label", "private_each", "flash_private_each")}
    per_extra["private_each"] = many["private_each"]  # not a difference: each VM, K up
    per_extra["flash_private_each"] = many["flash_private_each"]
    labels = set(one["by_label"]) | set(many["by_label"])
    per_extra["by_label"] = {label: (many["by_label"].get(label, 0) -
                                     one["by_label"].get(label, 0)) / extra for label in labels}
    return {"first_vm": {k: v for k, v in one.items() if k != "by_label"},
            "per_extra_vm": per_extra, "code_cached_before": before}


def summarise(rounds: list[dict]) -> dict:
    """Median (min-max) over rounds of every figure, in KiB."""
    out: dict = {"runs": len(rounds)}
    for part in ("first_vm", "per_extra_vm"):
        out[part] = {}
        for key in rounds[0][part]:
            if key == "by_label":
                continue
            values = [r[part][key] / KiB for r in rounds]
            s = spread(values)
            out[part][key] = {"median": round(s["median"], 1),
                              "range": [round(s["min"], 1), round(s["max"], 1)]}
    labels = Counter()
    for r in rounds:
        for label, value in r["per_extra_vm"]["by_label"].items():
            labels[label] += value / len(rounds) / KiB
    out["per_extra_vm_by_mapping_kib"] = {k: round(v, 1) for k, v in labels.most_common()
                                          if abs(v) >= 4}
    return out


def fmt(figure: dict) -> str:
    low, high = figure["range"]
    return f"{figure['median']:.0f} ({low:.0f}-{high:.0f})"


def report(title: str, results: dict[str, dict], vms: int, rounds: int) -> None:
    names = list(results)
    print(f"\n{title}\n1 then {vms} VMs, {rounds} alternating rounds, KiB, median (min-max)")
    print(f"{'':34}" + "".join(f"{n:>24}" for n in names))
    rows = [("first VM: total", "first_vm", "total"),
            ("per extra VM: total", "per_extra_vm", "total"),
            ("  private", "per_extra_vm", "private"),
            ("    in flash mappings", "per_extra_vm", "flash_private"),
            ("  shared PSS", "per_extra_vm", "shared_pss"),
            ("    in flash mappings", "per_extra_vm", "flash_shared_pss"),
            ("  image page cache", "per_extra_vm", "page_cache"),
            ("per extra VM: flash cost", "per_extra_vm", "flash"),
            ("private of each VM with K up", "per_extra_vm", "private_each"),
            ("  in flash mappings", "per_extra_vm", "flash_private_each")]
    for text, part, key in rows:
        print(f"{text:34}" + "".join(f"{fmt(results[n][part][key]):>24}" for n in names))
    for name in names:
        top = list(results[name]["per_extra_vm_by_mapping_kib"].items())[:6]
        print(f"  {name} per extra VM, by mapping (private + shared PSS, mean KiB): "
              + ", ".join(f"{label} {value:.0f}" for label, value in top))


def run_case(cases: list[Case], vms: int, rounds: int, work: Path, tag: str) -> dict[str, dict]:
    samples: dict[str, list[dict]] = {case.vmm: [] for case in cases}
    for index in range(rounds):
        for case in cases:
            slug = f"{tag}-{case.vmm.split()[0].lower()}-{index}"
            samples[case.vmm].append(measure(case, vms, work, slug))
    return {name: summarise(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=6, help="VMs per VMM at the second step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-aavmf", action="store_true", help="the x86 case only")
    args = parser.parse_args()
    if args.vms < 2 or args.rounds < 1:
        parser.error("--vms must be at least 2 and --rounds at least 1")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise SystemExit("flash_memory needs /dev/kvm")
    work = Path(tempfile.mkdtemp(prefix="leanvm-flash-", dir=ROOT / "build"))  # not tmpfs
    saved: dict = {"vms": args.vms, "rounds": args.rounds}
    try:
        code = work / "flashwork-code.bin"
        shutil.copyfile(build_firmware("flashwork"), code)  # one code image every VM shares
        cases = flashwork_cases(code)
        if not have(QEMU_X86):
            print(f"{QEMU_X86} is not installed: leanvm only (scripts/install-deps bench)")
            cases = cases[:1]
        x86 = run_case(cases, args.vms, args.rounds, work, "x86")
        report("case 1, x86: the tiny firmware `flashwork` running from flash and writing its "
               f"store ({guests.FIRMWARE_SIZE // KiB} KiB code bank shared, "
               f"{guests.FLASHWORK_VARS_SIZE // KiB} KiB vars copy per VM)", x86, args.vms,
               args.rounds)
        saved["x86_flashwork"] = x86
        if args.skip_aavmf:
            pass
        elif not AAVMF_CODE.exists() or not AAVMF_VARS.exists():
            print("\ncase 2 skipped: needs Debian's qemu-efi-aarch64 (make bench installs it)")
        else:
            cases = aavmf_cases()
            if not have(QEMU_ARM):
                cases = cases[:1]
            arm = run_case(cases, args.vms, args.rounds, work, "aavmf")
            report("case 2, memory layout: two 64 MiB AAVMF banks (virt geometry), IDLE VMs "
                   "held with -S (vCPUs never run: leanvm cannot execute arm firmware)", arm,
                   args.vms, args.rounds)
            saved["aavmf_idle"] = arm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lv = x86["leanvm"]["per_extra_vm"]
    flash = lv["flash"]["median"]
    labels = x86["leanvm"]["per_extra_vm_by_mapping_kib"]
    python = sum(v for k, v in labels.items() if not k.startswith(("flash", "guest RAM")))
    print(f"\nwhat leanvm's extra VM costs: the Python process ({python:.0f} KiB outside "
          "flash and guest RAM: interpreter heap and arenas, its libraries' shares); flash "
          f"{flash:.0f} KiB = {lv['flash_private_each']['median']:.0f} KiB of vars sectors it "
          "wrote (copied on write in its private mapping of the store) + "
          f"{lv['page_cache']['median']:.0f} KiB of page cache of its vars copy (the kernel "
          "reads ahead around the first fault on the file mapping) + the code bank's pages, "
          "shared by every VM")
    print(f"\nleanvm flash cost per extra VM running flashwork: {flash:.0f} KiB (target <= "
          f"256 KiB): {'met' if flash <= 256 else 'NOT met'}")
    if "QEMU -M pc" in x86:
        q = x86["QEMU -M pc"]["per_extra_vm"]
        total = q["total"]["median"] / lv["total"]["median"]
        saved["ratio_qemu_to_leanvm_total"] = round(total, 2)
        print(f"QEMU / leanvm per extra VM: whole {q['total']['median']:.0f} vs "
              f"{lv['total']['median']:.0f} KiB ({total:.2f}x); flash {q['flash']['median']:.0f} "
              f"vs {flash:.0f} KiB")
    save("flash_memory", saved)


if __name__ == "__main__":
    main()
