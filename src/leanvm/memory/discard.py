"""The discard manager: which blocks of a RAM region hold memory (populated) and which were
given back to the host (discarded), and who must hear when that changes.

QEMU's RamDiscardManager semantics (include/exec/memory.h), in leanvm's words:

- A region is cut into blocks of ``block_size`` bytes; each block is populated or discarded.
  A source of discards (virtio-mem today; a balloon or free-page reporting later) is the only
  thing that changes the state, one aligned range at a time.
- Listeners hear of every change: ``on_populate(offset, size)`` before the guest may use the
  memory, ``on_discard(offset, size)`` once it may not. Populate goes to listeners in the
  order they were added, discard in the reverse order (tear-down mirrors set-up). A listener
  that refuses a populate (raises) undoes it: the listeners already told hear a discard of
  the same range, and the state stays discarded.
- ``replay_populated`` / ``replay_discarded`` call a function once per maximal run of
  populated or discarded blocks inside a range: how a consumer (a dump, a reset, residency
  accounting, a snapshot) walks only what is there, and never touches the rest.
- A listener added later is told of what is populated already (``replay=True``), so it
  starts in step.

Pure bookkeeping: no host memory is touched here. The owner of the memory (machine/
memory_manager.py) is the listener that gives discarded pages back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from leanvm.errors import DeviceError

POPULATED, DISCARDED = 1, 0
MAX_BLOCKS = 1 << 22  # a bitmap of a byte per block: 4 MiB at most (8 TiB in 2 MiB blocks)


class DiscardListener(Protocol):
    def on_populate(self, offset: int, size: int) -> None: ...

    def on_discard(self, offset: int, size: int) -> None: ...


class DiscardManager:
    """Populated/discarded state of one region (``size`` bytes, offsets from its start)."""

    __slots__ = ("name", "size", "block_size", "_state", "_listeners", "populates", "discards")

    def __init__(self, name: str, size: int, block_size: int, *, populated: bool = False) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise DeviceError(f"{name}: discard block size {block_size} is not a power of two")
        if size <= 0 or size % block_size:
            raise DeviceError(f"{name}: size {size:#x} is not a positive multiple of the "
                              f"block size {block_size:#x}")
        if size // block_size > MAX_BLOCKS:
            raise DeviceError(f"{name}: {size // block_size} blocks of {block_size:#x} bytes; "
                              f"at most {MAX_BLOCKS} are tracked (use larger blocks)")
        self.name = name
        self.size = size
        self.block_size = block_size
        self._state = bytearray([POPULATED if populated else DISCARDED]) * (size // block_size)
        self._listeners: list[DiscardListener] = []
        self.populates = 0  # ranges populated and discarded so far (for the stats)
        self.discards = 0

    # --- listeners ---------------------------------------------------------------------
    def add_listener(self, listener: DiscardListener, *, replay: bool = True) -> None:
        """Add ``listener``; with ``replay`` it hears ``on_populate`` for what is populated."""
        if replay:
            self.replay_populated(0, self.size, listener.on_populate)
        self._listeners.append(listener)

    def remove_listener(self, listener: DiscardListener) -> None:
        self._listeners.remove(listener)

    # --- state -------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return len(self._state)

    def _blocks(self, offset: int, size: int) -> tuple[int, int]:
        """[first, end) block indices of an aligned, in-range ``[offset, offset + size)``."""
        if (offset < 0 or size <= 0 or offset % self.block_size or size % self.block_size
                or offset + size > self.size):
            raise DeviceError(f"{self.name}: range [{offset:#x}, +{size:#x}) is not whole "
                              f"blocks of {self.block_size:#x} inside {self.size:#x} bytes")
        return offset // self.block_size, (offset + size) // self.block_size

    def is_populated(self, offset: int, size: int) -> bool:
        """Whether every block of the aligned range is populated."""
        first, end = self._blocks(offset, size)
        return self._state.find(DISCARDED, first, end) < 0

    def is_discarded(self, offset: int, size: int) -> bool:
        """Whether every block of the aligned range is discarded."""
        first, end = self._blocks(offset, size)
        return self._state.find(POPULATED, first, end) < 0

    def block_populated(self, index: int) -> bool:
        return self._state[index] == POPULATED

    @property
    def populated_bytes(self) -> int:
        return self._state.count(POPULATED) * self.block_size

    def bitmap(self) -> bytes:
        """A byte per block: 1 populated, 0 discarded (a copy)."""
        return bytes(self._state)

    def populate(self, offset: int, size: int) -> None:
        """Mark the range populated and tell the listeners, in order. Blocks populated already
        are left alone: listeners hear only of the runs that change."""
        first, end = self._blocks(offset, size)
        for start, stop in list(self._runs(first, end, DISCARDED)):
            run_offset, run_size = start * self.block_size, (stop - start) * self.block_size
            told: list[DiscardListener] = []
            try:
                for listener in self._listeners:
                    listener.on_populate(run_offset, run_size)
                    told.append(listener)
            except BaseException:
                for listener in reversed(told):
                    listener.on_discard(run_offset, run_size)
                raise
            self._state[start:stop] = bytes([POPULATED]) * (stop - start)
            self.populates += 1

    def discard(self, offset: int, size: int) -> None:
        """Mark the range discarded and tell the listeners, in reverse order."""
        first, end = self._blocks(offset, size)
        for start, stop in list(self._runs(first, end, POPULATED)):
            self._state[start:stop] = bytes(stop - start)
            run_offset, run_size = start * self.block_size, (stop - start) * self.block_size
            for listener in reversed(self._listeners):
                listener.on_discard(run_offset, run_size)
            self.discards += 1

    # --- replay ------------------------------------------------------------------------
    def _runs(self, first: int, end: int, value: int) -> Iterator[tuple[int, int]]:
        """Maximal [start, stop) runs of blocks equal to ``value`` inside [first, end)."""
        other = DISCARDED if value == POPULATED else POPULATED
        state = self._state
        start = state.find(value, first, end)
        while start >= 0:
            stop = state.find(other, start, end)
            stop = end if stop < 0 else stop
            yield start, stop
            start = state.find(value, stop, end) if stop < end else -1

    def _replay(self, offset: int, size: int, value: int, call: Callable[[int, int], None]
                ) -> None:
        if size <= 0:
            return
        if offset < 0 or offset + size > self.size:
            raise DeviceError(f"{self.name}: range [{offset:#x}, +{size:#x}) is outside "
                              f"{self.size:#x} bytes")
        first = offset // self.block_size
        end = -(-(offset + size) // self.block_size)
        for start, stop in self._runs(first, end, value):
            low = max(start * self.block_size, offset)
            high = min(stop * self.block_size, offset + size)
            call(low, high - low)

    def replay_populated(self, offset: int, size: int, call: Callable[[int, int], None]) -> None:
        """``call(offset, size)`` for each maximal populated run of [offset, offset + size),
        clipped to it (the range need not be block aligned)."""
        self._replay(offset, size, POPULATED, call)

    def replay_discarded(self, offset: int, size: int, call: Callable[[int, int], None]) -> None:
        self._replay(offset, size, DISCARDED, call)

    def populated_ranges(self, offset: int = 0, size: int | None = None) -> list[tuple[int, int]]:
        """(offset, size) of the populated runs (a convenience over replay_populated)."""
        out: list[tuple[int, int]] = []
        self.replay_populated(offset, self.size - offset if size is None else size,
                              lambda o, s: out.append((o, s)))
        return out

    def discarded_ranges(self, offset: int = 0, size: int | None = None) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        self.replay_discarded(offset, self.size - offset if size is None else size,
                              lambda o, s: out.append((o, s)))
        return out
