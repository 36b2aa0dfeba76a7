"""Direct Linux boot: leanvm loads a bzImage itself and enters its 64-bit entry point with
boot_params, command line, initrd and e820 map in place (no firmware)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason


def test_test_kernel_gets_boot_params_cmdline_and_initrd(test_kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    payload = b"direct initrd\n" + bytes(range(256)) * 16
    initrd.write_bytes(payload)
    with Machine(memory="64M", kernel=test_kernel, initrd=initrd, cmdline="root=none x=1",
                 trace=True, kernel_boot="bzimage") as vm:
        loaded = vm.direct_kernel
        assert loaded is not None and loaded.entry == 0x100200
        zero_page = vm.memory.read(0x7000, 4096)
        cmdline = vm.kernel_cmdline
        assert cmdline.startswith("root=none x=1")  # plus what the CPU profile may add
        result = vm.run(timeout=60)
        events = [e.name for e in vm.trace_events]
    console = vm.console.decode(errors="replace")
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, (result.detail, console)
    assert "leanvm-test-kernel: entry 64-bit boot_params=0x0000000000007000" in console
    assert "loader: 0x00000000000000ff" in console and f"cmdline: {cmdline}\r\n" in console
    assert f"initrd: {len(payload)} bytes at {loaded.initrd_address:#018x}" in console
    assert "initrd text: direct initrd" in console
    assert loaded.initrd_address % 4096 == 0 and loaded.initrd_address + len(payload) <= 64 << 20
    # the zero page: header copied, e820 with the legacy hole left out
    assert zero_page[0x202:0x206] == b"HdrS" and zero_page[0x210] == 0xFF
    count = zero_page[0x1E8]
    e820 = [struct.unpack_from("<QQI", zero_page, 0x2D0 + 20 * i) for i in range(count)]
    assert e820[0] == (0, 0x9FC00, 1) and e820[1] == (0x100000, (64 << 20) - 0x100000, 1)
    assert (0xFEFFC000, 0x4000, 2) in e820
    assert events.index("load kernel") < events.index("first vCPU entry")


def test_wait_for_console_from_python(test_kernel: Path, guest) -> None:
    import re

    import pytest

    import leanvm
    from leanvm.errors import GuestError, LeanvmError

    with leanvm.Machine(kernel=test_kernel, cmdline="hello there", memory="64M") as vm:
        match = vm.wait_for_console(re.compile(rb"cmdline: (\w+) (\w+)"), timeout=60)
        assert match.groups() == (b"hello", b"there")
        assert vm.wait(60).status == 0
    with leanvm.Machine(kernel=test_kernel, memory="64M") as vm:
        with pytest.raises(GuestError, match="guest-exit.*before its console showed b'never'"):
            vm.wait_for_console("never", timeout=60)
    with leanvm.Machine(guest=guest("spin"), memory="16M") as vm:  # never prints, never stops
        with pytest.raises(LeanvmError, match="did not show b'x' within 0.3 s"):
            vm.wait_for_console("x", timeout=0.3)
        assert vm.state.value == "running"
    assert vm.result is not None and vm.result.reason is StopReason.INTERRUPTED  # the with-block stopped it


def test_pvh_boot_of_the_decompressed_payload(test_kernel: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"pvh initrd\n" * 50)
    for round_ in ("fresh", "cached"):
        with Machine(memory="64M", kernel=test_kernel, initrd=initrd, cmdline="via pvh") as vm:
            loaded = vm.direct_kernel
            result = vm.run(timeout=60)
        console = vm.console.decode(errors="replace")
        assert result.status == 0, (result.detail, console)
        assert "leanvm-test-kernel: entry pvh start_info=0x0000000000006000" in console
        assert "magic: 0x00000000336ec578" in console
        assert f"cmdline: {vm.kernel_cmdline}\r\n" in console
        assert "memmap entries: 3" in console
        assert f"initrd: 550 bytes at {loaded.initrd_address:#018x}" in console
        assert ("(cached)" in vm.kernel_boot_note) == (round_ == "cached"), vm.kernel_boot_note
    assert len(list((tmp_path / "cache" / "kernels").iterdir())) == 1


def test_elf_vmlinux_boots_through_pvh(test_kernel: Path) -> None:
    with Machine(memory="64M", kernel=test_kernel.with_name("vmlinux"), cmdline="elf") as vm:
        result = vm.run(timeout=60)
    assert result.status == 0
    assert f"cmdline: {vm.kernel_cmdline}\r\n" in vm.console.decode(errors="replace")


@pytest.mark.slow
def test_stock_kernel_prints_its_banner_after_host_decompression(tmp_path: Path, monkeypatch) -> None:
    import glob

    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    with Machine(memory="512M", kernel=found[-1], cmdline="console=ttyS0 earlyprintk=serial") as vm:
        assert vm.kernel_boot_note.startswith("pvh, decompressed on the host")
        result = vm.run(timeout=300, until="Linux version")
    assert result.reason is StopReason.CONSOLE_MATCH, (result.detail, vm.console[-300:])


def test_two_vms_share_the_initrds_page_cache_frames(test_kernel: Path, tmp_path: Path) -> None:
    """Both VMs read the initrd (the test kernel hashes its first 64 KiB) straight from the
    host page cache: the same host pages, none private to either VM."""
    from leanvm.memory.residency import measure
    from tests.unit.test_zero_copy import page_frames

    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(range(256)) * 4096 * 2)  # 2 MiB
    frames, reports = [], []
    machines = [Machine(memory="64M", kernel=test_kernel, initrd=initrd, cmdline="zc")
                for _ in range(2)]
    try:
        for vm in machines:
            vm.build()
            loaded = vm.direct_kernel
            assert loaded is not None and loaded.initrd_mapped
            assert "initrd 2.0 MiB mapped copy-on-write" in vm.kernel_boot_note
            result = vm.run(timeout=60)
            assert result.status == 0, result.detail
            reports.append(vm.console.decode(errors="replace"))
            host = vm.memory.find(loaded.initrd_address).mapping.address + loaded.initrd_address
            [cost] = measure([("initrd", host, 2 << 20)])
            assert cost.resident >= 64 << 10 and cost.private == 0, cost
            frames.append(page_frames(host, 16))
    finally:
        for vm in machines:
            vm.close()
    assert reports[0] == reports[1] and "initrd: 2097152 bytes" in reports[0]
    if any(frames[0]):  # page frame numbers are visible to root only
        assert frames[0] == frames[1]


@pytest.mark.parametrize("mode", ["pvh", "bzimage"])
def test_kernel_pages_are_mapped_where_aligned_and_copied_where_not(test_kernel: Path,
                                                                    mode: str) -> None:
    """PVH: the decompressed ELF's whole pages come from the host page cache (resident but
    not private once read); bzImage: the test kernel's protected-mode code starts 2 KiB into
    the file, off a page boundary, so it is copied (private to the VM), as documented."""
    from leanvm.memory.residency import measure

    with Machine(memory="64M", kernel=test_kernel, kernel_boot=mode) as vm:
        loaded = vm.direct_kernel
        assert loaded is not None
        region = vm.memory.find(0x100000)
        host = region.mapping.address + 0x100000 - region.base
        first_page = vm.memory.read(0x100000, 4096)  # fault it in as the guest's load would
        [cost] = measure([("kernel", host, 4096)])
        if mode == "pvh":
            assert loaded.kernel_mapped >= 4096 and "4 KiB mapped" in vm.kernel_boot_note
            assert (cost.resident, cost.private) == (4096, 0), cost  # page cache, shared
        else:
            assert loaded.kernel_mapped == 0 and loaded.kernel_copied > 50 << 10
            assert "kernel 50 KiB copied" in vm.kernel_boot_note
            assert (cost.resident, cost.private) == (4096, 4096), cost  # the VM's own copy
        assert first_page != bytes(4096)


def test_no_zero_copy_copies(test_kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"copied\n" * 1000)
    with Machine(memory="64M", kernel=test_kernel, initrd=initrd, zero_copy=False) as vm:
        assert vm.direct_kernel is not None and not vm.direct_kernel.initrd_mapped
        assert "copied" in vm.kernel_boot_note and "mapped" not in vm.kernel_boot_note
        assert vm.run(timeout=60).status == 0


@pytest.mark.parametrize("mode", ["pvh", "bzimage"])
def test_a_kernel_panic_stops_the_vm_with_its_reason(test_kernel: Path, mode: str) -> None:
    with Machine(memory="64M", kernel=test_kernel, cmdline="panic=5 leanvm.panic", kernel_boot=mode) as vm:
        result = vm.run(timeout=30)
    assert result.reason is StopReason.GUEST_PANIC, (result.detail, vm.console[-200:])
    assert result.detail == ("the guest kernel panicked: Kernel panic - not syncing: leanvm "
                             "test kernel asked to panic")
    assert result.exit_code == 3


def test_emulated_profile_adds_linux_switches_for_what_the_host_shows(test_kernel: Path) -> None:
    with Machine(memory="64M", kernel=test_kernel, cmdline="x=1") as vm:
        finding = vm.host_finding
        if vm.cpu_profile != "emulated":
            assert vm.kernel_cmdline == "x=1" and vm.cmdline_added == ()
            pytest.skip("this host runs kernel code natively: the host profile adds nothing")
        assert vm.kernel_cmdline.startswith("x=1 cryptomgr.notests")
        assert vm.cmdline_added[0] == "cryptomgr.notests"
        if "xsave" in finding.unhidden:
            assert "noxsave" in vm.cmdline_added
    # what the user says wins; the host profile adds nothing
    with Machine(memory="64M", kernel=test_kernel, cmdline="clearcpuid=smap noxsave") as vm:
        assert all(not p.startswith(("clearcpuid", "noxsave")) for p in vm.cmdline_added)
    with Machine(memory="64M", kernel=test_kernel, cmdline="x=1", cpu_profile="host") as vm:
        assert vm.kernel_cmdline == "x=1" and vm.cmdline_added == ()


def test_compressed_initramfs_is_unpacked_on_the_host(test_kernel: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    import gzip

    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    archive = cpio_with_init(tmp_path)
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(archive, mtime=0))
    with Machine(memory="64M", kernel=test_kernel, initrd=initrd) as vm:
        assert vm.direct_kernel.initrd_size == len(archive) and vm.direct_kernel.initrd_mapped
        assert "decompressed on the host (gzip to" in vm.kernel_boot_note
        result = vm.run(timeout=60)
    from tests.kvm.test_linux_firmware import fnv1a

    report = f"initrd: {len(archive)} bytes at {vm.direct_kernel.initrd_address:#018x} fnv1a "
    assert result.status == 0
    assert report + f"{fnv1a(archive):#018x}" in vm.console.decode(errors="replace")
    with Machine(memory="64M", kernel=test_kernel, initrd=initrd, initrd_unpack=False) as vm:
        assert vm.direct_kernel.initrd_size == initrd.stat().st_size
        assert "decompressed on the host (gzip" not in vm.kernel_boot_note


def cpio_with_init(tmp_path: Path) -> bytes:
    import subprocess

    root = tmp_path / "root"
    root.mkdir()
    (root / "init").write_bytes(b"#!/bin/sh\n" + bytes(range(256)) * 64)
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"init\n", cwd=root,
                          capture_output=True, check=True).stdout


def test_direct_boot_errors_are_one_line(test_kernel: Path, guest, tmp_path: Path) -> None:
    import subprocess
    import sys

    truncated = tmp_path / "truncated"
    truncated.write_bytes(test_kernel.read_bytes()[:3000])  # the header promises more
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    cases = [
        (["-kernel", str(tmp_path / "missing")], "missing: no such kernel file"),
        (["-kernel", str(truncated)], "truncated: 3000 bytes, but the setup header says"),
        (["-kernel", str(guest("hello", "elf"))], "without a PVH entry note"),
        (["-kernel", str(test_kernel), "-initrd", str(big), "-m", "32M"],
         "big.img: initrd of 41943040 bytes does not fit in RAM"),
        (["-kernel", str(test_kernel), "--kernel-boot", "bzimage", "-append", "x" * 3000],
         "kernel command line is 3"),
        (["-kernel", str(test_kernel.with_name("vmlinux")), "--kernel-boot", "bzimage"],
         "an ELF kernel boots only through PVH"),
    ]
    for extra, message in cases:
        done = subprocess.run([sys.executable, "-m", "leanvm", "run", *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (extra, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (extra, done.stderr)
