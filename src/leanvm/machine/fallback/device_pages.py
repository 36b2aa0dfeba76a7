"""Guest pages that are not RAM-backed at the moment, served through the MMIO bus while the
emulation fallback runs one instruction: what a plain guest load or store would reach.

Unicorn maps such a page with mmio_map. It calls back with at most 4 bytes at a time and,
for an access that crosses a page end, with aligned supersets of it, so the device would
not see the guest's access. A read hook (installed only while a step has device pages)
notes each read access first; the callbacks then read the access's part inside each page
from the bus once, at its own address and width, and hand Unicorn slices of it. Writes
are collected per access from the write callbacks (their values are the bytes stored,
after MOVBE's swap) and handed back, like RAM writes, to be made only if the instruction
completes, in pieces of at most 8 bytes as KVM's MMIO exits give them. Each callback checks
the page tables' permissions for its page first.

A page KVM maps read-only (a flash bank in read-array mode, read-only BIOS shadow RAM, a
ROM) is handled the same way when an instruction reads or writes it as data: reads come
from the memslot's host memory, writes go to the bus, as KVM sends them there.

What remains approximate: a read that crosses from a page mapped earlier in the step into
a device page mapped during that same access reaches the device as Unicorn's aligned
pieces (no hook saw the access when it began).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from leanvm.memory.paging import READ, WRITE, violation

if TYPE_CHECKING:
    from leanvm.machine.fallback.steps import Mapped, StepInput

PAGE = 4096
MAX_PIECE = 8  # bytes per bus access, as one KVM MMIO exit carries at most
AC_FLAG = 1 << 18  # RFLAGS.AC
PF_VECTOR = 14


class MmioBus(Protocol):
    """The machine's MMIO bus (or a locked wrapper of it)."""

    def read(self, address: int, size: int) -> int: ...

    def write(self, address: int, size: int, value: int) -> None: ...


