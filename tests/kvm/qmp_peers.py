"""Running VMs with a QMP socket for the QMP tests: leanvm (`leanvm run -qmp`, a bare guest
that spins) and QEMU 7.2 (`-M pc` on SeaBIOS, which sits at "No bootable device"), each a
process of its own, so the same test drives both."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

QEMU = "qemu-system-x86_64"
SEABIOS = Path("/usr/share/seabios/bios.bin")
MEMORY_MIB = 64


class Peer:
    def __init__(self, kind: str, argv: list[str], sock: Path) -> None:
        self.kind, self.sock = kind, sock
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"{kind} ended before its QMP socket appeared: "
                                     f"{self.process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{kind}: no QMP socket within 30 s")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 20) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process.stderr:
            self.process.stderr.close()


def start_peer(kind: str, tmp_path: Path, guest_path: Path | None, paused: bool = False,
               name: str = "") -> Peer:
    sock = tmp_path / f"{kind}.sock"
    qmp = f"unix:{sock},server=on,wait=off"
    extra = ["-S"] if paused else []
    if name:
        extra += ["-name", name]
    if kind == "leanvm":
        assert guest_path is not None
        argv = [sys.executable, "-m", "leanvm", "run", "--guest", str(guest_path), "-q",
                "-serial", "none", "-m", f"{MEMORY_MIB}M", "-qmp", qmp, *extra]
    else:
        if shutil.which(QEMU) is None or not SEABIOS.exists():
            pytest.skip("QEMU and SeaBIOS are needed for the peer run (make test installs them)")
        argv = [QEMU, "-M", "pc", "-accel", "kvm", "-m", str(MEMORY_MIB), "-nodefaults",
                "-display", "none", "-bios", str(SEABIOS), "-no-reboot", "-qmp", qmp, *extra]
    env_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if not env_ok:
        pytest.skip("/dev/kvm is not accessible")
    return Peer(kind, argv, sock)


def raw_connect(path: Path, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: with a timeout set, a full backlog gives EAGAIN
    sock.settimeout(timeout)
    return sock
