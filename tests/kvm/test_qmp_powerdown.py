"""QMP's system_powerdown reaches a Linux guest: the minimal kernel's ACPI button driver
turns leanvm's fixed power button (PWRBTN_STS, SCI) into KEY_POWER on /dev/input/event0,
the guest's init waits for it and powers off, and a qemu.qmp client sees POWERDOWN, then
SHUTDOWN with reason guest-shutdown.

Needs guest user space: skipped here with the reason, run on the nested real KVM by
`make test` (docs/nested.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from leanvm.loader.initramfs import BUSYBOX, busybox_image
from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

pytestmark = [pytest.mark.slow, pytest.mark.userspace,
              pytest.mark.usefixtures("user_space")]  # conftest: skips where it cannot run
qmp_legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is installed by make test")

READY = "leanvm-test: waiting for the power button"
PRESSED = "leanvm-test: power button pressed"
INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
cat /sys/class/input/input0/name
echo "{READY}"
dd if=/dev/input/event0 bs=24 count=1 of=/dev/null 2>/dev/null
echo "{PRESSED}"
poweroff -f
""".encode()


def test_system_powerdown_powers_a_linux_guest_off(minimal_kernel: Path, tmp_path: Path) -> None:
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (make test installs it)")
    initrd = tmp_path / "button.cpio"
    busybox_image(init=INIT).write(initrd)
    sock = tmp_path / "vm.sock"
    with Machine(kernel=minimal_kernel, initrd=initrd, memory="256M", qmp=str(sock),
                 cmdline="console=ttyS0 rodata=off") as vm:
        vm.start(timeout=600)
        vm.wait_for_console(READY, timeout=600)
        assert "Power Button" in vm.console.decode(errors="replace")
        q = qmp_legacy.QEMUMonitorProtocol(str(sock))
        q.connect()
        try:
            assert q.cmd("system_powerdown") == {}
            seen: list[dict] = []
            deadline = time.monotonic() + 120
            while not any(e["event"] == "SHUTDOWN" for e in seen):
                assert time.monotonic() < deadline, (seen, vm.console[-2000:])
                try:
                    seen += q.get_events(wait=1.0)
                except Exception:  # noqa: BLE001 - a timeout of one wait, or the end
                    if not vm._thread or not vm._thread.is_alive():  # type: ignore[union-attr]
                        break
        finally:
            q.close()
        result = vm.wait(60)
        console = vm.console.decode(errors="replace")
    assert PRESSED in console, console[-2000:]
    assert result.reason is StopReason.POWEROFF, (result.detail, console[-2000:])
    names = [e["event"] for e in seen]
    assert names[:1] == ["POWERDOWN"] and "SHUTDOWN" in names, names
    shutdown = next(e for e in seen if e["event"] == "SHUTDOWN")
    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}


def test_a_kernel_panic_sends_guest_panicked_then_shutdown(minimal_kernel: Path) -> None:
    """No initramfs and no root device: Linux panics ("VFS: Unable to mount root fs"). It
    needs no user space, but runs in the nested tier, where it takes seconds (here 40 s)."""
    seen: list[str] = []
    with Machine(kernel=minimal_kernel, memory="128M",
                 cmdline="console=ttyS0 rodata=off root=/dev/nonexistent") as vm:
        vm.events.listen(lambda event: seen.append(f"{event.name} {event.data}"))
        result = vm.run(timeout=600)
        assert vm.status == "guest-panicked"
    assert result.reason is StopReason.GUEST_PANIC, result.detail
    assert seen == ["GUEST_PANICKED {'action': 'poweroff'}",
                    "SHUTDOWN {'guest': True, 'reason': 'guest-panic'}"]
