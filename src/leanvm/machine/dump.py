"""Dumping a VM's memory: what goes in (populated guest RAM only), the vCPUs' registers, the
guest's VMCOREINFO, and how a running VM is dumped without stopping it.

What goes in: guest RAM regions only (flash, ROM and device windows are not RAM), less
what a discard manager has discarded (unplugged virtio-mem blocks), less the pages the
host never populated (pagemap: neither present nor swapped; they read as zeros), which are
never read, so dumping populates nothing. Ranges where a file is mapped over RAM (the
kernel and initrd, zero-copy) count whole: they hold the file's bytes.

Live dumps: the vCPUs are held still (machine/pause.py) for as long as it takes to read
their registers and fork() the VMM; the guest then runs on while the child process,
holding a copy-on-write copy of guest memory as it was at the fork, writes the dump and
exits. The copy costs host memory only for the pages the guest writes while the dump is
being written (one copy of each such page, at most the populated memory).
"""

from __future__ import annotations

import gc
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leanvm.errors import ConfigError, GuestError, LeanvmError

if TYPE_CHECKING:
    from leanvm.dump.source import CpuState, DumpSource, LazyBytes, MemoryRun
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.machine.live_dump import Tracker
    from leanvm.machine.machine import Machine
    from leanvm.memory.guest import GuestMemory, GuestRegion

FORMATS = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy", "kdump-zstd",
           "kdump-raw-zlib", "kdump-raw-lzo", "kdump-raw-snappy", "kdump-raw-zstd")
MSR_KERNEL_GS_BASE = 0xC0000102
VMCOREINFO_LIMIT = 1 << 16  # bytes of guest note read at most (Linux's is one page)


@dataclass(frozen=True, slots=True)
class DumpResult:
    path: Path
    format: str
    size: int  # bytes of the file
    memory: int  # bytes of guest memory in it (kdump: before compression, zero pages out)
    pause_ms: float  # how long the guest was held still (0 for a stopped VM)
    seconds: float  # from the request to the renamed file
    vmcoreinfo: bool  # whether the guest had published VMCOREINFO
    notes: tuple[str, ...] = ()
    # how: "stopped" (the vCPUs did not run), "protect" (live, write-protection: a pause
    # that does not grow with memory) or "fork" (live, a fork of guest RAM)
    method: str = "stopped"


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ConfigError(f"bad dump format {name!r}: expected one of {', '.join(FORMATS)}")
    return name


def _segment_flags(seg: object) -> int:
    g = seg  # kvm_segment
    return ((g.type << 8) | (g.s << 12) | (g.dpl << 13) | (g.present << 15)  # type: ignore[attr-defined]
            | (g.avl << 20) | (g.l << 21) | (g.db << 22) | (g.g << 23))  # type: ignore[attr-defined]


