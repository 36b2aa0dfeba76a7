"""The command line where no KVM is needed: help, version, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def leanvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_help_lists_commands() -> None:
    done = leanvm("--help")
    assert done.returncode == 0
    assert "run" in done.stdout and "version" in done.stdout
    run_help = leanvm("run", "--help")
    assert "-m SIZE[,maxmem=SIZE][,slots=N]" in run_help.stdout


def test_version_flag() -> None:
    from leanvm import __version__

    assert leanvm("--version").stdout.strip() == f"leanvm {__version__}"


@pytest.mark.parametrize("args,message", [
    (["run", "-m", "12Q"], "bad memory size '12Q'"),
    (["run", "-m", "1M"], "out of range"),
    (["run", "--guest", "/nonexistent/x.bin"], "/nonexistent/x.bin: no such file"),
    (["run", "-serial", "tty"], "bad serial mode 'tty'"),
    (["run", "--cpu-hide", "warp"], "unknown CPU feature 'warp'"),
    (["run", "--timeout", "-1"], "bad --timeout"),
])
def test_bad_input_is_one_line_without_traceback(args: list[str], message: str) -> None:
    done = leanvm(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_missing_kvm_device_says_what_to_do() -> None:
    done = leanvm("run", env={"LEANVM_KVM_DEVICE": "/nonexistent/kvm"})
    assert done.returncode == 2
    assert done.stderr.startswith("leanvm: error: open /nonexistent/kvm failed: ENOENT")
    assert "KVM is not available" in done.stderr and done.stderr.count("\n") == 1
