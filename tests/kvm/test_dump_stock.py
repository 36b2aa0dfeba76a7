"""Dumps of Debian's stock cloud kernel, read by crash and drgn with Debian's own debug
vmlinux (linux-image-VERSION-dbg).

The kernel boots to a shell only on a real KVM, so the dumps are made in the nested tier
(docs/nested.md): a busybox shell with a `sleep` running, qemu_fw_cfg loaded so that the
kernel publishes VMCOREINFO (KASLR offsets; Debian's kernel randomises its placement),
then an ELF and a kdump file of the running guest, written to $NESTED_OUT. The readers run
on this host afterwards (`make test` runs this file again with LEANVM_STOCK_DUMPS set):
crash under TCG in L1 would take far too long with a 590 MB vmlinux.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine

from test_dump_linux import crash, drgn_tasks, need, shell_dumps

ROOT = Path(__file__).resolve().parents[2]


def stock_kernel() -> tuple[str, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    version = Path(kernels[-1]).name.removeprefix("vmlinuz-")
    return kernels[-1], version


@pytest.mark.slow
@pytest.mark.userspace
def test_the_stock_kernel_running_a_shell_is_dumped_live(tmp_path: Path,
                                                         user_space: None) -> None:
    kernel, version = stock_kernel()
    module = Path(f"/lib/modules/{version}/kernel/drivers/firmware/qemu_fw_cfg.ko")
    if not module.exists():
        pytest.skip(f"{module} (uncompressed) is not there")
    from leanvm.loader.initramfs import busybox_image

    image = busybox_image()
    image.add_host(str(module), "/qemu_fw_cfg.ko")
    initrd = tmp_path / "stock-shell.cpio"
    image.write(initrd)
    out = Path(os.environ.get("NESTED_OUT", ROOT / "build" / "nested-out")) / "stock-dumps"
    out.mkdir(parents=True, exist_ok=True)
    with Machine(kernel=kernel, initrd=initrd, memory="512M",
                 cmdline="console=ttyS0 rdinit=/bin/sh") as vm:
        elf, kdump = shell_dumps(vm, out, "insmod /qemu_fw_cfg.ko; ", boot=900, prompt=600,
                                 step=120)
    assert elf.vmcoreinfo and kdump.vmcoreinfo, "the kernel did not publish VMCOREINFO"
    (out / "about.json").write_text(json.dumps({"release": version, "methods": [
        elf.method, kdump.method], "pause_ms": [elf.pause_ms, kdump.pause_ms]}))


def debug_vmlinux(release: str) -> Path:
    done = subprocess.run([str(ROOT / "scripts" / "debug-vmlinux"), release],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"scripts/debug-vmlinux {release}: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def test_crash_and_drgn_read_the_stock_kernel_dumps() -> None:
    where = os.environ.get("LEANVM_STOCK_DUMPS")
    if not where:
        pytest.skip("reads the dumps the nested tier makes: make test runs it after that tier "
                    "with LEANVM_STOCK_DUMPS=build/nested-out/stock-dumps")
    need("crash")
    dumps = Path(where)
    about = json.loads((dumps / "about.json").read_text())
    release = about["release"]
    vmlinux = debug_vmlinux(release)
    for name in ("vmcore.elf", "vmcore.kdump"):
        text = crash(vmlinux, dumps / name)
        assert re.search(rf"RELEASE: {re.escape(release)}\b", text), text
        assert "Run /bin/sh as init process" in text  # log: the kernel's own messages
        # ps: crash 8.0.2 finds little more than the task on the CPU in this kernel
        # (6.1.192), in QEMU 7.2's dumps of it as in ours (docs/dump.md); drgn walks the
        # task list, and holds crash's active task
        active = re.search(r"^>\s+(\d+)\s+-?\d+\s+0\s+[0-9a-f]+\s+[A-Z]+\s.*\s(\S+)$", text, re.M)
        assert active, f"crash's ps shows no active task:\n{text[-4000:]}"
        tasks = drgn_tasks(vmlinux, dumps / name)
        assert "1 sh" in tasks and re.search(r"^\d+ sleep$", tasks, re.M), tasks
        pid, comm = active.group(1), active.group(2).strip("[]")
        assert pid == "0" or f"{pid} {comm}" in tasks.splitlines(), (active.group(0), tasks)
    print(f"read with {vmlinux}: {about}", file=sys.stderr)
