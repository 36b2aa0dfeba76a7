"""The RIP sampler's bookkeeping and kernel symbol tables, without KVM."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from leanvm.errors import ConfigError, KvmError
from leanvm.machine import sampler as sampler_module
from leanvm.machine.sampler import RipSampler, kernel_symbols, profile
from leanvm.trace import symbols as symbols_module
from leanvm.trace.symbols import find_symbols, load_symbols

SYSTEM_MAP = """\
ffffffff81000000 T _stext
ffffffff81000100 t helper
ffffffff81000200 D some_data
ffffffff81000300 W weak_function
ffffffff81000400 T last_function
"""


class FakeRegs:
    def __init__(self, rip: int) -> None:
        self.rip = rip


class FakeVcpu:
    def __init__(self, rips: list[int], index: int = 0) -> None:
        self.rips = rips
        self.id = index

    def get_regs(self) -> FakeRegs:
        if not self.rips:
            raise KvmError("KVM_GET_REGS", 9)
        return FakeRegs(self.rips.pop(0))


def test_system_map_names_text_addresses(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    symbols = load_symbols(path)
    assert len(symbols) == 4  # the data symbol is not text
    assert symbols.function(0xFFFFFFFF81000000) == "_stext"
    assert symbols.function(0xFFFFFFFF810001FF) == "helper"
    assert symbols.function(0xFFFFFFFF81000250) == "helper"  # data is no boundary
    assert symbols.function(0xFFFFFFFF81000300) == "weak_function"
    assert symbols.function(0xFFFFFFFF81000400 + 100) == "last_function"
    assert symbols.function(0xFFFFFFFF80FFFFFF) is None  # below the first
    assert symbols.function(0xFFFFFFFF81000400 + (2 << 20)) is None  # far past the last


def test_debians_placeholder_map_is_no_symbol_table(tmp_path: Path) -> None:
    path = tmp_path / "System.map-6.1.0-1-amd64"
    path.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg"
                    " package\n")
    with pytest.raises(ConfigError, match="no text symbols"):
        load_symbols(path)
    assert find_symbols(tmp_path / "vmlinuz", None) is None


def test_unreadable_and_stripped_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read symbols"):
        load_symbols(tmp_path / "missing")
    if shutil.which("gcc") is None:
        pytest.skip("gcc builds the ELF files")
    source = tmp_path / "f.c"
    source.write_text("int f(int x) { return x + 1; }\nint main(void) { return f(1); }\n")
    elf = tmp_path / "a.out"
    subprocess.run(["gcc", "-O1", "-o", str(elf), str(source)], check=True)
    symbols = load_symbols(elf)
    assert symbols.function(symbols.addresses[symbols.names.index("f")]) == "f"
    subprocess.run(["strip", str(elf)], check=True)
    with pytest.raises(ConfigError, match="no function symbols"):
        load_symbols(elf)


def test_symbols_are_found_beside_the_kernel_and_in_debians_places(tmp_path: Path,
                                                                    monkeypatch) -> None:
    kernel = tmp_path / "boot" / "vmlinuz"
    kernel.parent.mkdir()
    kernel.write_bytes(b"not a kernel")
    debug = tmp_path / "debug"
    debug.mkdir()
    (debug / "System.map-6.1.0-9-amd64").write_text(SYSTEM_MAP)
    monkeypatch.setattr(symbols_module, "DEBUG_DIRS", (debug,))
    assert find_symbols(kernel, "6.1.0-9-amd64 (someone@example) #1 SMP") == \
        debug / "System.map-6.1.0-9-amd64"
    assert find_symbols(kernel, "6.1.0-8-amd64 #1") is None  # another version
    (kernel.parent / "System.map").write_text(SYSTEM_MAP)
    assert find_symbols(kernel, None) == kernel.parent / "System.map"
    symbols, note = kernel_symbols(None, kernel)
    assert symbols is not None and note == f"symbols from {kernel.parent / 'System.map'}"
    symbols, note = kernel_symbols(tmp_path / "missing", kernel)
    assert symbols is None and "cannot read symbols" in note


def test_the_sampler_takes_one_sample_per_kick() -> None:
    kicks = threading.Semaphore(0)
    sampler = RipSampler(200, kicks.release)
    vcpu = FakeVcpu([0x1000, 0x2000, 0x3000])
    sampler.take(vcpu)  # no kick yet: an ordinary interruption is no sample
    assert sampler.samples == []
    sampler.start()
    try:
        for _ in range(2):
            assert kicks.acquire(timeout=5)
            sampler.take(vcpu)
            sampler.take(vcpu)  # a second interruption for the same kick takes nothing
    finally:
        sampler.stop()
    assert [rip for _, rip in sampler.samples] == [0x1000, 0x2000]
    assert sampler.samples[0][0] <= sampler.samples[1][0] <= time.monotonic_ns()


def test_unreadable_registers_and_the_limit_count_as_missed(monkeypatch) -> None:
    sampler = RipSampler(10, lambda: None)
    sampler._pending = {0}
    sampler.take(FakeVcpu([]))
    monkeypatch.setattr(sampler_module, "MAX_SAMPLES", 1)
    for rip in (0x10, 0x20):
        sampler._pending = {0}
        sampler.take(FakeVcpu([rip]))
    assert [rip for _, rip in sampler.samples] == [0x10] and sampler.missed == 2


def test_every_vcpu_is_sampled_once_per_kick_and_samples_name_their_vcpu() -> None:
    kicks = threading.Semaphore(0)
    sampler = RipSampler(200, kicks.release, vcpus=3)
    vcpus = [FakeVcpu([0x1000 * (i + 1)] * 4, i) for i in range(3)]
    sampler.start()
    try:
        for _ in range(2):
            assert kicks.acquire(timeout=5)
            for vcpu in reversed(vcpus):
                sampler.take(vcpu)
                sampler.take(vcpu)  # twice: still one sample per vCPU and kick
    finally:
        sampler.stop()
    assert len(sampler.samples) == len(sampler.sample_vcpus) == 6
    assert sorted(sampler.sample_vcpus) == [0, 0, 1, 1, 2, 2]
    for (_, rip), index in zip(sampler.samples, sampler.sample_vcpus):
        assert rip == 0x1000 * (index + 1)


@pytest.mark.parametrize("hz", [0, -1, 1001])
def test_rates_out_of_range_are_refused(hz: float) -> None:
    with pytest.raises(ConfigError, match="sampling rate"):
        RipSampler(hz, lambda: None)


def test_profile_groups_by_function_or_by_page(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    symbols = load_symbols(path)
    samples = [(0, 0xFFFFFFFF81000100), (1, 0xFFFFFFFF81000180), (2, 0xFFFFFFFF81000000),
               (3, 0x100123)]
    assert profile(samples, symbols) == [("helper", 2), ("_stext", 1), ("page 0x100000", 1)]
    assert profile(samples, None, top=1) == [("page 0xffffffff81000000", 3)]
