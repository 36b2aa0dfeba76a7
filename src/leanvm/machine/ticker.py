"""A host thread that calls one function every ``interval`` seconds until stopped (the RIP
sampler's kicks, the coalesced-I/O flusher's looks)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Ticker:
    def __init__(self, interval: float, tick: Callable[[], None], name: str) -> None:
        self._interval = interval
        self._tick = tick
        self._name = name
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._done.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self._tick()
