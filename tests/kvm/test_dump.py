"""Dumps of running bare guests: read by gdb and pyelftools, taken without stopping the
guest, surviving a VM that stops mid-dump, failing cleanly on a full disk; the CLI's
--dump-on-stop, --dump-on-crash and SIGUSR2."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from leanvm.errors import LeanvmError
from leanvm.machine.config import MachineConfig
from leanvm.machine.machine import Machine

MARKER = 0x6C65616E766D4455
MiB = 1 << 20


def symbol(elf: Path, name: str) -> int:
    with open(elf, "rb") as handle:
        table = ELFFile(handle).get_section_by_name(".symtab")
        return table.get_symbol_by_name(name)[0]["st_value"]


def read_physical(core: Path, address: int, size: int) -> bytes:
    with open(core, "rb") as handle:
        for segment in ELFFile(handle).iter_segments():
            if segment["p_type"] == "PT_LOAD" and (
                    segment["p_paddr"] <= address < segment["p_paddr"] + segment["p_filesz"]):
                start = address - segment["p_paddr"]
                return segment.data()[start:start + size]
    raise AssertionError(f"{address:#x} is not in {core}")


@pytest.fixture
def dumpme(guest) -> Path:
    return guest("dumpme", "elf")


def counter(vm: Machine, elf: Path) -> int:
    return vm.memory.read_u64(symbol(elf, "dump_counter"))


def test_live_dump_of_a_running_guest_is_read_by_gdb(dumpme: Path, tmp_path: Path) -> None:
    core = tmp_path / "core"
    with Machine(MachineConfig(memory="1G", guest=dumpme, args="spin")) as vm:
        vm.wait_for_console("dump me", timeout=60)
        result = vm.dump(core, paging=True)
        before = counter(vm, dumpme)
        time.sleep(0.3)
        assert counter(vm, dumpme) > before, "the guest stopped after the dump"
        assert vm.state.value == "running"
    assert result.pause_ms < 50, f"the guest was held {result.pause_ms:.1f} ms"
    assert result.size < 4 * MiB  # a 1 GiB guest that touched a few pages (and its 2 MiB sweep array)
    assert read_physical(core, symbol(dumpme, "dump_marker"), 8) == MARKER.to_bytes(8, "little")
    page = read_physical(core, symbol(dumpme, "dump_pattern"), 4096)
    assert page == bytes((i * 7 + 1) & 0xFF for i in range(4096))
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (make test installs it)")
    done = subprocess.run(["gdb", "-batch", "-nx", "-ex", "print/x *(unsigned long *)&dump_marker",
                           "-ex", "info registers rip", str(dumpme), str(core)],
                          capture_output=True, text=True, timeout=120)
    assert f"= {MARKER:#x}" in done.stdout, done.stdout + done.stderr
    assert "<main+" in done.stdout  # vCPU 0's rip, from NT_PRSTATUS, is in the spin loop


def test_a_vm_that_stops_during_a_live_dump_still_gets_its_whole_dump(dumpme: Path,
                                                                        tmp_path: Path) -> None:
    core = tmp_path / "core.kdump"
    data = os.urandom(MiB) * 48  # 48 MiB the host leaves in guest RAM: seconds to compress
    with Machine(MachineConfig(memory="256M", guest=dumpme, args="spin")) as vm:
        vm.memory.write(64 * MiB, data)
        vm.wait_for_console("dump me", timeout=60)
        job = vm.dump(core, "kdump-raw-zlib", wait=False)
        vm.stop("the test stops the VM mid-dump")
        vm.wait(30)
        assert not job.done(), "the dump finished before the VM stopped: make it bigger"
    result = job.wait(120)  # close() waited for it too
    assert result.memory >= 48 * MiB and core.stat().st_size == result.size
    assert core.read_bytes()[:8] == b"KDUMP   "
    assert sorted(os.listdir(tmp_path)) == ["core.kdump"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_a_full_file_system_fails_the_dump_cleanly_and_the_vm_runs_on(dumpme: Path,
                                                                       tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with Machine(MachineConfig(memory="64M", guest=dumpme, args="spin")) as vm:
            vm.memory.write(16 * MiB, os.urandom(4 * MiB))
            vm.wait_for_console("dump me", timeout=60)
            with pytest.raises(LeanvmError, match="file system is full") as caught:
                vm.dump(small / "core")
            assert "\n" not in str(caught.value)
            assert os.listdir(small) == []  # no half file, no temporary file
            before = counter(vm, dumpme)
            time.sleep(0.2)
            assert counter(vm, dumpme) > before and vm.state.value == "running"
            assert vm.dump(tmp_path / "core").size > 4 * MiB  # and dumps still work
    finally:
        subprocess.run(["umount", str(small)], check=True)


def leanvm(*args: str, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_cli_dumps_on_stop_and_on_crash(dumpme: Path, guest, tmp_path: Path) -> None:
    core = tmp_path / "stop.kdump"
    done = leanvm("run", "--guest", str(dumpme), "--args", "spin", "--timeout", "2",
                  "--dump-on-stop", str(core), "--dump-format", "kdump-raw-lzo")
    assert done.returncode == 124, done.stderr
    assert f"dump written to {core}" in done.stderr and core.read_bytes()[:8] == b"KDUMP   "
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    done = leanvm("run", "--guest", str(guest("int3")), "--dump-on-crash", str(crashes),
                  "--emulation-fallback", "off")
    assert done.returncode == 3, done.stderr
    written = list(crashes.iterdir())
    assert len(written) == 1 and written[0].suffix == ".elf", done.stderr
    assert ELFFile(io.BytesIO(written[0].read_bytes()))["e_type"] == "ET_CORE"


def test_sigusr2_dumps_a_running_vm_without_stopping_it(dumpme: Path, tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "leanvm", "run", "--guest", str(dumpme),
                                "--args", "spin", "--timeout", "60", "--dump-on-crash",
                                str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        assert "dump me" in process.stdout.readline()
        process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("leanvm-*.elf")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert process.poll() is None, "SIGUSR2 stopped the VM"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    dumps = list(tmp_path.glob("leanvm-*.elf"))
    assert len(dumps) == 1, err
    assert "guest paused" in err and process.returncode == 128 + signal.SIGTERM
    assert ELFFile(io.BytesIO(dumps[0].read_bytes())).num_segments() > 1


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that starts at ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line[0].isupper():
            inside = int(line.split("-", 1)[0], 16) == address
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_huge_pages_back_ram_and_a_live_dump_of_it_is_whole(dumpme: Path, tmp_path: Path) -> None:
    """--huge-pages: RAM is 2 MiB aligned and advised MADV_HUGEPAGE, so the fork of a live
    dump copies one entry per 2 MiB (bench/dump.py measures the pause)."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this host has transparent huge pages turned off")
    with Machine(MachineConfig(memory="1G", guest=dumpme, args="spin", huge_pages=True)) as vm:
        ram = vm.memory.regions[0].mapping
        assert ram.address % (2 << 20) == 0
        vm.memory.write(256 << 20, b"\x5a" * (64 << 20))
        assert _anon_huge_kib(ram.address) >= 32 << 10  # most of the 64 MiB in huge pages
        vm.wait_for_console("dump me", timeout=60)
        done = vm.dump(tmp_path / "huge.kdump", "kdump-zlib")
        assert done.memory >= 64 << 20 and vm.state.value == "running"
        vm.stop()
        vm.wait(30)
