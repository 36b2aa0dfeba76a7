"""Linux user space on leanvm: init to the ACPI power-off, Debian's kernel and initrd to
systemd-udevd, an interactive shell on the serial console, with the paravirtual clock.

These need a KVM that runs guest user space. This project's own host does not (its KVM
emulates guest kernel code and drops guest SYSCALLs: docs/facts.md#this-hosts-kvm), so here
they are skipped with that reason, and `make test` runs them again on a real KVM: in an L1
Linux under QEMU TCG with SVM (`make test-nested`, scripts/nested-kvm, docs/nested.md).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

pytestmark = [pytest.mark.slow, pytest.mark.userspace,
              pytest.mark.usefixtures("user_space")]  # conftest: skips where it cannot run
KVM_CLOCK = "clocksource: Switched to clocksource kvm-clock"
BUSYBOX_MARKER = "leanvm-init: user space is up"


def test_minimal_kernel_runs_init_to_the_acpi_power_off_on_kvm_clock(
        minimal_kernel: Path, busybox_initrd: Path) -> None:
    with Machine(kernel=minimal_kernel, initrd=busybox_initrd, memory="256M",
                 cmdline="console=ttyS0 rodata=off") as vm:
        result = vm.run(timeout=600)
        console = vm.console.decode(errors="replace")
    assert result.reason is StopReason.POWEROFF and result.exit_code == 0, (
        result.detail, console[-2000:])
    assert BUSYBOX_MARKER in console
    assert KVM_CLOCK in console, "Linux did not take kvm-clock: " + console[-3000:]
    assert "Marking TSC unstable" not in console
    print(f"\nminimal kernel to power-off: {result.to_stop_ms / 1e3:.1f} s, "
          f"{result.exits} exits {result.exit_kinds}")


def test_debian_kernel_and_initrd_reach_udev_with_kvm_clock_and_no_keylock() -> None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    initrds = sorted(glob.glob("/boot/initrd.img-*-cloud-amd64"))
    if not kernels or not initrds:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    with Machine(kernel=kernels[-1], initrd=initrds[-1], memory="1G",
                 cmdline="console=ttyS0 earlyprintk=serial panic=1") as vm:
        result = vm.run(timeout=900, until="udevd")
        console = vm.console.decode(errors="replace")
    assert result.reason is StopReason.CONSOLE_MATCH, (result.detail, console[-3000:])
    assert KVM_CLOCK in console, console[-3000:]
    assert "Unable to calibrate against PIT" not in console
    assert "Keylock active" not in console
    print(f"\nDebian kernel to udevd: {result.to_stop_ms / 1e3:.1f} s, {result.exits} exits "
          f"{result.exit_kinds}; most: {result.busiest}")


def test_an_interactive_shell_on_the_serial_console(minimal_kernel: Path,
                                                     busybox_initrd: Path) -> None:
    with Machine(kernel=minimal_kernel, initrd=busybox_initrd, memory="256M",
                 cmdline="console=ttyS0 rodata=off rdinit=/bin/sh") as vm:
        vm.start(timeout=600)
        # the prompt, after which busybox asks the terminal where its cursor is (ESC [6n)
        vm.wait_for_console(re.compile(rb"[#$] (\x1b\[6n)?$"), timeout=540)
        vm.send_input(b"echo leanvm-$((6 * 7))\n")
        vm.wait_for_console("leanvm-42", timeout=60)
        vm.send_input(b"poweroff -f\n")
        result = vm.wait(60)
    assert result.reason is StopReason.POWEROFF, result.detail
