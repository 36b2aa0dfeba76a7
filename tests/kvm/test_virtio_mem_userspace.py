"""virtio-mem with guest user space (the nested tier: a real KVM, docs/nested.md): a busybox
shell on the serial console sees plugged memory come and go (/proc/meminfo, the memory
blocks in /sys/devices/system/memory), fills it, and after a resize the host gets the
guest's pages back (the region's resident memory falls to what stays plugged).

Two kernels: leanvm's minimal kernel (virtio_mmio and virtio_mem built in) and Debian's
stock cloud kernel, whose virtio, virtio_ring, virtio_mmio and virtio_mem are modules. Its
own initrd holds virtio_mmio but not virtio_mem, so the test boots it with leanvm's busybox
initramfs plus those four modules from /lib/modules, loaded with insmod; udev is not needed
for that. Debian's kernel does not online hotplugged memory by itself
(CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE is off): memhp_default_state=online_movable on its
command line does, in the movable zone, from which unplugging always succeeds. The minimal
kernel onlines it into the normal zone by itself, and must: it has no shmem, so its tmpfs is
ramfs, whose pages may not come from the movable zone (the fill would find no memory and
the kernel would panic "System is deadlocked on memory").
"""

from __future__ import annotations

import glob
import re
import time
from pathlib import Path

import pytest

from leanvm.errors import LeanvmError
from leanvm.machine.machine import Machine

pytestmark = [pytest.mark.slow, pytest.mark.userspace,
              pytest.mark.usefixtures("user_space")]  # conftest: skips where it cannot run
MB = 1 << 20
PROMPT = re.compile(rb"[#$] (\x1b\[6n)?$")
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_mem")  # in dependency order


class Shell:
    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.count = 0

    def run(self, command: str, timeout: float = 180) -> str:
        """Run ``command`` and return its output (between two markers)."""
        self.count += 1
        tag = f"leanvm-done-{self.count}"
        start = len(self.vm.console)
        self.vm.send_input(f"{command}; echo {tag}-$((1 + 1))\n".encode())
        try:
            self.vm.wait_for_console(f"{tag}-2", timeout=timeout)
        except LeanvmError as exc:
            pytest.fail(f"{command!r} did not finish: {exc}\n"
                        f"{self.vm.console[-3000:].decode(errors='replace')}")
        text = self.vm.console[start:].decode(errors="replace")
        body = text.split("\n", 1)[1] if "\n" in text else ""
        return body.split(f"{tag}-2")[0]


def wait_plugged(vm: Machine, size: int, timeout: float = 300) -> None:
    start = time.monotonic()
    while vm.virtio_mem[0].plugged_size != size:
        assert time.monotonic() - start < timeout, (
            f"plugged {vm.virtio_mem[0].plugged_size >> 20}M, not {size >> 20}M:\n"
            + vm.console[-3000:].decode(errors="replace"))
        time.sleep(0.2)


def mem_total_mb(shell: Shell) -> int:
    match = re.search(r"MemTotal:\s+(\d+) kB", shell.run("cat /proc/meminfo"))
    assert match
    return int(match.group(1)) // 1024


def online_blocks(shell: Shell) -> int:
    out = shell.run("cat /sys/devices/system/memory/memory*/state | grep -c '^online'")
    return int(out.split()[-1])


def exercise(vm: Machine, setup: str) -> dict:
    """Boot to the shell, plug 256M, fill it from user space, resize to 64M, then to 192M.
    (Not to 0: in the normal zone, where the minimal kernel onlines, an unmovable kernel
    allocation can pin a subblock, and Linux then keeps it plugged; it reaches 64M by
    unplugging others.)"""
    handle = vm.virtio_mem[0]
    vm.start(timeout=1500)
    try:  # about 10-25 s in L1; a boot that stalls fails here with what it printed
        vm.wait_for_console(PROMPT, timeout=240)
    except LeanvmError as exc:
        pytest.fail(f"no shell prompt: {exc}\n{vm.console[-3000:].decode(errors='replace')}")
    shell = Shell(vm)
    shell.run("mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; "
              + setup)
    wait_plugged(vm, 256 * MB)
    total_plugged, blocks_plugged = mem_total_mb(shell), online_blocks(shell)
    # fill more than boot RAM can hold, so the plugged memory is used, then free it
    fill = shell.run("mkdir -p /mnt; mount -t tmpfs -o size=95% tmpfs /mnt; dd if=/dev/zero "
                     "of=/mnt/fill bs=1M count=300 2>&1 | tail -1; grep -E "
                     "'MemFree|Shmem:' /proc/meminfo")
    filled = handle.resident()
    shell.run("rm /mnt/fill")
    handle.resize("64M")
    requested = time.monotonic()
    wait_plugged(vm, 64 * MB)
    while handle.resident() > 64 * MB and time.monotonic() - requested < 60:
        time.sleep(0.01)
    dropped_after = time.monotonic() - requested
    emptied = handle.resident()
    held = held_blocks(handle)
    total_unplugged, blocks_unplugged = mem_total_mb(shell), online_blocks(shell)
    handle.resize("192M")
    wait_plugged(vm, 192 * MB)
    total_again = mem_total_mb(shell)
    stats = vm.virtio.stats()[0]
    vm.send_input(b"poweroff -f\n")
    vm.wait(120)
    return {"total_plugged": total_plugged, "blocks_plugged": blocks_plugged,
            "filled": filled, "emptied": emptied, "dropped_after": dropped_after,
            "total_unplugged": total_unplugged, "blocks_unplugged": blocks_unplugged,
            "total_again": total_again, "stats": stats, "fill": fill, "held": held,
            "console": vm.console[-3000:].decode(errors="replace")}


