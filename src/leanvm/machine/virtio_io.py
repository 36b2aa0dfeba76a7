"""The I/O thread: answers virtio queue notifications that KVM delivered through ioeventfd.

A driver's QueueNotify write signals an eventfd in the kernel without leaving the guest; this
thread waits on all of them (poll) and hands each signalled queue to its transport, which
processes it under the device's lock. One more eventfd wakes the thread to end it.
"""

from __future__ import annotations

import os
import select
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.devices.virtio.mmio import MmioTransport


class IoThread:
    def __init__(self, notify_fds: "list[tuple[int, MmioTransport, int]]") -> None:
        self._targets = {fd: (transport, queue) for fd, transport, queue in notify_fds}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.wakeups = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="leanvm-virtio-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        for fd in (*self._targets, self._wake):
            poller.register(fd, select.POLLIN)
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == self._wake:
                        return
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    self.wakeups += 1
                    transport, queue = self._targets[fd]
                    transport.notify(queue)
        except BaseException as exc:  # kept for the stats; the vCPUs go on without it
            self.error = exc

    def close(self) -> None:
        os.eventfd_write(self._wake, 1)
        self._thread.join(5)
        os.close(self._wake)
