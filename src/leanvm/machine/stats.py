"""The figures of one run, as plain data: what `leanvm run --stats-json` writes and
``RunResult.stats()`` returns. docs/stats.md lists every field with its unit; SCHEMA grows
by one whenever a field changes meaning or goes away (new fields do not change it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanvm.devices.bus import Bus
    from leanvm.machine.machine import Machine
    from leanvm.machine.vcpu_loop import ExitCounts

SCHEMA = 1


class StatsSource:
    """Where a RunResult's stats() come from: the machine while it is open (host memory is
    measured then, 10-20 ms, so only when asked), a frozen copy without the host-memory
    fields once it is closed."""

    __slots__ = ("_machine", "_cache", "_frozen")

    def __init__(self, machine: "Machine") -> None:
        self._machine: "Machine | None" = machine
        self._cache: dict[str, Any] | None = None
        self._frozen: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        if self._machine is not None:
            self._cache = collect(self._machine, memory=True)
            return self._cache
        assert self._frozen is not None
        return self._frozen

    def freeze(self) -> None:
        """The machine is about to close: keep what does not need its memory."""
        if self._machine is not None and self._cache is None:
            self._frozen = collect(self._machine, memory=False)
        self._machine = None


def collect(machine: "Machine", memory: bool = True) -> dict[str, Any]:
    """What the machine knows at its stop, besides the RunResult's own fields; with
    ``memory``, what its guest memory and the VMM cost the host now (else those are None)."""
    from leanvm.version import __version__

    rows = machine.residency() if memory else []
    regions = {r.name: r for r in machine.memory.regions}
    pio, mmio = machine.platform.pio, machine.platform.mmio
    fallback = machine.fallback
    sampler = machine.sampler
    data: dict[str, Any] = {
        "leanvm_version": __version__,
        "name": machine.config.name,
        "exit_kinds": machine._control.counts.kinds(),
        "coalesced_writes": ring.consumed if (ring := machine.built.coalesced) else None,
        "exits_by": exits_by_place(machine._control.counts, pio, mmio),
        "device_accesses": {
            "pio": pio.accesses, "pio_unclaimed": pio.unclaimed_reads + pio.unclaimed_writes,
            "mmio": mmio.accesses,
            "mmio_unclaimed": mmio.unclaimed_reads + mmio.unclaimed_writes},
        "memmap": machine.plan.to_json(),
        "ram_regions": [{"name": r.name, "base": r.base, "size": r.size}
                        for r in machine.memory.regions],
        "residency": [{"name": row.name, "base": regions[row.name].base, "size": row.size,
                       "resident": row.resident, "private": row.private} for row in rows]
        if memory else None,
        "host_memory": host_memory(machine, rows) if memory else None,
        "kernel_cmdline": machine.kernel_cmdline if machine.config.kernel is not None else None,
        "kernel_cmdline_added": list(machine.cmdline_added),
        "kernel_boot": machine.kernel_boot_note or None,
        "cpu_profile": machine.cpu_profile,
        "vcpus": len(machine.vcpus),
        "tsc_khz": tsc_khz(machine),
        "emulation_fallback": fallback.to_json() if fallback is not None else None,
        "virtio_mem": machine.built.virtio.stats(memory) or None,
        "rip_samples": None if sampler is None else {
            "hz": sampler.hz, "count": len(sampler.samples), "symbols": sampler.symbol_note,
            "vcpus": sampler.vcpus, "missed": sampler.missed,
            "top": [{"where": where, "samples": count} for where, count in sampler.top(50)]},
    }
    return data


def tsc_khz(machine: "Machine") -> int | None:
    """The guest's TSC frequency (KVM_GET_TSC_KHZ), None where KVM cannot say."""
    from leanvm.errors import LeanvmError

    try:
        return machine.vcpus[0].get_tsc_khz()
    except LeanvmError:
        return None


def host_memory(machine: "Machine", rows: list[Any]) -> dict[str, int]:
    """What this VM costs the host at the stop, in bytes. Guest memory: resident, and
    private = anonymous pages this VM alone owns (pagemap; file pages it maps from the page
    cache are shared). The VMM's own overhead: written private memory (Private_Dirty) outside
    guest memory; clean private pages (libraries, page cache only this process maps now) are
    left out, as another VM would share them."""
    from leanvm.memory.residency import mapping_memory, process_memory

    regions = machine.memory.regions
    guest = mapping_memory("self", [(r.mapping.address, r.mapping.address + r.size)
                                    for r in regions])
    process = process_memory()
    return {"guest_resident": sum(r.resident for r in rows),
            "guest_private": sum(r.private for r in rows),
            "process_rss": process.rss, "process_pss": process.pss,
            "process_private": process.private,
            "vmm_private": max(0, process.private_dirty - guest.private_dirty)}


def exits_by_place(counts: "ExitCounts", pio: "Bus", mmio: "Bus",
                   top: int = 32) -> dict[str, list[dict[str, Any]]]:
    """The ports and MMIO addresses that exited most, each named by the device there (the
    platform table's names, or a device added through the API), most exits first."""
    from leanvm.machine.vcpu_loop import OTHER

    def rows(first: dict[int, int], second: dict[int, int], bus: "Bus", names: tuple[str, str],
             key: str) -> list[dict[str, Any]]:
        places = sorted(set(first) | set(second),
                        key=lambda p: -(first.get(p, 0) + second.get(p, 0)))
        out = []
        for place in places[:top]:
            found = bus.lookup(place) if place != OTHER else None
            out.append({key: "other" if place == OTHER else f"{place:#x}",
                        "device": found.name if found is not None else None,
                        names[0]: first.get(place, 0), names[1]: second.get(place, 0)})
        return out

    return {"ports": rows(counts.out_ports, counts.in_ports, pio, ("out", "in"), "port"),
            "mmio": rows(counts.mmio_writes, counts.mmio_reads, mmio, ("writes", "reads"),
                         "address")}
