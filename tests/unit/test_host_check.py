"""The host check's cache and finding (machine/host_check.py), with the probe replaced: no
KVM. tests/kvm/test_fallback.py runs the real probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanvm.machine import host_check
from leanvm.machine.host_check import HostFinding


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    calls: list[str] = []

    def fake_probe(kvm_path: str = "/dev/kvm") -> HostFinding:
        calls.append(kvm_path)
        return HostFinding(("int3", "popcnt"), ("movbe",), False, 0.004, None, ("xsave", "avx"))

    monkeypatch.setattr(host_check, "probe", fake_probe)
    return calls


def test_first_check_probes_and_the_next_reads_the_cache(probes: list[str], tmp_path: Path) -> None:
    first = host_check.check_host()
    assert probes == ["/dev/kvm"] and not first.cached and first.needs_fallback
    second = host_check.check_host()
    assert probes == ["/dev/kvm"]  # no second probe
    assert second.cached and second.failing == ("int3", "popcnt")
    assert second.faulting == ("movbe",) and second.unhidden == ("xsave", "avx")
    assert "shows these hidden features all the same: xsave, avx" in second.describe()
    assert not list(tmp_path.glob("*.tmp"))  # written with write-then-rename


def test_a_different_boot_or_device_probes_again(probes: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    host_check.check_host()
    host_check.check_host("/dev/other-kvm")
    assert probes == ["/dev/kvm", "/dev/other-kvm"]
    text = (tmp_path / "host-check").read_text()
    (tmp_path / "host-check").write_text(text.replace(" /dev/other-kvm", " /dev/other-kvm-2"))
    host_check.check_host("/dev/other-kvm")
    assert len(probes) == 3


def test_a_failed_probe_is_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    finding = host_check.check_host("/nonexistent/kvm")
    assert finding.error is not None and not finding.needs_fallback
    assert "could not probe" in finding.describe()
    assert not (tmp_path / "host-check").exists()


def test_an_unwritable_cache_costs_only_another_probe(probes: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LEANVM_CACHE", str(blocker))
    assert host_check.check_host().needs_fallback
    assert host_check.check_host().needs_fallback
    assert len(probes) == 2


def test_garbage_in_the_cache_is_ignored(probes: list[str], tmp_path: Path) -> None:
    (tmp_path / "host-check").write_bytes(b"\xff\xfe garbage")
    assert not host_check.check_host().cached
    assert len(probes) == 1


def test_describe() -> None:
    needs = HostFinding(("int3", "clac"))
    assert needs.describe() == (
        "this host's KVM emulates supervisor code and cannot emulate: int3, clac; leanvm uses "
        "the emulated CPU profile and the fallback by default")
    assert "host CPU profile and no fallback" in HostFinding(()).describe()
