"""A persistent vars store survives kill -9 in the middle of a long write sequence."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leanvm.firmware import journal
from leanvm.machine.flash import FlashSpec
from leanvm.machine.machine import Machine

KiB = 1 << 10
BLOCKS = 8


@pytest.mark.slow
def test_kill_9_while_the_guest_rewrites_its_vars(guest, tmp_path: Path) -> None:
    code = tmp_path / "code.fd"
    code.write_bytes(b"\x90" * (64 * KiB))
    vars_ = tmp_path / "vars.fd"
    vars_.write_bytes(b"\x00" * (64 * KiB))
    vars_base = (1 << 32) - 64 * KiB - 64 * KiB
    rng = random.Random(7)
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "leanvm", "run", "-q", "--guest", str(guest("flashloop")),
             "--args", f"{vars_base:#x} {BLOCKS:#x}", "--flash", f"code={code}",
             "--flash", f"vars={vars_},mode=persistent"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("gen ")  # a whole generation is on disk
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Machine(memory="16M", flash=(FlashSpec("code", code),
                                          FlashSpec("vars", vars_, "persistent"))):
            pass  # opening the store finishes or drops an interrupted write group
        assert not journal.journal_path(vars_).exists()
        data = vars_.read_bytes()
        stamps = []
        for block in range(BLOCKS):
            chunk = data[block * 4 * KiB:(block + 1) * 4 * KiB]
            stamp = chunk[:4]
            assert chunk == stamp * 1024, f"attempt {attempt}: block {block} is torn"
            stamps.append(int.from_bytes(stamp, "little"))
        # blocks are written in order: generations never increase along the store
        assert all(a >= b for a, b in zip(stamps, stamps[1:])), stamps
        assert stamps[0] - stamps[-1] <= 1 and stamps[-1] >= 1
        assert data[BLOCKS * 4 * KiB:] == bytes(64 * KiB - BLOCKS * 4 * KiB)
