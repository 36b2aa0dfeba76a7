"""The emulation fallback, CPU profile and host check on real KVM, with the insns guest
(tests/guests/programs/insns.c: instructions this host's KVM cannot emulate at CPL 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanvm import Machine
from leanvm.machine.host_check import PROBE_VERSION, check_host, probe
from leanvm.machine.vcpu_loop import StopReason


@pytest.fixture(scope="module")
def finding():
    return check_host()


def values(console: str) -> dict[str, int]:
    """'name 0x...' lines -> {name: value}."""
    out = {}
    for line in console.splitlines():
        name, _, value = line.strip().partition(" ")
        if value.startswith("0x"):
            out[name] = int(value, 16)
    return out


def expected_results() -> dict[str, int]:
    """What insns.c must print, computed here from the operands it uses."""
    return {
        "popcnt-reg": bin(0xFF00FF00FF00FF01).count("1"),
        "popcnt-mem": bin(0xF0F0000000000001).count("1"),
        "popcnt-rip": bin(0xF0F0000000000001).count("1"),
        "mxcsr": 0x7F80,
        "ac-after-stac": 1, "ac-after-clac": 0, "fwait": 1,
        "cmpxchg16b-zf": 1, "cmpxchg16b-mem": 7 << 8 | 8,
        "int3-count": 1,
        "gp-count": 1, "gp-error": 0,
        "pf-count": 1, "pf-cr2": 0x2800010, "pf-error": 0,
    }


def test_insns_give_the_right_answers_with_the_fallback(guest, finding) -> None:
    with Machine(memory="64M", guest=guest("insns"), emulation_fallback="on") as vm:
        result = vm.run(timeout=60)
        fallback = vm.fallback
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, result.detail
    got = values(vm.console.decode())
    expected = expected_results()
    if os.environ.get("LEANVM_NESTED") == "tcg":  # docs/nested.md: TCG's LDMXCSR never #GPs
        expected.pop("gp-count")
        expected.pop("gp-error")
    for name, value in expected.items():
        assert got.get(name) == value, (name, got.get(name))
    # MOVBE: byte-swapped, or #UD where the CPU has no MOVBE (the handler reports 0xdead)
    assert got["movbe"] in (0x11223344, 0xDEAD)
    assert fallback is not None
    if finding.needs_fallback:
        assert fallback.total > 0 and fallback.total == sum(fallback.counts.values())
        assert fallback.seconds > 0
        for name in ("popcnt", "ldmxcsr", "stmxcsr", "int3"):
            if name in finding.failing:
                assert fallback.counts.get(name, 0) > 0, (name, fallback.counts)
        if "int3" in finding.failing:
            assert fallback.exceptions.get("#BP") == 1
        if "popcnt" in finding.failing:
            assert fallback.exceptions.get("#PF") == 1  # the popcnt on the unmapped page


def test_without_the_fallback_the_vm_stops_with_the_instruction_bytes(guest, finding) -> None:
    with Machine(memory="64M", guest=guest("insns"), emulation_fallback="off") as vm:
        result = vm.run(timeout=60)
        assert vm.fallback is None
    if not finding.needs_fallback:
        assert result.reason is StopReason.GUEST_EXIT
        return
    assert result.reason is StopReason.INTERNAL_ERROR and result.exit_code == 3
    assert result.detail.startswith("KVM internal error (emulation failure) at RIP 0x")
    assert "instruction bytes f3 48 0f b8" in result.detail  # the first POPCNT
    assert "insns start" in vm.console.decode() and "popcnt-reg" not in vm.console.decode()


def test_auto_follows_the_host_check(guest, finding) -> None:
    with Machine(memory="64M", guest=guest("hello")) as vm:
        assert (vm.fallback is not None) == finding.needs_fallback
        assert vm.cpu_profile == ("emulated" if finding.needs_fallback else "host")
    with Machine(memory="64M", guest=guest("hello"), cpu_profile="host",
                 emulation_fallback="off") as vm:
        assert vm.fallback is None and vm.cpu_profile == "host"


def test_cli_summary_and_stats_json(guest, finding, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    env = {**os.environ, "LEANVM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "-m", "64M", "--guest",
                           str(guest("insns")), "--emulation-fallback", "on",
                           "--stats-json", str(stats)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(stats.read_text())
    counts = data["emulation_fallback"]["counts"]
    assert data["emulation_fallback"]["total"] == sum(counts.values())
    assert data["cpu_profile"] == ("emulated" if finding.needs_fallback else "host")
    lines = [ln for ln in done.stderr.splitlines() if "emulation fallback" in ln]
    if finding.needs_fallback:
        assert counts.get("popcnt", 0) >= 1 or "popcnt" not in finding.failing
        assert len(lines) == 1 and lines[0].strip().startswith(
            f"emulation fallback {data['emulation_fallback']['total']} instructions in ")
    else:
        assert lines == []


def test_host_check_is_cached_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    first = check_host()
    assert first.error is None and not first.cached
    assert "add" not in first.failing  # the control instruction always runs
    second = check_host()
    assert second.cached and second.failing == first.failing
    assert (tmp_path / "host-check").read_text().startswith(f"key: v{PROBE_VERSION} ")
    assert second.unhidden == first.unhidden
    assert probe().failing == first.failing  # the probe answers the same every time


def test_version_prints_the_finding(finding, tmp_path: Path) -> None:
    env = {**os.environ, "LEANVM_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "leanvm", "version"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0
    assert finding.describe() in done.stdout


def test_the_fallback_reads_flash_in_a_command_mode_as_a_plain_load_does(guest, finding,
                                                                          tmp_path: Path) -> None:
    """popcnt on flash in read-status mode: the device's status register, not the array."""
    from leanvm.devices.pflash import GEOMETRIES, CfiFlash

    array = bytes([0x0F, 0xF0, 0x33, 0x01, 0x7F, 0xFF, 0x10, 0x02]) * 512  # 4 KiB
    image = tmp_path / "code.fd"
    image.write_bytes(array)
    base = (1 << 32) - len(array)  # a pc bank sits just below 4 GiB
    model = CfiFlash(memoryview(bytearray(array)), GEOMETRIES["pc"], image_size=len(array),
                     writable=False, on_romd=lambda on: None)
    model.write(0, 1, 0x70)
    status = model.read(0, 8)
    with Machine(memory="32M", guest=guest("flashpop"), args=f"{base:#x}",
                 flash=(parse_flash(f"code={image}"),), emulation_fallback="on") as vm:
        result = vm.run(timeout=60)
        counts = dict(vm.fallback.counts) if vm.fallback is not None else {}
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, result.detail
    got = values(vm.console.decode())
    assert got["status-popcnt"] == bin(status).count("1")
    assert got["array-popcnt"] == bin(int.from_bytes(array[:8], "little")).count("1")
    assert got["status-popcnt"] != got["array-popcnt"]  # the test tells the two apart
    if "popcnt-memory" in finding.failing:
        assert counts.get("popcnt", 0) >= 2, counts  # it was the fallback that read them


def parse_flash(text: str):  # type: ignore[no-untyped-def]
    from leanvm.machine.flash import parse_flash_option

    return parse_flash_option(text)