class DevicePages:
    """The device pages of one engine's steps; ``fault`` is set when a callback found the
    access not allowed (the engine returns it instead of the instruction's outcome)."""

    def __init__(self, uc: Any, bus: MmioBus, mapped: "dict[int, Mapped]",
                 read_hook_type: int) -> None:
        self._uc = uc
        self._bus = bus
        self._mapped = mapped  # the engine's pages, device pages among them
        self._read_hook_type = read_hook_type
        self._reset(None)

    def _reset(self, step: "StepInput | None") -> None:
        self._step = step
        self._hook: int | None = None
        self._read_access: tuple[int, int] | None = None  # (address, size) read last
        self._read_parts: dict[int, tuple[int, bytes]] = {}  # page -> (start, bytes read)
        self._write_serial = 0
        self._write_access = (0, 0, -1)  # (address, size, serial) of the last write access
        self._writes: list[list[Any]] = []  # [page, address, bytearray, serial]
        self._hosts: dict[int, int] = {}  # read-only pages: page -> host address of its bytes
        self.fault: tuple[int, int, int] | None = None  # (vector, error code, linear)

    def begin(self, step: "StepInput") -> None:
        self._reset(step)

    def end(self) -> None:
        if self._hook is not None:
            self._uc.hook_del(self._hook)
        self._reset(None)

    def map(self, page: int, host: int | None = None) -> None:
        """Serve Unicorn's ``page`` (already in the engine's table) through the bus, or,
        given ``host``, its reads from there and its writes through the bus."""
        if host is not None:
            self._hosts[page] = host
        self._uc.mmio_map(page, PAGE, self._on_read, page, self._on_write, page)
        if self._hook is None:
            self._hook = self._uc.hook_add(self._read_hook_type, self._note_read)

    def note_write(self, address: int, size: int) -> None:
        """The engine's write hook saw an access (called before its callbacks)."""
        self._write_serial += 1
        self._write_access = (address, size, self._write_serial)

    # --- Unicorn callbacks -----------------------------------------------------------
    def _note_read(self, _uc: Any, _access: int, address: int, size: int, _value: int,
                   _data: object) -> None:
        self._read_access = (address, size)
        self._read_parts.clear()

    def _on_read(self, uc: Any, offset: int, size: int, page: int) -> int:
        address = page + offset
        if not self._allowed(uc, page, address, READ):
            return 0
        host = self._hosts.get(page)
        if host is not None:  # memory KVM maps read-only: the bytes are there
            return int.from_bytes(ctypes.string_at(host + offset, size), "little")
        access = self._read_access  # the hook fires at each access once it is installed
        if access is None:
            return self._bus_read(page, address, size)  # no hook saw this access begin
        if not (access[0] < address + size and address < sum(access)):
            return 0  # a piece of Unicorn's aligned superset wholly outside the access
        part = self._read_parts.get(page)
        if part is None:
            start = max(access[0], page)
            stop = min(sum(access), page + PAGE)
            part = self._read_parts[page] = (start, self._bus_read(page, start, stop - start)
                                             .to_bytes(stop - start, "little"))
        start, data = part
        # bytes of Unicorn's aligned superset outside the access read as 0 (it drops them)
        return int.from_bytes(bytes(data[i - start] if start <= i < start + len(data) else 0
                                    for i in range(address, address + size)), "little")

    def _on_write(self, uc: Any, offset: int, size: int, value: int, page: int) -> None:
        address = page + offset
        if not self._allowed(uc, page, address, WRITE):
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        start, length, serial = self._write_access
        last = self._writes[-1] if self._writes else None
        if (last is not None and last[0] == page and last[3] == serial
                and last[1] + len(last[2]) == address and address + size <= start + length):
            last[2] += data  # the next piece of the same access
        else:
            self._writes.append([page, address, bytearray(data), serial])

    # --- helpers ---------------------------------------------------------------------
    def _allowed(self, uc: Any, page: int, address: int, kind: str) -> bool:
        entry, step = self._mapped[page], self._step
        if self.fault is not None or step is None:
            return False
        code = violation(step.paging, entry.translation, kind, user=step.user,
                         ac=bool(step.registers["rflags"] & AC_FLAG))
        if code:
            self.fault = (PF_VECTOR, code, entry.linear + (address - page))
            uc.emu_stop()
            return False
        return True

    def _bus_read(self, page: int, address: int, size: int) -> int:
        physical = self._mapped[page].physical + (address - page)
        value = 0
        for done in range(0, size, MAX_PIECE):
            piece = min(MAX_PIECE, size - done)
            value |= self._bus.read(physical + done, piece) << (8 * done)
        return value

    def writes(self) -> list[tuple[int, int, int]]:
        """(guest-physical address, size <= 8, value) of the step's device writes, in order."""
        out = []
        for page, address, data, _ in self._writes:
            physical = self._mapped[page].physical + (address - page)
            for done in range(0, len(data), MAX_PIECE):
                piece = data[done:done + MAX_PIECE]
                out.append((physical + done, len(piece), int.from_bytes(piece, "little")))
        return out


Backing = Callable[[int], "tuple[int, bool] | None"]
"""Guest-physical page -> (host address KVM maps it from, read-only) while a memslot holds
it, or None when accesses to it exit to the MMIO bus (machine.fallback.backing builds one
from the machine's memslots)."""


def memslot_backing(memslots: Any) -> Backing:
    """A Backing read from ``memslots`` (machine.memory_manager.Memslots) at each call: the slot
    of a present owner that wholly holds the page."""

    def backing(page: int) -> "tuple[int, bool] | None":
        present = memslots.present
        for owner, slots in memslots.slots.items():
            if not present.get(owner, True):
                continue
            for slot in slots:
                if slot.gpa <= page and page + PAGE <= slot.gpa + slot.size:
                    return slot.host_address + (page - slot.gpa), slot.readonly
        return None

    return backing