def cpu_state(vcpu: "Vcpu") -> "CpuState":
    """One vCPU's registers as plain data (the vCPU must not be running)."""
    from leanvm.dump.source import CpuState, Segment

    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    values = {name: getattr(regs, name) for name, _ in regs._fields_}
    segments = {name: Segment(getattr(sregs, name).selector, getattr(sregs, name).base,
                              getattr(sregs, name).limit, _segment_flags(getattr(sregs, name)))
                for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")}
    segments["gdt"] = Segment(0, sregs.gdt.base, sregs.gdt.limit, 0)
    segments["idt"] = Segment(0, sregs.idt.base, sregs.idt.limit, 0)
    try:
        kernel_gs = vcpu.get_msrs([MSR_KERNEL_GS_BASE])[MSR_KERNEL_GS_BASE]
    except LeanvmError:
        kernel_gs = 0
    return CpuState(vcpu.id, values, segments,
                    (sregs.cr0, 0, sregs.cr2, sregs.cr3, sregs.cr4), sregs.efer, kernel_gs)


def guest_vmcoreinfo(memory: "GuestMemory", record: bytes | None) -> bytes | None:
    """The VMCOREINFO text the guest points at through fw_cfg's etc/vmcoreinfo, or None
    where it has not (or points at nonsense: everything in it comes from the guest)."""
    from leanvm.abi.elf import parse_note
    from leanvm.devices.fw_cfg import VMCOREINFO_FORMAT_ELF

    if record is None or len(record) < 16:
        return None
    _, guest_format, size, paddr = struct.unpack_from("<HHIQ", record)
    if guest_format != VMCOREINFO_FORMAT_ELF or not 0 < size <= VMCOREINFO_LIMIT:
        return None
    try:
        blob = memory.read(paddr, size)
    except GuestError:
        return None
    parsed = parse_note(blob)
    if parsed is None or parsed[0] != b"VMCOREINFO":
        return None
    return parsed[2].split(b"\0", 1)[0]


def memory_runs(memory: "GuestMemory", pid: int | str = "self", *,
                held_of: "Callable[[GuestRegion], list[tuple[int, int]]] | None" = None,
                data_of: "Callable[[GuestRegion, int, int], LazyBytes] | None" = None
                ) -> "tuple[list[MemoryRun], list[tuple[int, int]]]":
    """The populated guest RAM as runs (views into guest memory, nothing read), and the
    guest RAM that is plugged in, as (start, end). ``held_of(region)`` and
    ``data_of(region, offset, length)`` replace, for anonymous RAM, the pagemap of ``pid``
    and the views (a live dump's child, which does not map guest RAM, reads it so)."""
    from leanvm.dump.source import MemoryRun
    from leanvm.memory.guest import RegionKind
    from leanvm.memory.populated import held_runs, intersect, merge

    runs: list[MemoryRun] = []
    ram: list[tuple[int, int]] = []
    held_cache: dict[int, list[tuple[int, int]]] = {}
    for region, offset, size in memory.populated_ranges():
        if region.kind is not RegionKind.RAM:
            continue
        ram.append((region.base + offset, region.base + offset + size))
        mapping = region.mapping
        if mapping.path is not None:  # file-backed RAM: its bytes are in the file
            held = [(0, region.size)]
        else:
            held = held_cache.get(id(region))
            if held is None:
                held = (held_of(region) if held_of is not None else
                        merge(held_runs(mapping.address, region.size, pid), mapping.overlays))
                held_cache[id(region)] = held
        for start, length in intersect(held, offset, offset + size):
            data = (region.view[start:start + length] if data_of is None
                    else data_of(region, start, length))
            runs.append(MemoryRun(region.base + start, data))
    runs.sort(key=lambda run: run.paddr)
    return runs, ram


def virtual_ranges(memory: "GuestMemory", cpu: "CpuState") -> list:
    """vCPU 0's guest-virtual mappings (memory/paging.py), for ELF dumps with paging."""
    from leanvm.dump.source import VirtualRange
    from leanvm.memory.paging import PagingContext, mappings

    ctx = PagingContext.from_registers(cpu.cr[0], cpu.cr[3], cpu.cr[4], cpu.efer)

    return [VirtualRange(v, p, n) for v, p, n in mappings(ctx, lambda a: memory.read(a, 4096),
                                                          limit=memory_end(memory))]


def memory_end(memory: "GuestMemory") -> int:
    return max((region.end for region in memory.regions), default=0)


class DumpRequest:
    """What to dump and where."""

    def __init__(self, path: "str | Path", format: str = "elf", *, paging: bool = False,
                 begin: int | None = None, length: int | None = None) -> None:
        from leanvm.fileio import check_output_path

        self.format = check_format(format)
        if paging and format != "elf":
            raise ConfigError("paging (guest-virtual addresses) needs --dump-format elf; "
                              "kdump files hold physical pages")
        if (begin is None) != (length is None):
            raise ConfigError("dump filter: give both begin and length, or neither")
        if format != "elf" and begin is not None:
            raise ConfigError("dump filter begin/length works with the elf format only "
                              "(as QEMU's)")
        self.path = check_output_path(path, "dump")
        self.paging = paging
        self.begin, self.length = begin, length
        if format.startswith("kdump"):
            from leanvm.dump.kdump import Compression, compressor

            compressor(Compression[format.rsplit("-", 1)[1].upper()])  # library present?


def build_source(machine: "Machine", cpus: "list[CpuState]", record: bytes | None,
                 request: DumpRequest, pid: int | str = "self") -> "DumpSource":
    runs, ram = memory_runs(machine.memory, pid)
    return assemble_source(machine, runs, ram, cpus, guest_vmcoreinfo(machine.memory, record),
                           request, machine.memory)


def assemble_source(machine: "Machine", runs: "list[MemoryRun]", ram: list[tuple[int, int]],
                    cpus: "list[CpuState]", vmcoreinfo: bytes | None, request: DumpRequest,
                    memory: "GuestMemory") -> "DumpSource":
    """The DumpSource from its parts: ``memory`` (its read() and regions) for the page
    tables that ``paging`` walks."""
    from leanvm.dump.source import DumpSource, clip

    if request.begin is not None and request.length is not None:
        runs = clip(runs, request.begin, request.length)
    source = DumpSource(runs, cpus, ram, vmcoreinfo)
    if source.vmcoreinfo is None and machine.config.kernel is not None:
        source.notes.append("no VMCOREINFO: the guest kernel did not publish it (fw_cfg "
                            "etc/vmcoreinfo, Linux's qemu_fw_cfg driver); crash and drgn "
                            "then need the kernel's vmlinux and cannot find KASLR offsets")
    if request.paging and cpus:
        source.virtual = virtual_ranges(memory, cpus[0])
    return source


def write_source(source: "DumpSource", request: DumpRequest,
                 progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Write the dump file (temporary name, fsync, rename); (file size, memory bytes)."""
    from leanvm.dump.output import DumpFile

    out = DumpFile(request.path)
    try:
        if request.format == "elf":
            from leanvm.dump.elf import write_elf

            write_elf(source, out, progress)
            memory = source.size
        else:
            from leanvm.dump.kdump import Compression, write_kdump

            method = Compression[request.format.rsplit("-", 1)[1].upper()]
            flat = not request.format.startswith("kdump-raw")
            write_kdump(source, out, method, flat=flat, progress=progress)
            memory = source.size
        return out.commit(), memory
    except BaseException:
        out.discard()
        raise


def _vmcoreinfo_record(machine: "Machine") -> bytes | None:
    from leanvm.devices.fw_cfg import VMCOREINFO_FILE

    fw_cfg = machine.platform.fw_cfg
    return fw_cfg.file(VMCOREINFO_FILE) if VMCOREINFO_FILE in fw_cfg.files else None


def _anonymous_only(memory: "GuestMemory") -> bool:
    """Whether all guest RAM is anonymous memory with no file mapped over it: reading its
    populated pages then maps nothing new into the VMM."""
    return all(region.mapping.path is None and not region.mapping.overlays
               for region in memory.ram_regions())


def dump_stopped(machine: "Machine", request: DumpRequest,
                 progress: Callable[[int], None] | None = None) -> DumpResult:
    """Dump a VM whose vCPUs do not run (built, stopped or paused). Where a file is mapped
    over guest RAM (a zero-copy kernel or initrd) a forked child writes it, as for a running
    VM, so reading guest memory maps nothing into this process (the file's pages the guest
    never touched would otherwise be mapped in); all-anonymous RAM is written from here,
    without the fork (populated pages only are read, so nothing new is mapped either)."""
    started = time.monotonic()
    _preload(request)
    cpus = [cpu_state(vcpu) for vcpu in machine.vcpus]
    record = _vmcoreinfo_record(machine)
    if _anonymous_only(machine.memory):  # nothing to map in: no child needed
        source = build_source(machine, cpus, record, request)
        size, memory = write_source(source, request, progress)
        return DumpResult(request.path, request.format, size, memory, 0.0,
                          time.monotonic() - started, source.vmcoreinfo is not None,
                          tuple(source.notes))
    reader, writer = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(reader)
        os.close(writer)
        raise
    if pid == 0:  # the child never returns from here
        os.close(reader)
        _child(machine, cpus, record, request, writer)
    os.close(writer)
    return LiveDump(pid, reader, request, 0.0, started, progress, method="stopped").wait()


class LiveDump:
    """A dump being written by a child process while the guest runs. ``wait()`` for its
    DumpResult (or the error the child reported)."""

    def __init__(self, pid: int, reader: int, request: DumpRequest, pause_ms: float,
                 started: float, progress: Callable[[int], None] | None,
                 on_end: Callable[[], None] | None = None, method: str = "fork") -> None:
        self.pid = pid
        self.method = method
        self._on_end = on_end
        self.request = request
        self.pause_ms = pause_ms
        self._started = started
        self._reader = reader
        self._progress = progress
        self._result: DumpResult | None = None
        self._error: LeanvmError | None = None
        self.total = 0  # bytes of guest memory to write, once the child has counted them
        self._thread = threading.Thread(target=self._collect, name="leanvm-dump", daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        import json

        buffer = b""
        final: dict | None = None
        with os.fdopen(self._reader, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "progress" in message:
                        if self._progress is not None:
                            self._progress(message["progress"])
                    elif "total" in message:
                        self.total = message["total"]
                    else:
                        final = message
        _, status = os.waitpid(self.pid, 0)
        if self._on_end is not None:
            self._on_end()
        if final is None or "error" in final:
            why = final["error"] if final else f"the dump process ended with status {status}"
            self._error = LeanvmError(why)
            return
        self._result = DumpResult(self.request.path, self.request.format, final["size"],
                                  final["memory"], self.pause_ms,
                                  time.monotonic() - self._started, final["vmcoreinfo"],
                                  tuple(final["notes"]), self.method)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> DumpResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise LeanvmError(f"the dump to {self.request.path} is still being written")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _preload(request: DumpRequest) -> None:
    """Import what the child will need before forking: a child of a threaded process must
    not wait on locks other threads held at the fork."""
    import json  # noqa: F401

    import leanvm.dump.cpu_notes  # noqa: F401
    import leanvm.dump.elf  # noqa: F401
    import leanvm.dump.kdump  # noqa: F401
    import leanvm.dump.output  # noqa: F401
    import leanvm.dump.source  # noqa: F401
    import leanvm.memory.populated  # noqa: F401
    import leanvm.memory.paging  # noqa: F401


def _child(machine: "Machine", cpus: "list[CpuState]", record: bytes | None,
           request: DumpRequest, writer: int) -> None:
    """In a child forked with guest RAM: write the dump of its copy."""
    report_child(writer, request, lambda: build_source(machine, cpus, record, request))


def report_child(writer: int, request: DumpRequest, build: "Callable[[], DumpSource]",
                 tracker: "Tracker | None" = None) -> None:
    """In the forked child: build the source, write the dump, report on ``writer``, and
    end without running any of the parent's clean-up (os._exit). With a ``tracker``
    (machine/live_dump.py) its fault-serving thread runs throughout."""
    import json

    status = 1
    thread = None
    try:
        gc.disable()

        def say(message: dict) -> None:
            os.write(writer, json.dumps(message).encode() + b"\n")

        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1:
                last[0] = now
                say({"progress": done})

        if tracker is not None:
            from leanvm.machine.live_dump import start_serving

            thread = start_serving(tracker)
        source = build()
        say({"total": source.size})
        size, memory = write_source(source, request, progress)
        say({"size": size, "memory": memory, "vmcoreinfo": source.vmcoreinfo is not None,
             "notes": source.notes})
        status = 0
    except LeanvmError as exc:
        os.write(writer, json.dumps({"error": str(exc)}).encode() + b"\n")
    except BaseException as exc:  # reported, never raised into the copy of the parent
        try:
            os.write(writer, json.dumps({"error": f"the dump failed: {exc!r}"}).encode() + b"\n")
        except BaseException:
            pass
    finally:
        if tracker is not None:
            tracker.finish.set()
            if thread is not None:
                thread.join(120)
        os._exit(status)


def dump_live(machine: "Machine", request: DumpRequest,
              progress: Callable[[int], None] | None = None, *,
              method: str = "auto") -> LiveDump:
    """Dump a running VM without stopping it. ``method`` "protect" (machine/live_dump.py:
    write-protection, a pause that does not grow with guest memory), "fork", or "auto":
    protect where the host and the guest's RAM allow, else fork."""
    if method not in ("auto", "protect", "fork"):
        raise ConfigError(f"bad live dump method {method!r}: expected auto, protect or fork")
    if method != "fork":
        from leanvm.machine.live_dump import dump_protected
        from leanvm.memory.userfaultfd import UffdUnavailable

        try:
            return dump_protected(machine, request, progress)
        except UffdUnavailable:
            if method == "protect":
                raise
    return dump_forked(machine, request, progress)


def dump_forked(machine: "Machine", request: DumpRequest,
                progress: Callable[[int], None] | None = None) -> LiveDump:
    """Dump a running VM: hold its vCPUs, read their registers, fork, let them go; the
    child writes the dump from its copy-on-write copy of guest RAM."""
    gate = machine.pause_gate
    started = time.monotonic()
    _preload(request)
    reader, writer = os.pipe()
    held = time.perf_counter()  # the guest stops from the first kick
    try:
        gate.hold(machine.loop_control)
        try:
            cpus = [cpu_state(vcpu) for vcpu in machine.vcpus]
            record = _vmcoreinfo_record(machine)
            pid = os.fork()
            if pid == 0:  # the child never returns from here
                os.close(reader)
                _child(machine, cpus, record, request, writer)
        finally:
            gate.release()
    except BaseException:
        os.close(reader)
        os.close(writer)
        raise
    pause_ms = (time.perf_counter() - held) * 1e3
    os.close(writer)
    return LiveDump(pid, reader, request, pause_ms, started, progress)
