"""The one owner of a VM's guest memory and its KVM memslots.

Every region is added here (RAM from the plan, flash banks, regions users add), and every
change to what KVM maps goes through here: a flash bank leaving and entering read-array
mode, the kernel-entry trap taking a page out, the BIOS area rebuilt from the PAM registers
(and, next, virtio-mem plugging and unplugging). RAM is found by role, never by name.
"""

from __future__ import annotations

from typing import NamedTuple

from leanvm.kvm.vm import Vm
from leanvm.layout.region import MemoryMap
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous, map_anonymous_huge


class Slot(NamedTuple):
    number: int
    gpa: int
    size: int
    host_address: int
    readonly: bool


class Memslots:
    """Assigns KVM memslot numbers to guest regions and keeps them in step: a region may be
    unmapped and mapped again (flash leaving and entering read-array mode), and a group of
    slots may take over a window of a region mapped before it (the BIOS area)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.next_slot = 0
        self.free: list[int] = []
        self.slots: dict[str, list[Slot]] = {}
        self.present: dict[str, bool] = {}

    def _create(self, gpa: int, size: int, host: int, readonly: bool) -> Slot:
        if self.free:
            number = self.free.pop()
        else:
            number, self.next_slot = self.next_slot, self.next_slot + 1
        slot = Slot(number, gpa, size, host, readonly)
        self.vm.set_memory_region(slot.number, gpa, size, host, readonly=readonly)
        return slot

    def _delete(self, slot: Slot) -> None:
        self.vm.set_memory_region(slot.number, slot.gpa, 0, slot.host_address)
        self.free.append(slot.number)

    def _split(self, slot: Slot, gpa: int, end: int) -> list[Slot]:
        """The parts of ``slot`` outside [gpa, end), as new slots (``slot`` is deleted)."""
        self._delete(slot)
        kept = []
        if slot.gpa < gpa:
            kept.append(self._create(slot.gpa, gpa - slot.gpa, slot.host_address,
                                     slot.readonly))
        if slot.gpa + slot.size > end:
            offset = end - slot.gpa
            kept.append(self._create(end, slot.size - offset, slot.host_address + offset,
                                     slot.readonly))
        return kept

    def punch(self, gpa: int, size: int) -> list[tuple[str, Slot]]:
        """Take [gpa, gpa + size) out of every memslot mapped there (splitting them); returns
        what was taken out, for ``unpunch``."""
        end = gpa + size
        removed: list[tuple[str, Slot]] = []
        for owner, slots in self.slots.items():
            kept: list[Slot] = []
            for slot in slots:
                if slot.gpa >= end or slot.gpa + slot.size <= gpa:
                    kept.append(slot)
                    continue
                start, stop = max(slot.gpa, gpa), min(slot.gpa + slot.size, end)
                removed.append((owner, Slot(-1, start, stop - start,
                                            slot.host_address + start - slot.gpa, slot.readonly)))
                kept += self._split(slot, gpa, end)
            self.slots[owner] = kept
        return removed

    def unpunch(self, removed: list[tuple[str, Slot]]) -> None:
        """Map back what ``punch`` took out (as slots of their own)."""
        for owner, piece in removed:
            self.slots[owner].append(self._create(piece.gpa, piece.size, piece.host_address,
                                                  piece.readonly))

    def replace_group(self, name: str, pieces: list[tuple[int, int, int, bool]]) -> None:
        """Make ``name`` exactly these (gpa, size, host address, readonly) memslots."""
        old = {(s.gpa, s.size, s.host_address, s.readonly): s for s in self.slots.get(name, [])}
        new = set(pieces)
        keep = [slot for key, slot in old.items() if key in new]
        for key, slot in old.items():
            if key not in new:
                self._delete(slot)
        for piece in sorted(new - set(old)):
            keep.append(self._create(*piece))
        self.slots[name] = keep
        self.present[name] = True

    def add(self, region: GuestRegion) -> None:
        self.slots[region.name] = [self._create(region.base, region.size, region.mapping.address,
                                                region.readonly)]
        self.present[region.name] = True

    def set_present(self, name: str, present: bool) -> None:
        """Unmap (reads and writes then exit as MMIO) or map back a region's memslots."""
        if self.present.get(name) == present:
            return
        for slot in self.slots[name]:
            self.vm.set_memory_region(slot.number, slot.gpa, slot.size if present else 0,
                                      slot.host_address, readonly=slot.readonly)
        self.present[name] = present


def build_ram(plan: MemoryMap, huge_pages: bool = False) -> GuestMemory:
    """Anonymous RAM for each RAM region of the plan, exactly where the plan puts it;
    ``huge_pages``: 2 MiB aligned and advised MADV_HUGEPAGE (QEMU's default for RAM), so
    the host backs it with transparent huge pages where it can."""
    memory = GuestMemory()
    allocate = map_anonymous_huge if huge_pages else map_anonymous
    for region in plan.ram():
        memory.add(GuestRegion(region.name, region.base, allocate(region.size), RegionKind.RAM))
    return memory


class MemoryManager:
    """Guest memory and its memslots, changed only together (see the module docstring)."""

    def __init__(self, vm: Vm, plan: MemoryMap, huge_pages: bool = False) -> None:
        self.memory = build_ram(plan, huge_pages)
        self.ram: tuple[GuestRegion, ...] = tuple(self.memory.regions)  # the plan's RAM
        self.slots = Memslots(vm)
        for region in self.ram:
            self.slots.add(region)

    def add(self, region: GuestRegion) -> GuestRegion:
        """A region (flash bank, user mapping) in guest memory and in KVM's memslots."""
        self.memory.add(region)
        self.slots.add(region)
        return region

    def set_present(self, name: str, present: bool) -> None:
        self.slots.set_present(name, present)

    def punch(self, gpa: int, size: int) -> list[tuple[str, Slot]]:
        return self.slots.punch(gpa, size)

    def unpunch(self, removed: list[tuple[str, Slot]]) -> None:
        self.slots.unpunch(removed)

    def replace_group(self, name: str, pieces: list[tuple[int, int, int, bool]]) -> None:
        self.slots.replace_group(name, pieces)

    def close(self) -> None:
        self.memory.close()
