"""Persistent flash stores: block groups land whole or not at all, even under kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

from hypothesis import given, settings, strategies as st

from leanvm.firmware import journal

BLOCK = 4096
BLOCKS = 64


def test_commit_writes_blocks_and_leaves_no_journal(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    image.write_bytes(b"\xff" * BLOCK * 4)
    journal.commit(image, {BLOCK: b"a" * BLOCK, 3 * BLOCK: b"b" * BLOCK})
    data = image.read_bytes()
    assert data[BLOCK:2 * BLOCK] == b"a" * BLOCK and data[3 * BLOCK:] == b"b" * BLOCK
    assert data[:BLOCK] == b"\xff" * BLOCK
    assert not journal.journal_path(image).exists()


def test_a_complete_journal_is_replayed(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    image.write_bytes(bytes(BLOCK * 2))
    body = journal.HEADER.pack(journal.MAGIC, 1) + journal.ENTRY.pack(BLOCK, 4, zlib.crc32(b"abcd")) + b"abcd"
    journal.journal_path(image).write_bytes(body + journal.TRAILER.pack(zlib.crc32(body)))
    assert journal.recover(image) == 1
    assert image.read_bytes()[BLOCK:BLOCK + 4] == b"abcd"
    assert not journal.journal_path(image).exists()


@given(st.integers(0, 131))  # the whole journal is 132 bytes
@settings(max_examples=60, deadline=None)
def test_a_torn_journal_is_dropped(cut: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "vars.fd"
        image.write_bytes(bytes(BLOCK))
        body = journal.HEADER.pack(journal.MAGIC, 1) + journal.ENTRY.pack(0, 100, zlib.crc32(b"x" * 100)) + b"x" * 100
        whole = body + journal.TRAILER.pack(zlib.crc32(body))
        journal.journal_path(image).write_bytes(whole[:cut])
        assert journal.recover(image) == 0
        assert image.read_bytes() == bytes(BLOCK)


WRITER = r"""
import sys
from pathlib import Path
from leanvm.firmware import journal
image = Path(sys.argv[1])
generation = 0
while True:
    generation += 1
    stamp = generation.to_bytes(4, "little")
    # every block of a group carries the same generation, repeated through the block
    blocks = {i * 4096: stamp * 1024 for i in range(0, 64, 3)}
    journal.commit(image, blocks)
    print(generation, flush=True)
"""


def test_kill_9_during_a_long_write_sequence_never_tears_a_block(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    image.write_bytes(bytes(BLOCK * BLOCKS))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(image)], stdout=subprocess.PIPE,
                                env=env)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one group committed
        time.sleep(0.01 + 0.013 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        journal.recover(image)
        data = image.read_bytes()
        stamps = set()
        for i in range(0, BLOCKS, 3):
            block = data[i * BLOCK:(i + 1) * BLOCK]
            stamp = block[:4]
            assert block == stamp * 1024, f"block {i} is torn"
            stamps.add(stamp)
        assert len(stamps) == 1, "a group was applied partly"
        for i in range(BLOCKS):
            if i % 3:
                assert data[i * BLOCK:(i + 1) * BLOCK] == bytes(BLOCK)
