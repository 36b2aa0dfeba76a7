"""The tiny x86 firmware (tests/guests/firmware) on KVM, as the benchmarks run it: `outloop`
to its exit status with one exit per port write, `flashwork` through both flash banks to
"flashwork done" with the vars store changed as programmed (persistent) or left alone
(ephemeral). Where QEMU is installed, the same images run there and leave the same store."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import build
from build import FLASHWORK_DONE, build_firmware

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build the tiny firmware (make test installs it)")


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", "run", "-q", "-m", "16M", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def store(tmp_path: Path, name: str = "vars.fd") -> tuple[Path, bytes]:
    initial = build.flashwork_vars()
    path = tmp_path / name
    path.write_bytes(initial)
    return path, initial


@pytest.mark.parametrize("count", [0, 2500])
def test_outloop_exits_once_per_port_write(tools, tmp_path: Path, count: int) -> None:
    stats = tmp_path / "stats.json"
    done = leanvm("--bios", str(build_firmware("outloop", count)), "--stats-json", str(stats),
                  "--timeout", "60")
    assert done.returncode == 0, done.stderr
    figures = json.loads(stats.read_text())
    assert figures["reason"] == "guest-exit" and figures["status"] == 0
    assert figures["device_accesses"]["pio_unclaimed"] == count  # port 0x80: nothing there
    assert figures["exits"] == count + 1  # and the write to the exit port


@pytest.mark.parametrize("spelling", ["--flash", "-drive"])
def test_flashwork_programs_and_erases_a_persistent_store(tools, tmp_path: Path,
                                                          spelling: str) -> None:
    vars_, initial = store(tmp_path)
    code = build_firmware("flashwork")
    if spelling == "--flash":
        banks = ["--flash", f"code={code}", "--flash", f"vars={vars_},mode=persistent"]
    else:
        banks = ["-drive", f"if=pflash,format=raw,file={code},readonly=on",
                 "-drive", f"if=pflash,format=raw,file={vars_}"]
    done = leanvm(*banks, "--until", FLASHWORK_DONE, "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert FLASHWORK_DONE in done.stdout and "failed" not in done.stdout
    assert vars_.read_bytes() == build.flashwork_vars_after(initial)
    assert not Path(f"{vars_}.journal").exists()


def test_flashwork_leaves_an_ephemeral_store_untouched(tools, tmp_path: Path) -> None:
    vars_, initial = store(tmp_path)
    before = os.stat(vars_).st_mtime_ns
    done = leanvm("--flash", f"code={build_firmware('flashwork')}",
                  "--flash", f"vars={vars_},mode=ephemeral", "--until", FLASHWORK_DONE,
                  "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert FLASHWORK_DONE in done.stdout  # it read back what it wrote: the VM saw the writes
    assert vars_.read_bytes() == initial and os.stat(vars_).st_mtime_ns == before


def test_flashwork_reports_a_store_it_cannot_program(tools, tmp_path: Path) -> None:
    vars_, initial = store(tmp_path)
    done = leanvm("--flash", f"code={build_firmware('flashwork')}",
                  "--flash", f"vars={vars_},mode=readonly", "--timeout", "60")
    assert done.returncode == 3, done.stdout  # its step number, through the exit port
    assert "flashwork: program failed" in done.stdout and FLASHWORK_DONE not in done.stdout
    assert vars_.read_bytes() == initial


def test_flashwork_checks_the_code_bank_it_reads(tools, tmp_path: Path) -> None:
    image = bytearray(build_firmware("flashwork").read_bytes())
    image[0x8000] ^= 0x01  # padding the code never runs, but the checksum covers it
    code = tmp_path / "damaged.bin"
    code.write_bytes(bytes(image))
    vars_, _ = store(tmp_path)
    done = leanvm("--flash", f"code={code}", "--flash", f"vars={vars_}", "--timeout", "60")
    assert done.returncode == 1, done.stdout
    assert "flashwork: code bank checksum failed" in done.stdout


def qemu_pc(*args: str) -> list[str]:
    return [QEMU, "-M", "pc", "-accel", "kvm", "-m", "16M", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *args]


def wait_for_text(proc: subprocess.Popen, text: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


@pytest.fixture(scope="module")
def qemu() -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (scripts/install-deps bench installs it)")


def test_qemu_runs_outloop_to_its_exit_status(tools, qemu) -> None:
    done = subprocess.run(qemu_pc("-bios", str(build_firmware("outloop", 2500))),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr  # isa-debug-exit: (0 << 1) | 1


def test_qemu_leaves_the_store_as_leanvm_does(tools, qemu, tmp_path: Path) -> None:
    vars_, initial = store(tmp_path)
    code = build_firmware("flashwork")
    proc = subprocess.Popen(qemu_pc("-drive", f"if=pflash,format=raw,file={code},readonly=on",
                                    "-drive", f"if=pflash,format=raw,file={vars_}"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        console = wait_for_text(proc, FLASHWORK_DONE, 60)
        assert FLASHWORK_DONE in console and proc.poll() is None  # done, and still up
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert vars_.read_bytes() == build.flashwork_vars_after(initial)
