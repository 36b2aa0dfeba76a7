"""Live dumps taken while the guest writes: each one is the guest's memory at one instant
(write-protection and fork alike), the write-protected way pauses the guest for
milliseconds whatever its memory, leaves no protection behind, and keeps the old bytes of
memory a discard gives back while the dump is written."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from leanvm.machine.config import MachineConfig
from leanvm.machine.dump import DumpRequest, dump_live
from leanvm.machine.machine import Machine
from leanvm.memory.userfaultfd import UffdUnavailable, Userfaultfd

MiB = 1 << 20
PAGE = 4096
SWEEP_PAGES = 512  # tests/guests/programs/dumpme.c
PM_UFFD_WP = 1 << 57  # pagemap: the page is write-protected by a userfaultfd


def symbol(elf: Path, name: str) -> int:
    with open(elf, "rb") as handle:
        return ELFFile(handle).get_section_by_name(".symtab").get_symbol_by_name(name)[0][
            "st_value"]


def physical(core: Path, address: int, size: int) -> bytes:
    with open(core, "rb") as handle:
        for segment in ELFFile(handle).iter_segments():
            start, length = segment["p_paddr"], segment["p_filesz"]
            if segment["p_type"] == "PT_LOAD" and start <= address < start + length:
                handle.seek(segment["p_offset"] + address - start)
                return handle.read(size)
    raise AssertionError(f"{address:#x} is not in {core}")


@pytest.fixture
def dumpme(guest) -> Path:
    return guest("dumpme", "elf")


@pytest.fixture
def protection() -> None:
    try:
        Userfaultfd().close()
    except UffdUnavailable as exc:
        pytest.skip(f"write-protected live dumps are not available here: {exc}")


def steps(core: Path, elf: Path) -> tuple[int, list[int]]:
    counter = struct.unpack("<Q", physical(core, symbol(elf, "dump_counter"), 8))[0]
    base = symbol(elf, "dump_sweep")
    return counter, [struct.unpack("<Q", physical(core, base + i * PAGE, 8))[0]
                     for i in range(SWEEP_PAGES)]


@pytest.mark.parametrize("method", ["protect", "protect-rearming", "fork"])
def test_a_live_dump_is_one_instant_of_a_guest_writing_many_pages(
        method: str, dumpme: Path, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if method.startswith("protect"):
        request.getfixturevalue("protection")
    if method == "protect-rearming":  # every write while arming is protected again first
        monkeypatch.setattr("leanvm.machine.live_dump.REARM_PAGES", 0)
        method = "protect"
    with Machine(MachineConfig(memory="256M", guest=dumpme, args="sweep")) as vm:  # 4 chunks to arm
        vm.wait_for_console("dump me", timeout=60)
        address = symbol(dumpme, "dump_counter")
        deadline = time.monotonic() + 60
        while vm.memory.read_u64(address) < 2 * SWEEP_PAGES and time.monotonic() < deadline:
            time.sleep(0.01)
        cores = []
        for index in range(3):
            core = tmp_path / f"core{index}"
            result = dump_live(vm, DumpRequest(core), method=method).wait(120)
            cores.append((core, result))
        after = vm.memory.read_u64(address)
        time.sleep(0.2)
        assert vm.memory.read_u64(address) > after, "the guest stopped sweeping"
    for core, result in cores:
        last, pages = steps(core, dumpme)
        expected = [last - (last - page) % SWEEP_PAGES for page in range(SWEEP_PAGES)]
        between = (last + 1) % SWEEP_PAGES  # caught between a step's two writes: it holds the next
        torn = [page for page in range(SWEEP_PAGES) if pages[page] != expected[page]
                and not (page == between and pages[page] == last + 1)]
        assert last >= SWEEP_PAGES and not torn, (
            f"not one instant: step {last}, pages {torn[:8]} hold "
            f"{[pages[p] for p in torn[:8]]}")
        assert result.pause_ms < 50 and result.method == method


def test_protected_dump_pauses_a_4g_guest_briefly_and_leaves_no_protection(
        dumpme: Path, tmp_path: Path, protection: None) -> None:
    fill = (os.urandom(1024) + bytes(3072)) * (16 * 1024)  # 64 MiB, quick to write
    with Machine(MachineConfig(memory="4G", guest=dumpme, args="sweep")) as vm:
        for offset in range(0, 1024 * MiB, len(fill)):  # 1 GiB populated: a fork takes ~20 ms
            vm.memory.write(256 * MiB + offset, fill)
        vm.wait_for_console("dump me", timeout=60)
        result = dump_live(vm, DumpRequest(tmp_path / "core"), method="protect").wait(300)
        ram = [r for r in vm.memory.regions if r.kind.name == "RAM"]
        with open("/proc/self/pagemap", "rb") as pagemap:
            for region in ram:
                protected = 0
                for start in range(0, region.size, 64 * MiB):
                    pagemap.seek((region.mapping.address + start) // PAGE * 8)
                    raw = pagemap.read(64 * MiB // PAGE * 8)
                    protected += sum(1 for (e,) in struct.iter_unpack("<Q", raw) if e & PM_UFFD_WP)
                assert protected == 0, f"{protected} pages of {region.name} still protected"
        assert vm.state.value == "running"
    assert result.memory >= 1024 * MiB
    assert result.pause_ms < 20, f"the guest was held {result.pause_ms:.1f} ms"


def test_memory_discarded_during_a_protected_dump_is_dumped_as_it_was(
        dumpme: Path, tmp_path: Path, protection: None) -> None:
    pattern = os.urandom(2 * MiB)
    with Machine(MachineConfig(memory="256M,maxmem=1G", guest=dumpme, args="sweep",
                               virtio_mem=("size=256M,requested=0",))) as vm:
        handle = vm.virtio_mem[0]
        vm.memory.write(32 * MiB, os.urandom(192 * MiB))  # written first: seconds of work
        block = handle.block_size
        handle.region.discard.populate(0, block)
        vm.memory.write(handle.address, pattern[:block])
        vm.wait_for_console("dump me", timeout=60)
        job = dump_live(vm, DumpRequest(tmp_path / "core"), method="protect")
        handle.region.discard.discard(0, block)  # as an unplug gives it back
        assert vm.memory.read(handle.address, PAGE) == bytes(PAGE)
        assert not job.done(), "the dump ended before the discard: make it bigger"
        result = job.wait(120)
    assert physical(result.path, handle.address, block) == pattern[:block]


DUMP_ONCE = """
import sys
from leanvm.machine.config import MachineConfig
from leanvm.machine.machine import Machine
with Machine(MachineConfig(memory="64M", guest=sys.argv[1], args="spin")) as vm:
    vm.wait_for_console("dump me", timeout=60)
    print(vm.dump(sys.argv[2]).method)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="dropping capabilities needs root and setpriv")
def test_without_the_right_to_userfaultfd_a_live_dump_forks(dumpme: Path, tmp_path: Path,
                                                            protection: None) -> None:
    done = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable,
                           "-c", DUMP_ONCE, str(dumpme), str(tmp_path / "core")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fork"]
    assert physical(tmp_path / "core", symbol(dumpme, "dump_marker"), 8) == (
        0x6C65616E766D4455).to_bytes(8, "little")
