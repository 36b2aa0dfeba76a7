"""Shared fixtures. Tests under tests/kvm need /dev/kvm and are skipped, with the reason,
where it cannot be opened; tests that need gcc for guest programs skip without it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "guests"))

from build import build_guest, build_test_kernel  # noqa: E402
from kernel_fixtures import (busybox_initrd, minimal_kernel, spin_initrd,  # noqa: E402,F401
                             test_init_initrd)


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (join the kvm group or run as root)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_unavailable_reason()
    for item in items:
        if "tests/kvm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.kvm)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


USER_SPACE_MISSING = ("this host's KVM cannot run guest user space (it emulates guest kernel code "
                      "and drops guest SYSCALLs); make test runs this on a real KVM in L1 (make "
                      "test-nested, docs/nested.md)")


@pytest.fixture(scope="session")
def user_space() -> None:
    """Skips the test, saying why, where this host's KVM cannot run guest user space (the
    nested tier, make test-nested, runs it on a real KVM)."""
    from leanvm.machine.host_check import check_host

    finding = check_host()
    if finding.error or finding.needs_fallback:
        pytest.skip(USER_SPACE_MISSING)


@pytest.fixture(scope="session")
def guest():
    """guest(name, kind='bin') -> Path of tests/guests/programs/NAME built by gcc (cached)."""
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc and objcopy are needed to build guest programs (make test installs them)")
    return build_guest


@pytest.fixture(scope="session")
def test_kernel() -> Path:
    """The Linux-shaped test kernel (tests/guests/linux) as a bzImage, built by gcc (cached)."""
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc and objcopy are needed to build the test kernel (make test installs them)")
    return build_test_kernel()
