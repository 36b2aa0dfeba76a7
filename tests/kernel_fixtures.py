"""Fixtures for tests that boot the minimal kernel (kernels/minimal.config).

The kernel is built once by scripts/build-kernel (about 3 minutes on 2 cores, then cached in
build/kernel); a test is skipped only when it cannot be built here (the linux-source package
or a build tool is missing: exit status 3 of the builder), and fails when the build fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILDER = ROOT / "scripts" / "build-kernel"
MISSING_PREREQUISITE = 3  # build-kernel's exit status when source or tools are absent
BUILD_TIMEOUT = 1800  # seconds; a cold build takes about 3 minutes here


def build_minimal_kernel() -> Path:
    """The minimal kernel's bzImage (vmlinux sits next to it); skips the calling test when it
    cannot be built on this machine."""
    done = subprocess.run([sys.executable, str(BUILDER)], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    if done.returncode == MISSING_PREREQUISITE:
        pytest.skip(f"the minimal kernel cannot be built here: {done.stderr.strip()}")
    if done.returncode != 0:
        pytest.fail(f"scripts/build-kernel failed (exit {done.returncode}):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def user_program(name: str) -> Path:
    """tests/guests/init/NAME.c built as a static program (tests/guests/init/build.py; loaded
    by path: tests/guests/build.py already holds the module name "build")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "leanvm_init_build", ROOT / "tests" / "guests" / "init" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_program(name)


@pytest.fixture(scope="session")
def minimal_kernel() -> Path:
    """Path of the minimal kernel's bzImage, built on first use (cached by its inputs)."""
    return build_minimal_kernel()


@pytest.fixture(scope="session")
def test_init_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uncompressed initramfs holding only /dev/console and the int 0x80 test init
    (tests/guests/init/init.c) as /init."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test init (make test installs it)")
    from leanvm.loader.initramfs import base_image

    init = user_program("init")
    out = tmp_path_factory.mktemp("initrd") / "test-init.cpio"
    base_image(init.read_bytes()).write(out)
    return out


@pytest.fixture(scope="session")
def busybox_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """leanvm's default initramfs (`leanvm initrd build`): Debian's static busybox, its applet
    links, the probe helper and the default /init."""
    from leanvm.errors import ImageError
    from leanvm.loader.initramfs import BUSYBOX, busybox_image

    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (make test installs it)")
    out = tmp_path_factory.mktemp("initrd") / "busybox.cpio"
    try:
        busybox_image().write(out)
    except ImageError as exc:
        pytest.skip(f"no default initramfs here: {exc}")
    return out


@pytest.fixture(scope="session")
def spin_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initramfs whose /init (tests/guests/init/spin.c) spins in user mode without a
    system call: the kernel stays up after "Run /init" on hosts where system calls fail."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the spinning init (make test installs it)")
    from leanvm.loader.initramfs import base_image

    out = tmp_path_factory.mktemp("initrd") / "spin.cpio"
    base_image(user_program("spin").read_bytes()).write(out)
    return out
