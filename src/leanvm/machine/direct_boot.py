"""Direct Linux boot (no firmware): pick how the kernel is entered, load it, say what was done.

An ELF vmlinux boots through its PVH entry. A bzImage boots through PVH too when its payload
can be decompressed on the host (cached by content hash, loader/decompress.py), so the guest
never decompresses; otherwise, or with ``kernel_boot="bzimage"``, through the 64-bit boot
protocol, where the kernel's own stub decompresses it in the guest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

from leanvm.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from leanvm.layout.region import MemoryMap
    from leanvm.loader.linux64 import DirectKernel
    from leanvm.loader.pvh import PvhKernel
    from leanvm.machine.config import MachineConfig
    from leanvm.memory.guest import GuestMemory
    from leanvm.trace.events import Tracer


class DirectBoot(NamedTuple):
    kernel: "DirectKernel | PvhKernel"
    mode: str  # "pvh" or "bzimage"
    note: str  # for the summary: how the kernel was prepared
    decompress_ms: float | None  # host-side decompression (None: not decompressed here)
    decompress_cached: bool
    decompress_span: tuple[int, int] | None = None  # monotonic ns of the host decompression
    guest_decompress_s: float | None = None  # what it took in a guest here (recorded earlier)


def load_direct(config: "MachineConfig", plan: "MemoryMap", memory: "GuestMemory",
                kernel: Any, initrd: Any, tracer: "Tracer",
                cmdline: str | None = None) -> DirectBoot:
    """Load ``kernel`` (mapped file bytes) and ``initrd`` into ``memory`` for direct entry,
    with ``cmdline`` (default: the configured one)."""
    cmdline = config.cmdline if cmdline is None else cmdline
    from leanvm.loader.linux64 import linux_e820, load_linux64
    from leanvm.machine.platform import memory_ranges

    e820, low_end = linux_e820(*memory_ranges(plan)), plan.low_ram().size
    check_cmdline(cmdline, kernel, str(config.kernel))
    started = time.monotonic_ns()
    elf, elf_file, note, decompress_ms, cached, saved = kernel_elf(config, kernel)
    initrd, initrd_file, initrd_note = unpacked_initrd(config, initrd, low_end)
    files: dict[str, Any] = {}
    if config.zero_copy:  # map whole pages from the files instead of copying them
        files = {"initrd_file": initrd_file,
                 "kernel_file": elf_file if elf is not None else str(config.kernel)}
    rsdp = write_acpi_tables(memory, config.smp, acpi_virtio_windows(config, plan))
    loaded: "DirectKernel | PvhKernel"
    if elf is not None:
        from leanvm.loader.pvh import load_pvh

        loaded = load_pvh(memory, elf, str(config.kernel), initrd, str(config.initrd),
                          cmdline, e820, low_end, **files, rsdp=rsdp)
        mode = "pvh"
    else:
        loaded = load_linux64(memory, memoryview(kernel), str(config.kernel), initrd,
                              str(config.initrd), cmdline, e820, low_end, **files,
                              rsdp=rsdp)
        mode = "bzimage"
    placed = placement_note(loaded)
    span = None
    if decompress_ms is not None:
        span = (started, started + int(decompress_ms * 1e6))
    if tracer.enabled:
        if span is not None:
            tracer.span("vmm", "decompress kernel (host)", *span,
                        {"cached": cached, "guest_seconds_saved": saved})
        args = {"mode": mode, "entry": f"{loaded.entry:#x}", "initrd": loaded.initrd_size,
                "initrd_mapped": loaded.initrd_mapped, "kernel_mapped": loaded.kernel_mapped,
                "kernel_copied": loaded.kernel_copied, "detail": note.strip(" ,")}
        tracer.span("vmm", "load kernel", started, time.monotonic_ns(), args)
    return DirectBoot(loaded, mode, f"{mode}{note}; {placed}{initrd_note}", decompress_ms,
                      cached, span, saved)


ELF_CMDLINE_MAX = 2047  # x86 Linux's COMMAND_LINE_SIZE (2048) less the NUL


def check_cmdline(cmdline: str, kernel: Any, path: str) -> None:
    """The command line must fit what the kernel takes: a bzImage says in its setup header
    (cmdline_size, protocol 2.06+), whichever way it is entered; a bare ELF vmlinux takes
    x86's COMMAND_LINE_SIZE."""
    from leanvm.loader.bzimage import HEADER_END, is_bzimage, parse_setup_header

    encoded = cmdline.encode()
    limit = ELF_CMDLINE_MAX
    head = bytes(kernel[:HEADER_END])
    if is_bzimage(head):
        limit = parse_setup_header(head, path, len(kernel)).cmdline_size
    if b"\0" in encoded:
        raise ImageError("kernel command line contains a NUL byte")
    if len(encoded) > limit:
        raise ImageError(f"kernel command line is {len(encoded)} bytes; {path} accepts at "
                         f"most {limit}")


