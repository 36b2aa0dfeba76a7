"""virtio-mem: what a guest's unplugged memory costs the host, leanvm against QEMU.

    bench/virtio_mem.py --in-l1     # from this host: starts L1 (scripts/nested-kvm), runs there
    bench/virtio_mem.py             # on a host whose KVM runs guest user space

Same minimal kernel and command line for both VMMs, 512 MiB of boot RAM and a 1 GiB
virtio-mem region with 1 GiB requested: leanvm `--virtio-mem size=1G,requested=1G`, QEMU
`-M pc -object memory-backend-ram,size=1G -device virtio-mem-pci,requested-size=1G`. The
guest's /init (busybox) waits until the memory is plugged, fills 900 MiB of tmpfs (so the
host backs it), deletes the file and says so. Then the host asks for 128 MiB (leanvm:
``vm.virtio_mem[0].resize``; QEMU: QMP qom-set requested-size), the guest unplugs 896 MiB,
and the VMM's RSS is sampled every 5 ms: before, after, and the time from the request to
the drop (when RSS first fell by 90% of what it fell in all). leanvm's VMM time per
unplugged block comes from its own stats, and, without a guest, from the device model
unplugging 256 touched blocks (on this host before going to L1, and in L1). Runs
interleave; median and range of --runs.

This host's KVM cannot run guest user space (docs/facts.md#this-hosts-kvm), so the figures
come from L1 (a real KVM under QEMU TCG: docs/nested.md), where times are slow but both
VMMs share the same slowness.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import QEMU_X86, ROOT, run_in_l1, save_and_hand_back, spread, user_space_missing
from linux_boot import minimal_kernel

MB = 1 << 20
BOOT_RAM, REGION, FILL, SMALL = "512M", 1024 * MB, 900, 128 * MB
# The minimal kernel onlines plugged memory into the normal zone by itself; its tmpfs is ramfs
# (no shmem), whose pages may not come from the movable zone, so online_movable would not do.
CMDLINE = "console=ttyS0 rodata=off rdinit=/bench-init"
PLUGGED, FILLED = "leanvm-bench: plugged", "leanvm-bench: filled"
INIT = f"""#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mkdir -p /mnt
mount -t tmpfs -o size=95% tmpfs /mnt
while [ "$(awk '/MemTotal/ {{print $2}}' /proc/meminfo)" -lt 1400000 ]; do sleep 0.1; done
echo "{PLUGGED}"
dd if=/dev/zero of=/mnt/fill bs=1M count={FILL} 2>/dev/null; sync; rm /mnt/fill
echo "{FILLED}"
while :; do sleep 1000; done
"""
SAMPLE_S = 0.005


def vm_rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build_initrd(out: Path) -> Path:
    from leanvm.loader.initramfs import busybox_image

    image = busybox_image()
    image.file("/bench-init", INIT.encode(), 0o755)
    image.write(out)
    return out


def watch_rss(pid: int | str, start: float, stop: threading.Event) -> list[tuple[float, int]]:
    samples: list[tuple[float, int]] = []
    while not stop.is_set():
        samples.append((time.monotonic() - start, vm_rss(pid)))
        time.sleep(SAMPLE_S)
    return samples


def drop_time(samples: list[tuple[float, int]]) -> tuple[int, int, float | None]:
    """(RSS before, RSS at the end, s to 90% of the drop)."""
    before, after = samples[0][1], samples[-1][1]
    mark = before - 0.9 * (before - after)
    when = next((t for t, rss in samples if rss <= mark), None)
    return before, after, when


def measure(pid: int | str, resize, plugged, timeout: float = 600) -> dict:
    """Resize to SMALL, sample RSS until the guest has unplugged and a second has passed."""
    stop = threading.Event()
    start = time.monotonic()
    box: list = []
    sampler = threading.Thread(target=lambda: box.append(watch_rss(pid, start, stop)))
    sampler.start()
    time.sleep(0.05)
    requested = time.monotonic()
    resize(SMALL)
    while plugged() != SMALL and time.monotonic() - requested < timeout:
        time.sleep(0.05)
    unplugged_s = time.monotonic() - requested
    time.sleep(1)
    stop.set()
    sampler.join()
    samples = [(t - (requested - start), rss) for t, rss in box[0]]
    before, after, when = drop_time(samples)
    return {"rss_before": before, "rss_after": after, "drop_s": when,
            "unplugged_s": unplugged_s, "reached": plugged() == SMALL}


def run_leanvm(kernel: Path, initrd: Path, limit: float) -> dict:
    from leanvm.machine.machine import Machine

    with Machine(memory=f"{BOOT_RAM},maxmem=2G", kernel=kernel, initrd=initrd,
                 cmdline=CMDLINE, virtio_mem=(f"size={REGION >> 20}M,requested=1G",)) as vm:
        vm.start(timeout=limit)
        handle = vm.virtio_mem[0]
        vm.wait_for_console(FILLED, timeout=limit)
        resident = handle.resident()
        row = measure("self", handle.resize, lambda: handle.plugged_size)
        row["region_before"], row["region_after"] = resident, handle.resident()
        stats = vm.virtio.stats()[0]
        row["unplug_us_per_block"] = stats["unplug_ns_per_block"] / 1000
        row["unplugged_blocks"] = stats["unplugged_blocks"]
        vm.stop("benchmark done")
        vm.wait(60)
    return row


class Qmp:
    """Just enough QMP for the benchmark (the project's QMP client tests use qemu.qmp)."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.call("qmp_capabilities")

    def call(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        self.sock.close()


def wait_file(path: Path, text: str, limit: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + limit
    while text.encode() not in (path.read_bytes() if path.exists() else b""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"QEMU did not print {text!r}: {path.read_bytes()[-2000:]!r}")
        time.sleep(0.1)


def run_qemu(kernel: Path, initrd: Path, limit: float, tmp: Path) -> dict:
    serial, sock = tmp / "qemu-serial.txt", tmp / "qmp.sock"
    serial.unlink(missing_ok=True)
    cmd = [QEMU_X86, "-M", "pc", "-accel", "kvm", "-cpu", "host", "-m", f"{BOOT_RAM},maxmem=2G",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{serial}",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE,
           "-object", f"memory-backend-ram,id=mem0,size={REGION >> 20}M",
           "-device", "virtio-mem-pci,id=vm0,memdev=mem0,requested-size=1G",
           "-qmp", f"unix:{sock},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = Qmp(sock, 60)
        wait_file(serial, FILLED, limit, proc)
        path = "/machine/peripheral/vm0"
        row = measure(proc.pid, lambda size: qmp.call("qom-set", path=path,
                                                      property="requested-size", value=size),
                      lambda: qmp.call("qom-get", path=path, property="size"))
        qmp.call("quit")
        qmp.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    return row


def vmm_unplug_cost(rounds: int = 5, blocks: int = 256) -> dict:
    """The VMM's own cost per unplugged 2 MiB block, without a guest: a region of ``blocks``
    plugged blocks, every page written (so each block is a resident huge page, as after a
    guest used it), then unplugged in 4 MiB requests as Linux's driver sends them, through
    the device model, the discard manager and the host (madvise). us per block, per round."""
    sys.path.insert(0, str(ROOT / "src"))
    from leanvm.devices.virtio.mem import REQ_UNPLUG, RESP_ACK, VirtioMem
    from leanvm.memory.discard import DiscardManager
    from leanvm.memory.host import ReleasePages, map_anonymous_huge

    block, base, per_round = 2 * MB, 1 << 32, []
    mapping = map_anonymous_huge(blocks * block)
    try:
        view = mapping.view()
        discard = DiscardManager("bench", blocks * block, block)
        discard.add_listener(ReleasePages(mapping))
        device = VirtioMem("bench", base, discard, requested_size=blocks * block)
        for _ in range(rounds):
            discard.populate(0, blocks * block)
            for offset in range(0, blocks * block, 4096):
                view[offset] = 1
            start = time.perf_counter_ns()
            for index in range(0, blocks, 2):
                assert device.handle(REQ_UNPLUG, base + index * block, 2)[0] == RESP_ACK
            per_round.append((time.perf_counter_ns() - start) / blocks / 1000)
        view.release()
    finally:
        mapping.unmap()
    return spread(per_round)


def show_vmm_cost() -> dict:
    cost = vmm_unplug_cost()
    print(f"VMM time per unplugged 2 MiB block (touched, huge page), no guest, "
          f"{cost['runs']} rounds of 256 blocks: {cost['median']:.1f} us "
          f"({cost['min']:.1f}-{cost['max']:.1f})", flush=True)
    return cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=float, default=300, help="seconds per boot at most")
    parser.add_argument("--in-l1", action="store_true",
                        help="start the L1 (scripts/nested-kvm) and run there")
    args = parser.parse_args()
    if args.in_l1:
        host = show_vmm_cost()  # on this host, before the rest runs in L1
        done = run_in_l1(__file__, "virtio_mem", ["--runs", str(args.runs)])
        figures = ROOT / "bench" / "results" / "virtio_mem.json"
        if figures.exists():
            data = json.loads(figures.read_text())
            data["host_vmm_unplug_us_per_block"] = host
            figures.write_text(json.dumps(data, indent=1) + "\n")
        return done
    if user_space_missing(", which the benchmark needs to fill the plugged memory"):
        show_vmm_cost()  # what needs no guest
        return 1
    return run(args)


def run(args: argparse.Namespace) -> int:
    vmm = show_vmm_cost()
    kernel = minimal_kernel()
    rows: dict[str, list[dict]] = {"leanvm": [], "qemu": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        initrd = build_initrd(tmp / "initramfs.cpio")
        for round_ in range(args.runs):
            # a run that hangs ends the benchmark with every thread's stack, not silence
            faulthandler.dump_traceback_later(2 * args.limit, exit=True)
            rows["leanvm"].append(run_leanvm(kernel, initrd, args.limit))
            faulthandler.dump_traceback_later(2 * args.limit, exit=True)
            rows["qemu"].append(run_qemu(kernel, initrd, args.limit, tmp))
            print(f"run {round_ + 1}: leanvm {rows['leanvm'][-1]}\n       qemu {rows['qemu'][-1]}",
                  flush=True)
        faulthandler.cancel_dump_traceback_later()
    summary = {}
    for vmm, runs in rows.items():
        done = [r for r in runs if r["reached"] and r["drop_s"] is not None]
        summary[vmm] = {
            "rss_before_mib": spread([r["rss_before"] / MB for r in done]) if done else None,
            "rss_after_mib": spread([r["rss_after"] / MB for r in done]) if done else None,
            "freed_mib": spread([(r["rss_before"] - r["rss_after"]) / MB for r in done])
            if done else None,
            "drop_s": spread([r["drop_s"] for r in done]) if done else None,
            "runs_done": len(done)}
    leanvm_runs = [r for r in rows["leanvm"] if r["reached"]]
    summary["leanvm"]["unplug_us_per_block"] = spread(
        [r["unplug_us_per_block"] for r in leanvm_runs]) if leanvm_runs else None
    summary["leanvm"]["region_after_mib"] = spread(
        [r["region_after"] / MB for r in leanvm_runs]) if leanvm_runs else None
    print(f"\n1 GiB plugged and filled, resized to {SMALL >> 20} MiB; {args.runs} interleaved "
          "runs, median (range):")
    for vmm, figures in summary.items():
        def show(key: str, unit: str) -> str:
            s = figures.get(key)
            return (f"{s['median']:.1f} {unit} ({s['min']:.1f}-{s['max']:.1f})" if s else "-")
        print(f"  {vmm:7} RSS {show('rss_before_mib', 'MiB')} -> {show('rss_after_mib', 'MiB')}"
              f", freed {show('freed_mib', 'MiB')}, drop {show('drop_s', 's')} after the "
              "request" + (f"; VMM {show('unplug_us_per_block', 'us')} per unplugged block, "
                           f"region holds {show('region_after_mib', 'MiB')} after"
                           if vmm == "leanvm" else ""))
    a, b = summary["leanvm"]["drop_s"], summary["qemu"]["drop_s"]
    if a and b:
        print(f"  leanvm / QEMU, request to RSS drop: {a['median'] / b['median']:.2f}x")
    save_and_hand_back("virtio_mem", {"runs": args.runs, "cmdline": CMDLINE, "summary": summary,
                                      "vmm_unplug_us_per_block": vmm, "raw": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
