"""A stand-in for kvm.vm.Vm that records memslots, for tests of what changes them."""

from __future__ import annotations


class FakeVm:
    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, bool]] = {}

    def set_memory_region(self, slot: int, gpa: int, size: int, host: int,
                          readonly: bool = False) -> None:
        if size:
            self.slots[slot] = (gpa, size, host, readonly)
        else:
            self.slots.pop(slot, None)

    def mapped(self, gpa: int) -> int | None:
        """The host address KVM would use for ``gpa``, or None."""
        for base, size, host, _ in self.slots.values():
            if base <= gpa < base + size:
                return host + gpa - base
        return None
