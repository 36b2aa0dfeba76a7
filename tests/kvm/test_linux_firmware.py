"""Real firmware loads a Linux-format kernel from fw_cfg and enters it.

SeaBIOS (Debian's seabios) runs QEMU's linuxboot_dma option ROM, which leanvm serves as
"genroms/linuxboot_dma.bin"; qboot (qemu-system-data) reads the same fw_cfg items itself.
Kernels: the test kernel from tests/guests/linux, which prints what it was handed, and
Debian's stock kernel, stopped once its setup code has printed its early console line (the
rest of that boot takes minutes on a host that emulates guest kernel code).
"""

from __future__ import annotations

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leanvm.machine.flash import FlashSpec
from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

SEABIOS = Path("/usr/share/seabios/bios.bin")
QBOOT = Path("/usr/share/qemu/qboot.rom")
LINUXBOOT = Path("/usr/share/qemu/linuxboot_dma.bin")
FIRMWARE = {"seabios": SEABIOS, "qboot": QBOOT}
CMDLINE = "console=ttyS0 leanvm.test=firmware path=/a/b quoted=\"x y\""


def need(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} is missing (make test installs seabios and qemu-system-data)")


def stock_kernel() -> Path:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    return Path(found[-1])


def fnv1a(data: bytes) -> int:
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def check_report(console: str, cmdline: str, initrd: bytes, initrd_addr: int) -> None:
    assert "leanvm-test-kernel: setup" in console
    assert "leanvm-test-kernel: entry 32-bit boot_params=0x0000000000010000" in console
    assert "loader: 0x00000000000000b0" in console  # type_of_loader, as QEMU's loader sets it
    assert f"cmdline: {cmdline}\r\n" in console
    assert (f"initrd: {len(initrd)} bytes at {initrd_addr:#018x} fnv1a {fnv1a(initrd):#018x}"
            in console)
    assert "initrd text: " + initrd.split(b"\n")[0].decode() in console
    assert "leanvm-test-kernel: done" in console


@pytest.mark.slow
@pytest.mark.parametrize("firmware", ["seabios", "qboot"])
def test_firmware_boots_the_test_kernel(firmware: str, test_kernel: Path, tmp_path: Path) -> None:
    need(FIRMWARE[firmware], LINUXBOOT)
    initrd = tmp_path / "initrd.img"
    payload = b"leanvm initrd for " + firmware.encode() + b"\n" + bytes(range(256)) * 40
    initrd.write_bytes(payload)
    with Machine(memory="64M", bios=FIRMWARE[firmware], kernel=test_kernel, initrd=initrd,
                 cmdline=CMDLINE, trace=True) as vm:
        result = vm.run(timeout=120)
        events = vm.trace_events
    console = vm.console.decode(errors="replace")
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, (result.detail, console)
    # The initrd ends at the top of RAM, page aligned, below what firmware keeps for itself.
    match = re.search(r"initrd: \d+ bytes at (0x[0-9a-f]+)", console)
    assert match, console
    initrd_addr = int(match.group(1), 16)
    assert initrd_addr % 4096 == 0 and initrd_addr + len(payload) <= 64 << 20
    check_report(console, vm.kernel_cmdline, payload, initrd_addr)
    assert vm.kernel_cmdline.startswith(CMDLINE)  # plus what the CPU profile may add
    entry = result.kernel_entry
    assert entry is not None and entry.address == 0x10200 and (entry.cs, entry.rip) == (0x1020, 0)
    assert result.first_entry_ns < entry.time_ns < result.stopped_ns
    # the boot timeline has the firmware's phases, the copies and the entry, in boot order
    phases = [e.name for e in events if e.cat in ("firmware", "fw_cfg", "vmm", "guest")]
    wanted = ["first vCPU entry", "copy setup", "copy kernel", "copy cmdline", "copy initrd",
              "kernel entry", "first serial byte", "stop"]
    if firmware == "seabios":
        wanted = ["first vCPU entry", "BIOS post", "BIOS option ROM scan", "copy option ROM",
                  "option ROM init", "BIOS int 19", "BIOS boot OS", "copy setup", "copy initrd",
                  "copy kernel", "copy cmdline", "kernel entry", "first serial byte", "stop"]
    assert [p for p in phases if p in wanted] == wanted, phases
    copy = next(e for e in events if e.name == "copy initrd")
    assert copy.dur > 0 and copy.args == {"bytes": len(payload), "dma": True}


@pytest.mark.slow
def test_qboot_from_a_pflash_drive(test_kernel: Path) -> None:
    need(QBOOT)
    with Machine(memory="32M", flash=(FlashSpec("code", QBOOT, "readonly"),),
                 kernel=test_kernel, cmdline="from pflash") as vm:
        result = vm.run(timeout=60)
    console = vm.console.decode(errors="replace")
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, (result.detail, console)
    assert f"cmdline: {vm.kernel_cmdline}\r\n" in console
    assert "initrd: 0 bytes at 0x0000000000000000" in console


@pytest.mark.slow
@pytest.mark.parametrize("firmware", ["seabios", "qboot"])
def test_stock_debian_kernel_reaches_its_setup_code(firmware: str) -> None:
    need(FIRMWARE[firmware], LINUXBOOT)
    kernel = stock_kernel()
    with Machine(memory="256M", bios=FIRMWARE[firmware], kernel=kernel,
                 cmdline="console=ttyS0 earlyprintk=serial debug") as vm:
        # qboot's int 0x10 also prints to the serial port, so its setup output comes doubled
        wanted = "early console in setup code"
        if firmware == "qboot":
            wanted = "".join(c * 2 for c in wanted)
        result = vm.run(timeout=120, until=wanted)
    assert result.reason is StopReason.CONSOLE_MATCH, (result.detail, vm.console[-500:])
    assert result.kernel_entry is not None and result.kernel_entry.address == 0x10200


def test_cli_boots_the_test_kernel_and_reports_the_entry(test_kernel: Path) -> None:
    need(QBOOT)
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--bios", str(QBOOT),
                           "-kernel", str(test_kernel), "-append", "via the cli",
                           "--until", "leanvm-test-kernel: done", "--timeout", "60"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cmdline: via the cli" in done.stdout
    assert "console-match" in done.stderr
    assert re.search(r"kernel entry +\d+\.\d ms after process start, at 0x10200 \(1020:0000\)",
                     done.stderr), done.stderr


def test_kernel_errors_are_one_line(test_kernel: Path, tmp_path: Path) -> None:
    need(QBOOT)
    bad = tmp_path / "not-a-kernel"
    bad.write_bytes(bytes(4096))
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    cases = [
        (["-kernel", str(tmp_path / "missing")], "missing: no such kernel file"),
        (["-kernel", str(bad)], "not-a-kernel: not a Linux bzImage (no 'HdrS'"),
        (["-kernel", str(test_kernel), "-initrd", str(big), "-m", "32M"],
         "big.img: initrd of 41943040 bytes does not fit in RAM"),
        (["-kernel", str(test_kernel), "-append", "x" * 3000], "kernel command line is 3"),
    ]
    for extra, message in cases:
        done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--bios", str(QBOOT),
                               *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (extra, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    old = tmp_path / "old-kernel"
    data = bytearray(test_kernel.read_bytes())
    data[0x236] = 0  # no XLF_KERNEL_64: firmware can boot it, the 64-bit entry cannot
    old.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "-kernel", str(old),
                           "--kernel-boot", "bzimage"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "old-kernel: no 64-bit entry point" in done.stderr and \
        done.stderr.count("\n") == 1, done.stderr