def unpacked_initrd(config: "MachineConfig", initrd: Any,
                    low_ram_end: int) -> tuple[Any, str | None, str]:
    """(the initrd to boot, the file it is in, a note): a compressed initramfs decompressed
    on the host (cached; loader/initrd.py) when that is on and the result leaves room in low
    RAM for the guest to unpack it (twice its size), else the initrd as given."""
    path = str(config.initrd) if config.initrd is not None else None
    if not config.initrd_unpack or not len(initrd):
        return initrd, path, ""
    from leanvm.loader.files import map_readonly
    from leanvm.loader.initrd import unpacked_initrd as unpack

    started = time.monotonic_ns()
    try:
        unpacked = unpack(memoryview(initrd), str(path))
    except ImageError as exc:
        return initrd, path, f" (booted as given: {exc})"
    if unpacked is None:
        return initrd, path, ""
    if 2 * unpacked.size > low_ram_end:
        return initrd, path, (f" (not decompressed on the host: {_size(unpacked.size)} "
                              "uncompressed needs more RAM)")
    ms = (time.monotonic_ns() - started) / 1e6
    how = "cached" if unpacked.cached else f"in {ms:.0f} ms"
    note = (f", decompressed on the host ({'+'.join(unpacked.formats)} to "
            f"{_size(unpacked.size)}, {how})")
    return map_readonly(unpacked.path, "unpacked initramfs"), str(unpacked.path), note


def acpi_virtio_windows(config: "MachineConfig", plan: "MemoryMap"
                        ) -> tuple[tuple[int, int, int], ...]:
    """(base, size, GSI) of the virtio-mmio windows the DSDT describes (discovery "acpi")."""
    if not config.virtio_mem or config.virtio_discovery != "acpi":
        return ()
    from leanvm.machine.virtio import windows

    return tuple((w.base, w.size, w.gsi) for w in windows(config, plan))


ACPI_TABLES_BASE = 0xE0000  # in the legacy hole the e820 map leaves out; Linux scans it too


def write_acpi_tables(memory: "GuestMemory", cpus: int,
                      virtio_mmio: tuple[tuple[int, int, int], ...] = ()) -> int:
    """ACPI tables describing this machine (firmware/acpi.py) for a direct boot; the RSDP's
    address, for hvm_start_info.rsdp_paddr or boot_params.acpi_rsdp_addr."""
    from leanvm.devices import acpi_pm
    from leanvm.firmware.acpi import AcpiPlatform, build_acpi_tables
    from leanvm.machine.platform import IRQ, PORT

    base = PORT["acpi-pm"].base  # the platform table decides where the block is
    platform = AcpiPlatform(
        cpus=cpus, pm1a_event_port=base + acpi_pm.PM1_EVT_OFFSET,
        pm1a_control_port=base + acpi_pm.PM1_CNT_OFFSET,
        pm_timer_port=base + acpi_pm.PM_TMR_OFFSET, sci_irq=IRQ["acpi-pm"],
        s5_sleep_type=acpi_pm.SLP_TYP_S5, pm1_event_length=acpi_pm.PM1_EVT_LEN,
        pm1_control_length=acpi_pm.PM1_CNT_LEN, pm_timer_length=acpi_pm.PM_TMR_LEN,
        virtio_mmio=virtio_mmio, fw_cfg_port=PORT["fw_cfg"].base)
    tables = build_acpi_tables(ACPI_TABLES_BASE, platform)
    memory.write(tables.base, tables.blob)
    return tables.rsdp_address


