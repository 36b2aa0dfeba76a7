"""The I/O thread hands each signalled eventfd's queue to its transport, survives spurious
wake-ups and ends on close; ReleasePages refuses shared file-backed memory."""

from __future__ import annotations

import os
import threading
import time

import pytest

from leanvm.errors import LeanvmError
from leanvm.machine.virtio_io import IoThread
from leanvm.memory.host import HostMapping, ReleasePages


class Transport:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.event = threading.Event()

    def notify(self, queue: int) -> None:
        self.seen.append(queue)
        self.event.set()


def test_signalled_queues_reach_their_transports() -> None:
    a, b = Transport(), Transport()
    fa = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fb = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    io = IoThread([(fa, a, 0), (fb, b, 3)])
    try:
        os.eventfd_write(fb, 1)
        assert b.event.wait(5) and b.seen == [3] and a.seen == []
        os.eventfd_write(fa, 5)  # several writes before the thread wakes: one notify
        assert a.event.wait(5)
        time.sleep(0.05)
        assert a.seen == [0] and io.wakeups == 2 and io.error is None
    finally:
        io.close()
        os.close(fa)
        os.close(fb)
    assert not io._thread.is_alive()


def test_release_pages_refuses_shared_file_memory() -> None:
    with pytest.raises(LeanvmError, match="cannot be discarded yet"):
        ReleasePages(HostMapping(0, 4096, writable=True, shared=True, path="/x"))