def held_blocks(handle) -> list[tuple[int, bool, int]]:
    """(block, plugged, resident bytes) of every block the host backs any of."""
    from leanvm.memory.residency import measure

    base, block = handle.region.mapping.address, handle.block_size
    rows = measure([(str(i), base + i * block, block) for i in range(len(handle.state()))])
    state = handle.state()
    return [(i, bool(state[i]), row.resident) for i, row in enumerate(rows) if row.resident]


def check(seen: dict, what: str) -> None:
    assert seen["filled"] > 32 * MB, (f"{what}: the guest's fill did not reach the plugged "
                                      f"memory: {seen['fill']!r}")
    assert seen["emptied"] <= 64 * MB, (f"{what}: {seen['emptied']} bytes still held after "
                                        f"unplug, in blocks {seen['held']}:\n{seen['console']}")
    assert seen["stats"]["resident_unplugged"] == 0
    assert seen["total_plugged"] - seen["total_unplugged"] >= 190  # MiB the guest lost
    assert seen["blocks_plugged"] >= 4  # 256M of boot RAM and 256M plugged: 128M blocks
    assert seen["total_again"] - seen["total_unplugged"] >= 120
    assert not seen["stats"].get("errors"), seen["stats"]
    print(f"\n{what}: MemTotal {seen['total_plugged']} -> {seen['total_unplugged']} -> "
          f"{seen['total_again']} MiB; host held {seen['filled'] >> 20} MiB of the region "
          f"after the fill, {seen['emptied'] >> 20} MiB {seen['dropped_after']:.2f} s after "
          f"the resize to 64M ({seen['blocks_plugged']} -> {seen['blocks_unplugged']} memory "
          "blocks online); unplug "
          f"{seen['stats']['unplug_ns_per_block'] / 1000:.1f} us per block")


def test_minimal_kernel_shell_sees_memory_come_and_go(minimal_kernel: Path,
                                                      busybox_initrd: Path) -> None:
    with Machine(kernel=minimal_kernel, initrd=busybox_initrd, memory="256M,maxmem=1280M",
                 cmdline="console=ttyS0 rodata=off rdinit=/bin/sh",
                 virtio_mem=("size=512M,requested=256M",)) as vm:
        seen = exercise(vm, "true")
    check(seen, "minimal kernel")


def test_debian_kernel_loads_the_modules_and_plugs(tmp_path: Path) -> None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    version = Path(kernels[-1]).name.removeprefix("vmlinuz-")
    found = {m: next(iter(glob.glob(f"/lib/modules/{version}/kernel/drivers/virtio/{m}.ko*")),
                     None) for m in MODULES}
    if not all(found.values()) or any(str(p).endswith((".xz", ".zst")) for p in found.values()):
        pytest.skip(f"uncompressed virtio modules of {version} are not in /lib/modules")
    from leanvm.loader.initramfs import busybox_image

    image = busybox_image()
    image.directory("/modules")
    for name, path in found.items():
        image.add_host(str(path), f"/modules/{name}.ko")
    initrd = tmp_path / "debian-virtio-mem.cpio"
    image.write(initrd)
    with Machine(kernel=kernels[-1], initrd=initrd, memory="256M,maxmem=1280M",
                 cmdline="console=ttyS0 rdinit=/bin/sh memhp_default_state=online_movable",
                 virtio_mem=("size=512M,requested=256M",)) as vm:
        loads = "; ".join(f"insmod /modules/{m}.ko" for m in MODULES)
        seen = exercise(vm, loads)
        console = vm.console.decode(errors="replace")
    assert "virtio_mem virtio0: start address: 0x100000000" in console
    check(seen, "Debian " + version)