def note_guest_decompression(boot: DirectBoot, kernel: Any, phases: dict[str, int],
                             tracer: "Tracer") -> float | None:
    """After a bzImage boot whose decompressor printed on the serial console ("Decompressing
    Linux..." then "Booting the kernel"): put the in-guest decompression on the timeline and
    remember it for this kernel, so host-decompressed boots can say what they saved."""
    start, end = phases.get("kernel decompression"), phases.get("kernel decompressed")
    if boot.mode != "bzimage" or start is None or end is None or end < start:
        return None
    from leanvm.loader.decompress import kernel_digest, record_guest_decompression

    seconds = (end - start) / 1e9
    tracer.span("guest", "decompress kernel (guest)", start, end, {"seconds": seconds})
    record_guest_decompression(kernel_digest(memoryview(kernel)), seconds)
    return seconds


def placement_note(loaded: "DirectKernel | PvhKernel") -> str:
    """How the kernel and initrd got into guest RAM, for the summary."""
    mapped, copied = loaded.kernel_mapped, loaded.kernel_copied
    kernel = (f"kernel {_size(mapped)} mapped, {_size(copied)} copied" if mapped
              else f"kernel {_size(copied)} copied")
    if not loaded.initrd_size:
        return kernel
    how = "mapped copy-on-write" if loaded.initrd_mapped else "copied"
    return f"{kernel}; initrd {_size(loaded.initrd_size)} {how}"


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count / 1024:.0f} KiB"


def kernel_elf(config: "MachineConfig",
               kernel: Any) -> tuple[Any, str | None, str, float | None, bool, float | None]:
    """(ELF bytes to boot through PVH or None, the file they are in, a note for the summary,
    host decompression time in ms or None, whether it came from the cache, the seconds the
    guest took to decompress this kernel in an earlier bzImage boot here, if recorded)."""
    from leanvm.loader.bzimage import is_bzimage

    mode = config.kernel_boot
    if bytes(kernel[:4]) == b"\x7fELF":
        if mode == "bzimage":
            raise ConfigError(f"{config.kernel}: an ELF kernel boots only through PVH")
        return kernel, str(config.kernel), "", None, False, None
    if mode == "bzimage" or not is_bzimage(bytes(kernel[:0x280])):
        return None, None, "", None, False, None
    from leanvm.loader.decompress import (cached_vmlinux, guest_decompression_seconds,
                                          kernel_digest)
    from leanvm.loader.files import map_readonly
    from leanvm.loader.pvh import pvh_entry

    from leanvm.loader.decompress import read_payload

    started = time.monotonic_ns()
    try:
        read_payload(memoryview(kernel), str(config.kernel))
    except ImageError as exc:  # no payload fields, or a format leanvm cannot decompress
        if mode == "pvh":
            raise
        return None, None, f", guest decompresses ({exc})", None, False, None
    # A payload in a known format that does not decompress to what it declares is damaged:
    # the guest's own decompressor would fail on it too, so that is an error, not a fallback.
    digest = kernel_digest(memoryview(kernel))
    path, hit = cached_vmlinux(memoryview(kernel), str(config.kernel), digest)
    elf = map_readonly(path, "decompressed kernel")
    try:
        pvh_entry(elf, str(path))
    except ImageError as exc:  # a kernel built without PVH: its 64-bit entry still works
        if mode == "pvh":
            raise
        return None, None, f", guest decompresses ({exc})", None, False, None
    ms = (time.monotonic_ns() - started) / 1e6
    note = f", decompressed on the host {'(cached) ' if hit else ''}in {ms:.0f} ms"
    saved = guest_decompression_seconds(digest)
    if saved is not None:
        note += f" (the guest took {saved:.1f} s to decompress it in a bzImage boot here)"
    return elf, str(path), note, ms, hit, saved
